"""``ta.Queue``: a multi-producer, multi-consumer queue in shared memory, passable to actors.

Box in the data flow::

    put(x) -> message pickler: tensors -> store.put -> refs (no tensor bytes in the queue)
        -> producers' lock -> frame [len, flags, pickle] into the ring -> head, nput += 1
        -> futex wake if a consumer sleeps
    get() -> consumers' lock -> frame out of the ring (unpickled under the lock if it carries
        refs, so the consumer counts its holds first) -> tail, nget += 1 -> wake a producer
        -> tensors are views of the producer's store (zero-copy)

The ring is a memfd segment of the process that created the queue (its *host*); every other
user maps it once through the store's mapping cache (``/proc/<host>/fd``, no fd kept). Producers are serialized by one robust,
process-shared pthread mutex in it and consumers by another, so a put and a get never wait
for each other, a free mutex costs no syscall, and a dead holder's mutex passes to the next
taker. Order is the ring's order: FIFO overall, so FIFO per producer.
``maxsize`` bounds the items in the queue (``put`` blocks: backpressure); the ring's bytes
bound it too (64 MiB, pickles only: tensors travel by ref). Each waiting side sleeps on a
futex and wakes every ``WAIT_SLICE_S`` to check that the host lives: when it dies, blocked and
later calls raise ``ActorDiedError`` within that slice.

Refs in flight: an item's refs are held by its producer until ``nget`` passes the item (the
consumer has counted its own holds by then), in a per-process table, so a producer's ``Queue``
object may go away before its items are read.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import pickle
import queue as std_queue
import struct
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from torchactors.errors import ActorDiedError
from torchactors.store import core, futex, serialize
from torchactors.store.refs import SerializationContext
from torchactors.store.segments import OwnSegment, Segment

RING_BYTES = 64 << 20           # sparse: only the pages a backlog touches use memory
HEADER = 4096
BOX_LIMIT = 1 << 20             # a pickle larger than this goes into the store, its ref into the ring
WAIT_SLICE_S = 0.02
HOST_CHECK_S = 0.05             # non-blocking calls look at the host at most this often
SPIN_S = 50e-6                  # poll a changing counter this long before sleeping on its futex
LOCK_SPINS = 20                 # tries at a held lock (each followed by a yield) before sleeping
MAGIC = 0x7461717565756531      # "taqueue1"

_MAGIC, _HEAD, _TAIL, _NPUT, _NGET, _MAXSIZE, _CAP, _CONS_WAITING, _PROD_WAITING = range(9)
_FRAME = struct.Struct("<II")   # payload length, flags
F_REFS, F_BOXED, F_WRAP = 1, 2, 4
_PRODUCERS, _CONSUMERS = 0, 1   # the two sides


class Full(std_queue.Full):
    """The queue is full (``put_nowait``, or ``put`` past its timeout)."""


class Empty(std_queue.Empty):
    """The queue is empty (``get_nowait``, or ``get`` past its timeout)."""


_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier (a lock's locked instruction): store before, load after."""
    _fence_lock.acquire()
    _fence_lock.release()


_libc = ctypes.CDLL(None, use_errno=True)
_EBUSY, _EOWNERDEAD = errno.EBUSY, errno.EOWNERDEAD
_MUTEX_AT = (1024, 1152)        # the two sides' pthread mutexes in the header page


def _init_mutex(addr: int) -> None:
    """A process-shared, robust pthread mutex at ``addr``: no syscall when free, a futex
    sleep when held, and the next taker is told (EOWNERDEAD) when its holder died."""
    attr = ctypes.create_string_buffer(64)
    for rc in (_libc.pthread_mutexattr_init(attr), _libc.pthread_mutexattr_setpshared(attr, 1),
               _libc.pthread_mutexattr_setrobust(attr, 1), _libc.pthread_mutex_init(ctypes.c_void_p(addr), attr)):
        if rc:
            raise OSError(rc, f"cannot make the queue's process-shared mutex: {os.strerror(rc)}")
    _libc.pthread_mutexattr_destroy(attr)


