"""Learning code: a torch CartPole, gymnasium envs, models, V-trace and an IMPALA actor/learner (the main job)."""
