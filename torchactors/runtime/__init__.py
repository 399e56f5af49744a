"""Processes: the spawn supervisor, the transport, the job, YAML job configs and the CLI."""
