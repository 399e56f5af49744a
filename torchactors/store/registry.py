"""Job membership and the per-process hold tables that count refs across processes.

Box in the data flow: every process of a job has an index, a file ``procs/<index>`` in the
job directory, and two memfd tables that only it writes:

- a *hold table*: for every (owner index, slot) the number of ``ObjectRef``s this process
  holds (``live``) and how many it ever acquired (``acquired``, monotonic);
- a *header table*: for each slot this process owns, the object's generation and state, so
  a reader can tell a freed object from a live one.

An owner decides an object is unreferenced by reading its column in every live peer's
hold table. Since each cell has one writer, no atomics are needed; the ``acquired`` counter
read before and after the ``live`` counts detects a ref that moved during the scan (a holder
only drops a ref after the next holder has counted it). A dead peer's holds are ignored, which
is how everything a killed process held is released at once. x86-64 store ordering assumed.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import select
import shutil
import tempfile
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)

MAX_PROCS = 1024          # process indices per job
MAX_SLOTS = 1 << 16       # live objects per owner
HOLD_CELL = 3             # int64 cells per (owner, slot): live, acquired, freed generation
HEADER_CELL = 2           # int64 cells per slot: generation, state
FREE_EPOCH = 0            # header slot 0 is not an object: cell 0 counts free() calls made here

STATE_EMPTY, STATE_LIVE, STATE_FREED = 0, 1, 2


def _base_dir() -> str:
    root = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(root, f"torchactors-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def sweep_stale_jobs() -> int:
    """Remove job directories whose driver is gone (left by a SIGKILLed driver)."""
    base = _base_dir()
    removed = 0
    for name in os.listdir(base):
        pid = name.split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_job_dir() -> str:
    """A fresh job directory of mode 0700, named after the driver's pid for the sweeper."""
    sweep_stale_jobs()
    path = os.path.join(_base_dir(), f"{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path, 0o700)
    os.mkdir(os.path.join(path, "procs"), 0o700)
    return path


class _Table:
    """A memfd of int64 cells, written by its creator and read by peers."""

    def __init__(self, ncells: int, fd: Optional[int] = None) -> None:
        self.owned = fd is None
        if fd is None:
            fd = os.memfd_create(f"torchactors-table-{os.getpid()}", os.MFD_CLOEXEC)
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, ncells * 8)      # sparse: only touched pages use memory
        self.fd = fd
        self.mm = mmap.mmap(fd, ncells * 8, prot=mmap.PROT_READ | (mmap.PROT_WRITE if self.owned else 0))
        self.cells = memoryview(self.mm).cast("q")
        if not self.owned:
            os.close(fd)
            self.fd = -1

    def close(self) -> None:
        self.cells.release()
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Peer:
    """Another process of the job as this process sees it: its tables and its liveness."""

    __slots__ = ("index", "pid", "holds", "header", "pidfd", "dead")

    def __init__(self, index: int, pid: int, holds: Optional[_Table], header: Optional[_Table],
                 pidfd: int) -> None:
        self.index = index
        self.pid = pid
        self.holds = holds
        self.header = header
        self.pidfd = pidfd
        self.dead = False

    def alive(self) -> bool:
        if self.dead:
            return False
        if self.pidfd >= 0:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
            if readable:
                self.dead = True
        elif not _pid_alive(self.pid):
            self.dead = True
        if self.dead and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return not self.dead


