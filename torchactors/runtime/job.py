"""The job: its directory, its secret, and the small files every process reads.

Box in the data flow: the driver creates the job (``ta.init``); each child process joins it
with the directory and secret it is given at start. The directory (mode 0700) holds the
actors' sockets, a status file per actor (written only by the supervisor that started it),
and one file per actor name. Files, not a server: any process can look an actor up without
asking the driver.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from typing import Any, Optional

from torchactors.store import core as store_core
from torchactors.store import registry

logger = logging.getLogger(__name__)


class Job:
    def __init__(self, job_dir: str, secret: bytes, driver: bool, capacity: Optional[int]) -> None:
        self.dir = job_dir
        self.secret = secret
        self.driver = driver
        self.capacity = capacity
        for sub in ("actors", "names"):
            os.makedirs(os.path.join(job_dir, sub), mode=0o700, exist_ok=True)

    @classmethod
    def create(cls, capacity: Optional[int]) -> "Job":
        """A new job with this process as its driver. A store already started standalone
        (``put`` before ``init``) becomes the driver's store, so its refs stay valid."""
        existing = store_core.active()
        if existing is not None and existing.own_job_dir:
            existing.own_job_dir = False
            if capacity is not None:
                existing.pool.capacity = capacity
            return cls(existing.job_dir, secrets.token_bytes(32), True, capacity)
        job = cls(registry.create_job_dir(), secrets.token_bytes(32), True, capacity)
        store_core.attach(job.dir, index=0, capacity=capacity)
        return job

    @classmethod
    def join(cls, job_dir: str, secret: bytes, capacity: Optional[int]) -> "Job":
        job = cls(job_dir, secret, False, capacity)
        store_core.attach(job.dir, capacity=capacity)
        return job

    # -- per-actor files ------------------------------------------------------------------

    def socket_path(self, actor_id: str, incarnation: int) -> str:
        return os.path.join(self.dir, f"{actor_id}.{incarnation}.sock")

    def _status_path(self, actor_id: str) -> str:
        return os.path.join(self.dir, "actors", actor_id + ".json")

    def write_status(self, actor_id: str, status: dict) -> None:
        """Only the actor's supervisor writes its status: ``owner`` (this pid) lets a caller
        tell that the actor died with its owner when nobody is left to update the file."""
        path = self._status_path(actor_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**status, "owner": os.getpid()}, f)
        os.replace(tmp, path)

    def read_status(self, actor_id: str) -> Optional[dict]:
        try:
            with open(self._status_path(actor_id)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def mark_killed(self, actor_id: str, reason: str = "it was killed with ta.kill()") -> None:
        """Tell the actor's supervisor that its death is wanted and final (no restart);
        ``reason`` is what its callers' ActorDiedError says. The first reason stays."""
        try:
            fd = os.open(os.path.join(self.dir, "actors", actor_id + ".killed"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(reason)

    def was_killed(self, actor_id: str) -> bool:
        return os.path.exists(os.path.join(self.dir, "actors", actor_id + ".killed"))

    def killed_reason(self, actor_id: str) -> str:
        """Why the actor's death is final ('' if it is not)."""
        try:
            with open(os.path.join(self.dir, "actors", actor_id + ".killed")) as f:
                return f.read() or "it was killed with ta.kill()"
        except OSError:
            return ""

    def write_error(self, actor_id: str, text: str) -> None:
        with open(os.path.join(self.dir, "actors", actor_id + ".error"), "w") as f:
            f.write(text)

    def read_error(self, actor_id: str) -> str:
        try:
            with open(os.path.join(self.dir, "actors", actor_id + ".error")) as f:
                return f.read()
        except OSError:
            return ""

    # -- names ----------------------------------------------------------------------------

    def register_name(self, name: str, record: dict) -> None:
        path = os.path.join(self.dir, "names", _safe(name))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ValueError(f"an actor named {name!r} already exists in this job; pick another name "
                             f"or ta.kill() the old one first") from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)

    def lookup_name(self, name: str) -> Optional[dict]:
        try:
            with open(os.path.join(self.dir, "names", _safe(name))) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def drop_name(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, "names", _safe(name)))
        except OSError:
            pass

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02x}" for c in name)


_job: Optional[Job] = None


def current() -> Optional[Job]:
    return _job


def set_current(job: Optional[Job]) -> None:
    global _job
    _job = job


def describe(job: Job) -> dict[str, Any]:
    """What a child needs to join the job."""
    return {"dir": job.dir, "secret": job.secret, "capacity": job.capacity}
