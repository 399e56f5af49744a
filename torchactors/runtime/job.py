"""The job: its directory, its secret, and the small files every process reads.

Box in the data flow: the driver creates the job (``ta.init``); each child process joins it
with the directory and secret it is given at start. The directory (mode 0700) holds the
actors' sockets, a status file per actor (written only by the supervisor that started it),
and one file per actor name. Files, not a server: any process can look an actor up without
asking the driver.

Every file is written whole or not at all (a fresh temporary renamed into place) and opened
relative to its directory's fd with ``O_NOFOLLOW``: a planted link or FIFO is never written
through, read, or waited on (see docs/design.md, Security).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
from typing import Any

from torchactors.runtime.status import ActorStatus
from torchactors.store import core as store_core
from torchactors.store import registry

logger = logging.getLogger(__name__)


class Job:
    def __init__(self, job_dir: str, secret: bytes, driver: bool, capacity: int | None) -> None:
        self.dir = job_dir
        self.secret = secret
        self.driver = driver
        self.capacity = capacity
        for sub in ("actors", "names"):
            try:
                os.mkdir(os.path.join(job_dir, sub), 0o700)
            except FileExistsError:
                pass

    @classmethod
    def create(cls, capacity: int | None) -> Job:
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
    def join(cls, job_dir: str, secret: bytes, capacity: int | None) -> Job:
        job = cls(job_dir, secret, False, capacity)
        store_core.attach(job.dir, capacity=capacity)
        return job

    # -- per-actor files ------------------------------------------------------------------

    def socket_path(self, actor_id: str, incarnation: int) -> str:
        return os.path.join(self.dir, f"{actor_id}.{incarnation}.sock")

    def _status_path(self, actor_id: str) -> str:
        return os.path.join(self.dir, "actors", actor_id + ".json")

    def write_status(self, actor_id: str, status: ActorStatus) -> None:
        """Only the actor's supervisor writes its status: ``owner`` (this pid) lets a caller
        tell that the actor died with its owner when nobody is left to update the file."""
        record = status._replace(owner=os.getpid())._asdict()
        write_file(self._actors, actor_id + ".json", json.dumps(record).encode())

    def read_status(self, actor_id: str) -> ActorStatus | None:
        """The actor's last written status; None before the first (or if the file is torn)."""
        data = read_file(self._actors, actor_id + ".json")
        try:
            return None if data is None else ActorStatus.from_dict(json.loads(data))
        except ValueError:
            return None

    def mark_killed(self, actor_id: str, reason: str = "it was killed with ta.kill()") -> None:
        """Tell the actor's supervisor that its death is wanted and final (no restart);
        ``reason`` is what its callers' ActorDiedError says. The first reason stays."""
        try:
            write_file(self._actors, actor_id + ".killed", reason.encode(), exclusive=True)
        except FileExistsError:
            pass

    def was_killed(self, actor_id: str) -> bool:
        return read_file(self._actors, actor_id + ".killed") is not None

    def killed_reason(self, actor_id: str) -> str:
        """Why the actor's death is final ('' if it is not)."""
        data = read_file(self._actors, actor_id + ".killed")
        if data is None:
            return ""
        return data.decode(errors="replace") or "it was killed with ta.kill()"

    def write_error(self, actor_id: str, text: str) -> None:
        write_file(self._actors, actor_id + ".error", text.encode(errors="replace"))

    def read_error(self, actor_id: str) -> str:
        data = read_file(self._actors, actor_id + ".error")
        return "" if data is None else data.decode(errors="replace")

    @property
    def _actors(self) -> str:
        return os.path.join(self.dir, "actors")

    # -- names ----------------------------------------------------------------------------

    def register_name(self, name: str, record: dict) -> None:
        try:
            write_file(os.path.join(self.dir, "names"), _safe(name), json.dumps(record).encode(), exclusive=True)
        except FileExistsError:
            raise ValueError(f"an actor named {name!r} already exists in this job; pick another name "
                             f"or ta.kill() the old one first") from None

    def lookup_name(self, name: str) -> dict | None:
        data = read_file(os.path.join(self.dir, "names"), _safe(name))
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def drop_name(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, "names", _safe(name)))
        except OSError:
            pass

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
MAX_FILE = 1 << 20      # bytes read from a job file at most (an error's traceback fits)


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)


def write_file(directory: str, name: str, data: bytes, exclusive: bool = False) -> None:
    """Put ``data`` at ``directory/name`` whole or not at all: written to a fresh 0600
    temporary (``O_EXCL|O_NOFOLLOW``: never into a planted file or through a link), then
    renamed over ``name`` (which replaces a link rather than following it) or, ``exclusive``,
    linked to it (FileExistsError if it exists). All relative to the directory's fd."""
    dfd = _open_dir(directory)
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                os.unlink(tmp, dir_fd=dfd)
        else:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        os.close(dfd)


def read_file(directory: str, name: str) -> bytes | None:
    """The bytes of ``directory/name`` (at most ``MAX_FILE``) if it is a regular file of this
    user; None if it is absent, a link, a FIFO or someone else's (never blocks, never follows)."""
    try:
        dfd = _open_dir(directory)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        chunks, left = [], MAX_FILE
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02x}" for c in name)


_job: Job | None = None


def current() -> Job | None:
    return _job


def set_current(job: Job | None) -> None:
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


def read_record(job_dir: str, kind: str, name: str) -> dict | None:
    """The record written by ``write_record``, or None if there is none (yet)."""
    try:
        with open(os.path.join(job_dir, kind, _safe(name))) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