class Membership:
    """This process's place in a job: its index and tables, and the peers it has met."""

    def __init__(self, job_dir: str, index: Optional[int] = None) -> None:
        self.job_dir = job_dir
        self.holds = _Table(MAX_PROCS * MAX_SLOTS * HOLD_CELL)
        self.header = _Table(MAX_SLOTS * HEADER_CELL)
        self.index = self._claim_index(index)
        self.peers: dict[int, Peer] = {}
        self._peers_mtime = 0
        self._procs_dir = os.path.join(job_dir, "procs")
        self.lock = threading.Lock()
        self.count_lock = threading.Lock()
        self._busy = False
        self._deferred: list[int] = []
        self._owner_base = self.index * MAX_SLOTS * HOLD_CELL

    def _claim_index(self, hint: Optional[int]) -> int:
        procs = os.path.join(self.job_dir, "procs")
        info = json.dumps({"pid": os.getpid(), "holds_fd": self.holds.fd, "header_fd": self.header.fd})
        start = hint if hint is not None else 0
        for index in range(start, MAX_PROCS):
            path = os.path.join(procs, str(index))
            try:
                fd = os.open(path + ".tmp" + str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(info)
            try:
                os.link(path + ".tmp" + str(os.getpid()), path)   # atomic claim, complete content
            except FileExistsError:
                continue
            finally:
                os.unlink(path + ".tmp" + str(os.getpid()))
            return index
        raise RuntimeError(f"job {self.job_dir} has used all {MAX_PROCS} process indices")

    # -- this process's own counters -------------------------------------------------

    def hold(self, owner: int, slot: int) -> None:
        """Count one more ref to (owner, slot) held here: live first, then acquired."""
        i = (owner * MAX_SLOTS + slot) * HOLD_CELL
        with self.count_lock:
            self._busy = True
            cells = self.holds.cells
            cells[i] += 1
            cells[i + 1] += 1
            self._drain()
            self._busy = False

    def unhold(self, owner: int, slot: int) -> int:
        """Count one ref fewer; returns the count left here (-1 when deferred).

        Runs from ``ObjectRef.__del__``, which the garbage collector may call in the middle of
        another counter update of this process: then the decrement is queued, not lost."""
        i = (owner * MAX_SLOTS + slot) * HOLD_CELL
        if self._busy:
            self._deferred.append(i)
            return -1
        with self.count_lock:
            self._busy = True
            cells = self.holds.cells
            cells[i] -= 1
            left = cells[i]
            self._drain()
            self._busy = False
            return left

    def _drain(self) -> None:
        cells = self.holds.cells
        while self._deferred:
            cells[self._deferred.pop()] -= 1

    def mark_freed(self, owner: int, slot: int, generation: int) -> None:
        """Record that this process freed (owner, slot, generation); the owner acts on it."""
        with self.count_lock:
            self._busy = True
            self.holds.cells[(owner * MAX_SLOTS + slot) * HOLD_CELL + 2] = generation
            self.header.cells[FREE_EPOCH] += 1
            self._busy = False

    def freed_anywhere(self, owner: int, slot: int, generation: int) -> bool:
        """Has any live process of the job called free() on this object?"""
        i = (owner * MAX_SLOTS + slot) * HOLD_CELL + 2
        return self.holds.cells[i] == generation or self.freed_by_peer(owner, slot, generation)

    def freed_by_peer(self, owner: int, slot: int, generation: int) -> bool:
        i = (owner * MAX_SLOTS + slot) * HOLD_CELL + 2
        for p in list(self.peers.values()):
            holds = p.holds
            if holds is not None and not p.dead:
                try:
                    if holds.cells[i] == generation and p.alive():
                        return True
                except ValueError:      # its tables were just closed: it died
                    pass
        return False

    def drop_dead_peers(self) -> None:
        """Unmap the tables of peers that died: their holds no longer count."""
        with self.lock:
            for p in self.peers.values():
                if p.holds is not None and not p.alive():
                    tables, p.holds, p.header = (p.holds, p.header), None, None
                    for t in tables:
                        t.close()

    def free_epochs(self) -> tuple:
        """A fingerprint of every peer's free() count: changes when someone frees something.
        Call ``refresh_peers`` first."""
        return tuple((p.index, p.header.cells[FREE_EPOCH]) for p in list(self.peers.values())
                     if p.header is not None and not p.dead)

    def set_header(self, slot: int, generation: int, state: int) -> None:
        i = slot * HEADER_CELL
        self.header.cells[i] = generation
        self.header.cells[i + 1] = state

    # -- peers ---------------------------------------------------------------------------

    def refresh_peers(self) -> None:
        """Meet processes that joined since the last look: one stat when nothing changed.

        Directory times are coarse (a clock tick), so a listing taken less than a tick after
        the last change may miss a process that joined in the same tick: while the change is
        recent, list again every time."""
        try:
            mtime = os.stat(self._procs_dir).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._peers_mtime and time.time_ns() - mtime > 50_000_000:
            return
        with self.lock:
            self._peers_mtime = mtime
            for name in os.listdir(self._procs_dir):
                if not name.isdigit():
                    continue
                index = int(name)
                if index == self.index or index in self.peers:
                    continue
                self.peers[index] = self._open_peer(index)

    def peer(self, index: int) -> Peer:
        p = self.peers.get(index)
        if p is None:
            self._peers_mtime = 0
            self.refresh_peers()
            p = self.peers.get(index)
            if p is None:
                p = Peer(index, -1, None, None, -1)
                p.dead = True
        return p

    def _open_peer(self, index: int) -> Peer:
        try:
            with open(os.path.join(self.job_dir, "procs", str(index))) as f:
                info = json.load(f)
        except (OSError, ValueError):
            p = Peer(index, -1, None, None, -1)
            p.dead = True
            return p
        pid = info["pid"]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        try:
            flags = os.O_RDONLY | os.O_CLOEXEC
            holds = _Table(MAX_PROCS * MAX_SLOTS * HOLD_CELL, fd=os.open(f"/proc/{pid}/fd/{info['holds_fd']}", flags))
            header = _Table(MAX_SLOTS * HEADER_CELL, fd=os.open(f"/proc/{pid}/fd/{info['header_fd']}", flags))
        except (OSError, ValueError):
            if pidfd >= 0:
                os.close(pidfd)
            p = Peer(index, pid, None, None, -1)
            p.dead = True
            return p
        return Peer(index, pid, holds, header, pidfd)

    def unreferenced(self, slots: list[int]) -> list[int]:
        """Of our own ``slots``, those no live process holds a ref to (see module docstring).
        Call ``refresh_peers`` first."""
        tables = [self.holds.cells] + [p.holds.cells for p in list(self.peers.values())
                                       if p.holds is not None and p.alive()]
        base = self._owner_base
        out = []
        for slot in slots:
            i = base + slot * HOLD_CELL
            before = [t[i + 1] for t in tables]
            if any(t[i] for t in tables):
                continue
            if [t[i + 1] for t in tables] == before:
                out.append(slot)
        return out

    def holders(self, slot: int) -> int:
        """How many refs to our own object ``slot`` live processes hold, this one included.
        Exact for refs that stay put (a ref moving between processes is counted by its sender
        until the receiver has counted it, so the sum never drops below the truth)."""
        i = self._owner_base + slot * HOLD_CELL
        n = self.holds.cells[i]
        for p in list(self.peers.values()):
            holds = p.holds
            if holds is not None and p.alive():
                try:
                    n += holds.cells[i]
                except ValueError:      # its tables were just closed: it died
                    pass
        return n

    def close(self) -> None:
        try:
            os.unlink(os.path.join(self.job_dir, "procs", str(self.index)))
        except OSError:
            pass
        with self.lock:
            for p in self.peers.values():
                if p.pidfd >= 0:
                    os.close(p.pidfd)
                    p.pidfd = -1
                for t in (p.holds, p.header):
                    if t is not None:
                        t.close()
                p.holds = p.header = None
                p.dead = True
        with self.count_lock:
            self._busy = True       # late ObjectRef.__del__ calls are queued, never applied
            self.holds.close()
            self.header.close()
