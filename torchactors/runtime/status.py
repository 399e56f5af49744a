"""The actor status record: what the supervisor says about a process it started.

Box in the data flow: supervisor -> status file (``Job.write_status``) -> any reader (the
caller's channel deciding between reconnect, wait and ActorDiedError; ``ta.actor_status``;
the job runner's restart counts). One declared record instead of a dict whose keys each
reader guesses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

STATES = ("starting", "alive", "restarting", "dead")


class ActorStatus(NamedTuple):
    """One actor's state as its supervisor last wrote it.

    ``state``: ``"starting"`` (requested, no process yet), ``"alive"`` (a process runs),
    ``"restarting"`` (it died and a restart is due), ``"dead"`` (for good); ``"unknown"`` only
    in the record a reader uses while no file exists yet. ``incarnation`` counts the processes
    started for the actor (0 first); ``pid`` is the current (or last) one's. ``exit_code`` or
    ``signal`` (a name such as ``"SIGKILL"``) tell how the last incarnation that ended ended;
    ``restarts`` is how often it was restarted, ``restarts_left`` how many it may still have
    (-1: unlimited). ``killed``: its death was asked for (``ta.kill``, shutdown); ``error``:
    why a process could not be started; ``owner``: the pid of the supervisor's process;
    ``detached``: the process outlives its owner (a detached actor started by an actor).
    """

    state: str = "unknown"
    incarnation: int = 0
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    restarts: int = 0
    restarts_left: int = 0
    killed: bool = False
    error: str | None = None
    owner: int | None = None
    detached: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> ActorStatus | None:
        """The record a status file holds, or None if it is not one (a torn or foreign file:
        readers treat it like an absent one). Unknown keys are ignored, so a newer writer's
        record still reads."""
        if not isinstance(data, dict) or not isinstance(data.get("state"), str):
            return None
        return cls(**{k: v for k, v in data.items() if k in cls._fields})
