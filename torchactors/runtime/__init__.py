"""Processes: the job directory, the supervisor and its zygote, a child's start-up, the authenticated transport."""
