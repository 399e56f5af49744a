"""Job files and the ``torchactors`` command: the top layer, written on the public API only.

A YAML job names actor roles and a program; ``torchactors run job.yaml`` starts the roles'
actors, runs the program with a ``JobContext`` and writes metrics and a summary. Modules, in the
order a job goes through them: ``yamldoc`` (YAML with line numbers) -> ``schema`` (the keys and
their checks) -> ``config`` (overrides, validation -> ``JobConfig``) -> ``runner`` (start, run,
clean up; with ``context``, ``progress``, ``interrupts``, ``summary``) -> ``cli`` (exit codes),
and ``plot`` for a finished run. ``imports`` resolves the ``module:attr`` strings a job names.
"""
