"""Learning code for the main job: a torch CartPole, V-trace and an IMPALA actor/learner."""