def _acquire(mutex: ctypes.c_void_p) -> None:
    """Take a side's mutex. Holders keep it for a few microseconds, so a taker retries
    (yielding the core) before it sleeps: a sleep and wake-up costs 30-40 us on these VMs."""
    for _ in range(LOCK_SPINS):
        rc = _libc.pthread_mutex_trylock(mutex)
        if rc != _EBUSY:
            break
        os.sched_yield()
    else:
        rc = _libc.pthread_mutex_lock(mutex)
    if rc == _EOWNERDEAD:
        # Its holder died inside: the ring is still whole (head and counters are written
        # after the bytes they cover), so carry on.
        _libc.pthread_mutex_consistent(mutex)
    elif rc:
        raise OSError(rc, f"cannot take the queue's mutex: {os.strerror(rc)}")


def _release(mutex: ctypes.c_void_p) -> None:
    _libc.pthread_mutex_unlock(mutex)


class _Ring:
    """One process's handle on a queue's ring: its segment (the host's own, or a mapping of
    it from the store's ``MappingCache``), and the cells and mutexes in its header."""

    def __init__(self, seg: Segment, record: tuple, host: bool) -> None:
        self.seg = seg
        self.record = record        # (host index, host pid, fd number in the host, inode)
        self.host = host
        self.shared = False         # the host keeps the ring for the job once it was sent
        self.mm: Any = seg.mm       # a ctypes char array: its slices read and write bytes
        self.cells = memoryview(self.mm).cast("B").cast("q")
        self.base = seg.base
        self.mutexes = (ctypes.c_void_p(self.base + _MUTEX_AT[0]), ctypes.c_void_p(self.base + _MUTEX_AT[1]))
        self.key = (record[1], record[3])
        self.store = core.current()
        self._checked = 0.0
        self._dead: ActorDiedError | None = None

    def addr(self, cell: int) -> int:
        return self.base + cell * 8

    def check_host(self, force: bool = False) -> None:
        if self.host:
            return
        if self._dead is not None:
            raise self._dead
        now = time.monotonic()
        if not force and now - self._checked < HOST_CHECK_S:
            return
        self._checked = now
        index, pid = self.record[0], self.record[1]
        peer = core.current().membership.peer(index)
        if peer.pid != pid or not peer.alive():
            self._dead = ActorDiedError(f"queue host (process {index}, pid {pid})",
                                        detail="the process that created this ta.Queue died, and the queue "
                                               "with it; create a new one in a process that outlives its users")
            _in_flight.pop(self.key, None)
            raise self._dead

    def _sleep(self, side: int, waiting: int, word: int, seen: int, deadline: float | None) -> bool:
        """Called with ``side``'s lock held after seeing ``word == seen``: sleep until it changes
        (or a slice passes); returns False once ``deadline`` passed. Leaves the lock held."""
        left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
        if left <= 0:
            return False
        cells = self.cells
        cells[waiting] += 1
        _release(self.mutexes[side])
        try:
            _fence()
            spin_until = time.perf_counter() + SPIN_S
            while cells[word] == seen and time.perf_counter() < spin_until:
                os.sched_yield()
            if cells[word] == seen:
                futex.wait(self.addr(word), futex.low32(seen), left)
            self.check_host(force=True)
        finally:
            _acquire(self.mutexes[side])
            cells[waiting] -= 1
        return True

    def _wake(self, waiting: int, word: int) -> None:
        _fence()
        if self.cells[waiting] > 0:
            futex.wake(self.addr(word))

    # -- producers -----------------------------------------------------------------------------

    def put(self, frames: list[tuple[bytes, int, list]], block: bool, deadline: float | None) -> None:
        """Append ``frames`` (payload, flags, refs to hold) atomically, in order."""
        self.check_host()
        cells = self.cells
        cap = cells[_CAP]
        maxsize = cells[_MAXSIZE]
        n = len(frames)
        mutex = self.mutexes[_PRODUCERS]
        _acquire(mutex)
        try:
            while True:
                nput = cells[_NPUT]
                if not maxsize or nput - cells[_NGET] + n <= maxsize:
                    head = self._fit(frames, cells[_HEAD], cells[_TAIL], cap)
                    if head is not None:
                        break
                if not block or not self._sleep(_PRODUCERS, _PROD_WAITING, _NGET, cells[_NGET], deadline):
                    raise Full(f"the queue is full ({nput - cells[_NGET]} items, maxsize {maxsize})")
            mm = self.mm
            for payload, flags, _ in frames:
                at = head % cap
                if at + _FRAME.size + len(payload) > cap:
                    _FRAME.pack_into(mm, HEADER + at, 0, F_WRAP)
                    head += cap - at
                    at = 0
                _FRAME.pack_into(mm, HEADER + at, len(payload), flags)
                mm[HEADER + at + 8:HEADER + at + 8 + len(payload)] = payload
                head += _FRAME.size + (len(payload) + 7) // 8 * 8
            cells[_HEAD] = head
            cells[_NPUT] = nput + n             # after the bytes: consumers may read them now
            held = [(nput + i + 1, refs) for i, (_, _, refs) in enumerate(frames) if refs]
        finally:
            _release(mutex)
        self._wake(_CONS_WAITING, _NPUT)
        if held:
            _in_flight.setdefault(self.key, collections.deque()).extend(held)
        self.drop_consumed()

    @staticmethod
    def _fit(frames: list, head: int, tail: int, cap: int) -> int | None:
        """``head`` if all frames fit in the free space (wrap gaps included), else None."""
        end = head
        for payload, _, _ in frames:
            size = _FRAME.size + (len(payload) + 7) // 8 * 8
            if size > cap:
                raise ValueError(f"an item of {len(payload)} bytes does not fit in the queue's ring")
            at = end % cap
            if at + size > cap:
                end += cap - at
            end += size
        return head if end - tail <= cap else None

    def drop_consumed(self) -> None:
        """Let go of the refs of this process's items that consumers have taken."""
        held = _in_flight.get(self.key)
        if held:
            nget = self.cells[_NGET]
            while held and held[0][0] <= nget:
                held.popleft()

    # -- consumers -----------------------------------------------------------------------------

    def get(self, n: int, block: bool, deadline: float | None) -> list:
        """Take exactly ``n`` items (all or none)."""
        self.check_host()
        cells = self.cells
        cap = cells[_CAP]
        values: list = []
        raw: list = []          # (index, payload, flags) of items to unpickle after the lock
        mutex = self.mutexes[_CONSUMERS]
        _acquire(mutex)
        try:
            while True:
                nget = cells[_NGET]
                if cells[_NPUT] - nget >= n:
                    break
                if not block or not self._sleep(_CONSUMERS, _CONS_WAITING, _NPUT, cells[_NPUT], deadline):
                    raise Empty(f"the queue has {cells[_NPUT] - nget} items, fewer than the {n} asked for")
            mm = self.mm
            tail = cells[_TAIL]
            for i in range(n):
                at = tail % cap
                length, flags = _FRAME.unpack_from(mm, HEADER + at)
                if flags & F_WRAP:
                    tail += cap - at
                    at = 0
                    length, flags = _FRAME.unpack_from(mm, HEADER + at)
                payload = mm[HEADER + at + 8:HEADER + at + 8 + length]
                if flags & F_REFS:
                    # Unpickled here, so that our holds are counted before nget tells the
                    # item's producer to drop its own.
                    values.append(_load_or_fail(payload, flags))
                else:
                    values.append(None)
                    raw.append((i, payload, flags))
                tail += _FRAME.size + (length + 7) // 8 * 8
            cells[_TAIL] = tail
            nget += n
            cells[_NGET] = nget
            left = cells[_NPUT] - nget
            room = (left <= cells[_MAXSIZE] // 2) if cells[_MAXSIZE] else (cells[_HEAD] - tail <= cap // 2)
        finally:
            _release(mutex)
        if room:
            # Producers wait until the queue is half empty, not for every slot: one wake-up
            # (30-40 us here) per half a queue, not per item. A producer whose room came
            # earlier finds it at its next slice.
            self._wake(_PROD_WAITING, _NGET)
        for i, payload, flags in raw:
            values[i] = _load_or_fail(payload, flags)
        for v in values:
            if type(v) is _Failed:
                raise v.error       # the item is taken either way: a queue never jams on one
        return values

    def qsize(self) -> int:
        self.check_host()
        self.drop_consumed()
        return max(0, self.cells[_NPUT] - self.cells[_NGET])

    def close(self) -> None:
        """The host lets go of its fd: no new process can open the ring (mappings stay)."""
        self.seg.close()


class _Boxed:
    """What the ring carries for a large item: the ref of a store object holding it."""

    __slots__ = ("ref",)

    def __init__(self, ref: Any) -> None:
        self.ref = ref


_PLAIN = (bytes, str, int, float, bool, type(None))


def _dump(item: Any, store: core.Store) -> tuple[bytes, int, list]:
    if type(item) in _PLAIN:         # no tensor, no ref: skip the message pickler
        payload = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) <= BOX_LIMIT:
            return payload, 0, []
    with SerializationContext() as ctx:
        payload = serialize.dumps_message(item, store.put)
        flags = 0
        if len(payload) > BOX_LIMIT:
            payload = pickle.dumps(_Boxed(store.put(item)), protocol=pickle.HIGHEST_PROTOCOL)
            flags = F_BOXED
    return payload, flags | (F_REFS if ctx.refs else 0), ctx.refs


