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
        path = self._status_path(actor_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, path)

    def read_status(self, actor_id: str) -> Optional[dict]:
        try:
            with open(self._status_path(actor_id)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def mark_killed(self, actor_id: str) -> None:
        """Tell the actor's supervisor that its death is wanted (no restart)."""
        open(os.path.join(self.dir, "actors", actor_id + ".killed"), "w").close()

    def was_killed(self, actor_id: str) -> bool:
        return os.path.exists(os.path.join(self.dir, "actors", actor_id + ".killed"))

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


# -- records of named data-plane channels (``weights/<name>``): any process reads them ------------

def write_record(job_dir: str, kind: str, name: str, record: dict, replace: bool = False) -> None:
    """Write ``<job_dir>/<kind>/<name>``, a JSON record any process of the job can read, whole
    or not at all. Without ``replace`` the name must be new (``FileExistsError`` otherwise)."""
    folder = os.path.join(job_dir, kind)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, _safe(name))
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)      # atomic, and fails if the name is taken
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_record(job_dir: str, kind: str, name: str) -> Optional[dict]:
    """The record written by ``write_record``, or None if there is none (yet)."""
    try:
        with open(os.path.join(job_dir, kind, _safe(name))) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
