"""Job membership and the per-process hold tables that count refs across processes.

Box in the data flow: every process of a job has an index, a file ``procs/<index>`` in the
job directory, and two memfd tables that only it writes:

- a *hold table*: for every (owner index, slot) the number of ``ObjectRef``s this process
  holds (``live``) and how many it ever acquired (``acquired``, monotonic);
- a *header table*: for each slot this process owns, the object's generation, state and
  where its bytes are (fd, offset, size, a signature of its layout), so a reader can tell a freed
  object from a live one, and a ref that does not match the object it names from one that does.

Indices are reused: a process claims the lowest index no live process holds. Generations of
a process start at a random base, so a ref of an earlier process at the same index (a stale
ref) never names an object of the new one.

An owner decides an object is unreferenced by reading its column in every live peer's
hold table. Since each cell has one writer, no atomics are needed; the ``acquired`` counter
read before and after the ``live`` counts detects a ref that moved during the scan (a holder
only drops a ref after the next holder has counted it). A dead peer's holds are ignored, which
is how everything a killed process held is released at once. x86-64 store ordering assumed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import select
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable

from torchactors.errors import UnsafeDirectoryError
from torchactors.store.segments import Mapping

logger = logging.getLogger(__name__)

MAX_PROCS = 1024          # process indices per job
MAX_SLOTS = 1 << 16       # live objects per owner
HOLD_CELL = 3             # int64 cells per (owner, slot): live, acquired, freed generation
HEADER_CELL = 6           # int64 cells per slot: generation, state, fd, offset, nbytes, meta signature
FREE_EPOCH = 0            # header slot 0 is not an object: cell 0 counts free() calls made here

STATE_EMPTY, STATE_LIVE, STATE_FREED = 0, 1, 2


def _base_dir() -> str:
    """This user's directory of job directories, ``$XDG_RUNTIME_DIR`` (or the temporary
    directory) ``/torchactors-<uid>``: created 0700 if absent, refused if another user could
    change what is inside it (see docs/design.md, Security)."""
    root = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(root, f"torchactors-{os.getuid()}")
    if not os.path.isdir(root):
        os.makedirs(root, mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def check_private_dir(path: str) -> None:
    """Raise UnsafeDirectoryError (a PermissionError) unless ``path`` is a real directory
    that only this user can change, in a parent where nobody else can rename it away."""
    uid = os.getuid()
    st = os.lstat(path)
    parent = os.stat(os.path.dirname(path) or ".")
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != uid:
        problem = f"is owned by uid {st.st_uid}, not by you (uid {uid})"
    elif st.st_mode & 0o022:
        problem = f"can be written by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    elif parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        problem = "is in a directory that anyone can write and that has no sticky bit"
    else:
        return
    raise UnsafeDirectoryError(path, problem)


def sweep_stale_jobs() -> int:
    """Remove job directories whose driver is gone (left by a SIGKILLed driver). Only our
    own real directories: never follow a link out of the base directory."""
    base = _base_dir()
    removed = 0
    for name in os.listdir(base):
        pid = name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            path = os.path.join(base, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """Is a process with this pid running (or a zombie)? True for another user's process."""
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


def _table_error(index: int, pid: int, e: OSError) -> Exception:
    from torchactors.store.segments import fd_limit_error, map_error
    size = (MAX_SLOTS * HOLD_CELL + MAX_SLOTS * HEADER_CELL) * 8
    if e.errno in (errno.EMFILE, errno.ENFILE):
        err = fd_limit_error(size, 0, 0)
    else:
        err = map_error(size, 0, 0, e.errno or errno.ENOMEM)
    err.args = (f"cannot read the tables of process {index} (pid {pid}), which is alive: {err.args[0]}",)
    return err


class _Table:
    """A memfd of int64 cells, written by its creator and read by peers (a window of it:
    ``first`` cell on). Mapped with libc (no descriptor kept); the mapping goes with the last
    reference to ``cells``, so a reader racing a ``close`` reads valid memory, never freed."""

    def __init__(self, ncells: int, fd: int | None = None, first: int = 0) -> None:
        self.owned = fd is None
        if fd is None:
            fd = os.memfd_create(f"torchactors-table-{os.getpid()}", os.MFD_CLOEXEC)
            try:
                os.fchmod(fd, 0o600)
                os.ftruncate(fd, ncells * 8)      # sparse: only touched pages use memory
            except BaseException:
                os.close(fd)
                raise
        self.fd = fd
        try:
            mapping = Mapping(fd, ncells * 8, first * 8, populate=False, writable=self.owned)
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise
        self.cells = mapping.buffer(ctypes.c_int64)
        if not self.owned:
            os.close(fd)
            self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Peer:
    """Another process of the job as this process sees it: its header table, the window of
    its hold table that counts this process's objects (``holds``), other owners' windows
    when needed, and its liveness. ``error`` is set when its tables could not be mapped: it
    may be alive, so nothing it might hold is released, and reads of its objects raise it."""

    __slots__ = ("index", "pid", "holds", "header", "pidfd", "dead", "holds_fd", "columns", "error")

    def __init__(self, index: int, pid: int, holds: _Table | None, header: _Table | None,
                 pidfd: int, holds_fd: int = -1) -> None:
        self.index = index
        self.pid = pid
        self.holds = holds
        self.header = header
        self.pidfd = pidfd
        self.dead = False
        self.holds_fd = holds_fd                # the number in the peer's own fd table
        self.columns: dict[int, _Table] = {}    # owner index -> window of the peer's hold table
        self.error: Exception | None = None

    def column(self, owner: int) -> _Table | None:
        """The peer's hold counts of ``owner``'s objects (mapped on first use), or None."""
        table = self.columns.get(owner)
        if table is None and not self.dead and self.holds is not None:
            try:
                fd = os.open(f"/proc/{self.pid}/fd/{self.holds_fd}", os.O_RDONLY | os.O_CLOEXEC)
                table = self.columns[owner] = _Table(MAX_SLOTS * HOLD_CELL, fd=fd, first=owner * MAX_SLOTS * HOLD_CELL)
            except OSError:
                return None
        return table

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.holds = self.header = None
        self.columns = {}
        self.dead = True

    def alive(self) -> bool:
        if self.dead:
            return False
        if self.pidfd >= 0:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
            if readable:
                self.dead = True
        elif not pid_alive(self.pid):
            self.dead = True
        if self.dead and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return not self.dead