class _Failed:
    """An item that could not be rebuilt (its tensors' owner died, ...): raised to the taker."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _load_or_fail(payload: bytes, flags: int) -> Any:
    try:
        return _load(payload, flags)
    except Exception as exc:
        return _Failed(exc)


def _load(payload: bytes, flags: int) -> Any:
    value = pickle.loads(payload)
    if flags & F_BOXED:
        return core.current().get(value.ref)
    return value


# -- this process's rings ------------------------------------------------------------------------

_in_flight: dict[tuple, collections.deque] = {}        # ring key -> (item number, refs held)
_hosted: dict[tuple, _Ring] = {}                        # rings this process hosts and has sent
_attached: weakref.WeakValueDictionary[tuple, _Ring] = weakref.WeakValueDictionary()
_rings_lock = threading.Lock()


def _create(maxsize: int) -> _Ring:
    store = core.current()
    seg = OwnSegment("queue", HEADER + RING_BYTES)
    ring = _Ring(seg, (store.index, os.getpid(), seg.fd, seg.inode), host=True)
    for side in (_PRODUCERS, _CONSUMERS):
        _init_mutex(ring.base + _MUTEX_AT[side])
    cells = ring.cells
    cells[_CAP] = RING_BYTES
    cells[_MAXSIZE] = maxsize
    cells[_MAGIC] = MAGIC
    return ring


def _attach(record: tuple) -> _Ring:
    index, pid, fd_number, inode = record
    key = (pid, inode)
    with _rings_lock:
        ring = _hosted.get(key) or _attached.get(key)
        if ring is not None:
            return ring
        seg = core.current().maps.map(pid, fd_number, inode, 0, HEADER + RING_BYTES)     # mapped once per process
        if seg is None:
            raise ActorDiedError(f"queue host (process {index}, pid {pid})",
                                 detail="the process that created this ta.Queue is gone, and the queue with it")
        ring = _Ring(seg, record, host=False)
        _attached[key] = ring
        return ring


def _rebuild_queue(record: tuple, maxsize: int) -> Queue:
    q = Queue.__new__(Queue)
    q._ring = _attach(record)
    q.maxsize = maxsize
    return q


class Queue:
    """A FIFO queue any process of the job can put to and get from (pass it to actors).

    ``maxsize=0`` is unbounded (in items; the ring's 64 MiB of pickles bound it too).
    Tensors travel by ref: a consumer's tensor is a view of the producer's store. ``put``
    blocks while the queue is full, ``get`` while it is empty; ``put_nowait``/``get_nowait``
    raise ``queue.Full``/``queue.Empty``. If the process that created the queue dies, blocked
    and later calls raise ``ActorDiedError``. Keep the queue alive in its creating process while
    others use it (a queue it has sent stays alive there until the job ends).
    """

    def __init__(self, maxsize: int = 0) -> None:
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an int >= 0 (0 = unbounded), not {maxsize!r}")
        self.maxsize = maxsize
        self._ring = _create(maxsize)
        weakref.finalize(self, _release_hosted, self._ring)

    def __reduce__(self) -> tuple:
        ring = self._ring
        if ring.host and not ring.shared:
            ring.shared = True
            with _rings_lock:
                for key in [k for k, r in _hosted.items() if r.store.closed]:
                    _hosted.pop(key).close()        # rings of a job that ended
                    _in_flight.pop(key, None)
                _hosted[ring.key] = ring
        return _rebuild_queue, (ring.record, self.maxsize)

    def __repr__(self) -> str:
        return f"Queue(maxsize={self.maxsize}, host pid {self._ring.record[1]})"

    # -- put ------------------------------------------------------------------------------------

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``; blocks while the queue is full (``queue.Full`` after ``timeout``)."""
        self.put_many([item], block, timeout)

    def put_nowait(self, item: Any) -> None:
        self.put_many([item], block=False)

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: float | None = None) -> None:
        """Append all ``items`` at once, in order (all or none: ``queue.Full`` if they do not
        fit in time). One lock and one wake-up for the whole batch."""
        frames = [_dump(x, core.current()) for x in items]
        if not frames:
            return
        if self.maxsize and len(frames) > self.maxsize:
            raise ValueError(f"put_many of {len(frames)} items can never fit a queue of maxsize {self.maxsize}; "
                             f"put them in batches of at most {self.maxsize}")
        self._ring.put(frames, block, _deadline(block, timeout))

    def put_nowait_batch(self, items: Iterable[Any]) -> None:
        """Ray's name for ``put_many(items, block=False)``."""
        self.put_many(items, block=False)

    # -- get ------------------------------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take the oldest item; blocks while the queue is empty (``queue.Empty`` after ``timeout``)."""
        return self._ring.get(1, block, _deadline(block, timeout))[0]

    def get_nowait(self) -> Any:
        return self._ring.get(1, False, None)[0]

    def get_many(self, n: int, block: bool = True, timeout: float | None = None) -> list:
        """Take the ``n`` oldest items at once (all or none: blocks until ``n`` are there;
        ``queue.Empty`` if they are not in time, or at once with ``block=False``)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"get_many needs a count >= 0, not {n!r}")
        if self.maxsize and n > self.maxsize:
            raise ValueError(f"get_many({n}) can never be met by a queue of maxsize {self.maxsize}")
        if n == 0:
            return []
        return self._ring.get(n, block, _deadline(block, timeout))

    def get_nowait_batch(self, n: int) -> list:
        """Ray's name for ``get_many(n, block=False)``."""
        return self.get_many(n, block=False)

    # -- size -----------------------------------------------------------------------------------

    def qsize(self) -> int:
        """Items in the queue now (others may change it at once)."""
        return self._ring.qsize()

    size = qsize

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self.maxsize) and self.qsize() >= self.maxsize


def _deadline(block: bool, timeout: float | None) -> float | None:
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be a non-negative number or None")
    return None if not block or timeout is None else time.monotonic() + timeout


def _release_hosted(ring: _Ring) -> None:
    """The host's Queue object is gone: close the ring unless it was sent to others."""
    if not ring.shared:
        ring.close()