class Membership:
    """This process's place in a job: its index and tables, and the peers it has met."""

    def __init__(self, job_dir: str, index: int | None = None) -> None:
        self.job_dir = job_dir
        self.holds = _Table(MAX_PROCS * MAX_SLOTS * HOLD_CELL)
        self.header = _Table(MAX_SLOTS * HEADER_CELL)
        self.index = self._claim_index(index)
        self.gen_base = secrets.randbits(40) << 16     # this incarnation's generations start here
        self.peers: dict[int, Peer] = {}
        self._peers_mtime = 0
        self._replaced: list[int] = []      # pids of dead peers a new process at their index replaced
        self._procs_dir = os.path.join(job_dir, "procs")
        self.lock = threading.Lock()
        self.count_lock = threading.Lock()
        self._busy = False
        self._deferred: list[int] = []
        self._owner_base = self.index * MAX_SLOTS * HOLD_CELL
        self.on_new_peer: Callable[[], None] | None = None     # the store's watcher wants to know

    def _claim_index(self, hint: int | None) -> int:
        """The lowest free index from ``hint`` on; an index whose process died is free again."""
        procs = os.path.join(self.job_dir, "procs")
        info = json.dumps({"pid": os.getpid(), "holds_fd": self.holds.fd, "header_fd": self.header.fd})
        tmp = os.path.join(procs, f".claim-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(info)
        try:
            start = hint if hint is not None else 0
            for index in range(start, MAX_PROCS):
                path = os.path.join(procs, str(index))
                try:
                    os.link(tmp, path)      # atomic claim, complete content
                    return index
                except FileExistsError:
                    pass
                if self._take_over(path):
                    try:
                        os.link(tmp, path)
                        return index
                    except FileExistsError:
                        pass
        finally:
            os.unlink(tmp)
        raise RuntimeError(f"job {self.job_dir} has {MAX_PROCS} live processes, the most it can hold")

    @staticmethod
    def _take_over(path: str) -> bool:
        """Free ``path``'s index if its process is dead (a SIGKILLed process leaves its file).
        The rename succeeds for one claimer only."""
        try:
            with open(path) as f:
                pid = json.load(f)["pid"]
        except (OSError, ValueError, KeyError):
            return False
        if pid_alive(pid):
            return False
        dead = f"{path}.dead-{os.getpid()}"
        try:
            os.rename(path, dead)
        except OSError:
            return False
        try:
            with open(dead) as f:
                if json.load(f)["pid"] != pid:      # a live claimer got there in between: give it back
                    os.rename(dead, path)
                    return False
        except (OSError, ValueError, KeyError):
            pass
        try:
            os.unlink(dead)
        except OSError:
            pass
        return True

    def valid(self, owner: int, slot: int) -> bool:
        """Does (owner, slot) name a cell of the hold tables?"""
        return 0 <= owner < MAX_PROCS and 0 < slot < MAX_SLOTS

    def next_gen(self, slot: int) -> int:
        last = self.header.cells[slot * HEADER_CELL]
        return (last if last > self.gen_base else self.gen_base) + 1

    # -- this process's own counters -------------------------------------------------

    def hold(self, owner: int, slot: int) -> None:
        """Count one more ref to (owner, slot) held here: live first, then acquired."""
        i = (owner * MAX_SLOTS + slot) * HOLD_CELL
        with self.count_lock:
            self._busy = True
            cells = self.holds.cells
            cells[i] += 1
            cells[i + 1] += 1
            if self._deferred:
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
            if self._deferred:
                self._drain()
            self._busy = False
            return left

    def _drain(self) -> None:
        cells = self.holds.cells
        while self._deferred:
            cells[self._deferred.pop()] -= 1

    def held_here(self, slot: int) -> int:
        """How many refs to our own object ``slot`` this process holds."""
        return self.holds.cells[self._owner_base + slot * HOLD_CELL]

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
        i = slot * HOLD_CELL + 2
        for p in list(self.peers.values()):
            if not p.dead:
                column = p.holds if owner == self.index else p.column(owner)
                if column is not None and column.cells[i] == generation and p.alive():
                    return True
        return False

    def replaced_peers(self) -> bool:
        """Whether a new process took the index of a peer before ``drop_dead_peers`` saw it dead
        (its pid is then reported by the next ``drop_dead_peers``)."""
        return bool(self._replaced)

    def drop_dead_peers(self) -> list[int]:
        """Unmap the tables of peers that died (their holds no longer count); their pids."""
        with self.lock:
            dead, self._replaced = self._replaced, []   # replaced before anyone saw them dead
            for p in self.peers.values():
                if p.holds is not None and not p.alive():
                    p.close()
                    dead.append(p.pid)
        return dead

    def free_epochs(self) -> tuple:
        """A fingerprint of every peer's free() count: changes when someone frees something.
        Call ``refresh_peers`` first."""
        return tuple((p.index, p.header.cells[FREE_EPOCH]) for p in list(self.peers.values())
                     if p.header is not None and not p.dead)

    def set_header(self, slot: int, generation: int, state: int) -> None:
        i = slot * HEADER_CELL
        self.header.cells[i] = generation
        self.header.cells[i + 1] = state

    def set_live(self, slot: int, generation: int, fd: int, offset: int, nbytes: int, signature: int) -> None:
        """Publish a new object: its generation, state and where its bytes are (see the
        module docstring). Readers only see it once they hold its ref, after this returns."""
        i = slot * HEADER_CELL
        self.header.cells[i:i + HEADER_CELL] = [generation, STATE_LIVE, fd, offset, nbytes, signature]

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
                known = self.peers.get(index)
                if index == self.index or (known is not None and known.alive()):
                    continue
                peer = self._open_peer(index)
                if known is None or peer.pid != known.pid:     # new, or a new process at a reused index
                    if known is not None:
                        if known.holds is not None:         # not yet reported by drop_dead_peers
                            self._replaced.append(known.pid)
                        known.close()
                    self.peers[index] = peer
                    if self.on_new_peer is not None:
                        self.on_new_peer()
                else:
                    peer.close()

    def peer(self, index: int, pid: int = 0) -> Peer:
        """The process at ``index``; when ``pid`` is given and is not the one we know there, look
        again (a process that joined at a reused index)."""
        p = self.peers.get(index)
        if p is None or (pid and p.pid != pid):
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
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            holds = _Table(MAX_SLOTS * HOLD_CELL, fd=os.open(f"/proc/{pid}/fd/{info['holds_fd']}", flags),
                           first=self._owner_base)
            header = _Table(MAX_SLOTS * HEADER_CELL, fd=os.open(f"/proc/{pid}/fd/{info['header_fd']}", flags))
        except OSError as e:
            p = Peer(index, pid, None, None, pidfd)
            if e.errno in (errno.ENOENT, errno.ESRCH, errno.EACCES) or not p.alive():
                p.close()                   # it is gone (its fds with it)
            else:
                p.error = _table_error(index, pid, e)
                logger.warning("%s", p.error)
            return p
        return Peer(index, pid, holds, header, pidfd, info["holds_fd"])

    def retry_unmapped(self) -> None:
        """Peers whose tables could not be mapped: try again (memory may have been freed)."""
        for index, p in list(self.peers.items()):
            if p.error is not None and p.alive():
                again = self._open_peer(index)
                if again.error is None:
                    p.close()
                    self.peers[index] = again

    def unreferenced(self, slots: list[int]) -> list[int]:
        """Of our own ``slots``, those no live process holds a ref to (see module docstring).
        Call ``refresh_peers`` first."""
        peers = [p for p in list(self.peers.values()) if p.alive()]
        if any(p.error is not None for p in peers):
            self.retry_unmapped()
            if any(p.error is not None and p.alive() for p in list(self.peers.values())):
                return []       # a live peer we cannot read may hold any of them: release nothing
            peers = [p for p in list(self.peers.values()) if p.alive()]
        base = self._owner_base
        tables = [(self.holds.cells, base)] + [(p.holds.cells, 0) for p in peers if p.holds is not None]
        out = []
        for slot in slots:
            offs = slot * HOLD_CELL
            before = [t[b + offs + 1] for t, b in tables]
            if any(t[b + offs] for t, b in tables):
                continue
            if [t[b + offs + 1] for t, b in tables] == before:
                out.append(slot)
        return out

    def holders(self, slot: int) -> int:
        """How many refs to our own object ``slot`` live processes hold, this one included.
        Exact for refs that stay put (a ref moving between processes is counted by its sender
        until the receiver has counted it, so the sum never drops below the truth)."""
        i = slot * HOLD_CELL
        n = self.holds.cells[self._owner_base + i]
        for p in list(self.peers.values()):
            holds = p.holds             # a peer's table as mapped here: only our objects' column
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
                p.close()
        with self.count_lock:
            self._busy = True       # late ObjectRef.__del__ calls are queued, never applied
            self.holds.close()
            self.header.close()
