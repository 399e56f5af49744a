"""The store of one process: ``put``, ``get``, ``free``, ``wait``, ``stats``.

Box in the data flow::

    put(t) -> BY_DEVICE[t's device].put (a structure: the store pickler) -> pool block (copy once)
        -> ObjectRef(owner, slot, gen, Location, meta record)
    ObjectRef --(any message)--> get(ref) -> check_live -> mapping cache -> KINDS[type(meta)].rebuild
        -> a view of the same bytes (no copy)
    last ref dropped here, never exported -> released at the next put (block reused hot)
    last ref dropped everywhere -> owner's reclaim pass -> block back to the pool

Every process of a job has one ``Store``. It owns the objects it put (Ray's ownership model)
in a ``SegmentPool``, maps other owners' segments through a ``MappingCache``, and counts the
refs it holds in the job's hold tables (``registry.Membership``).
"""

from __future__ import annotations

import atexit
import copy as copy_module
import ctypes
import logging
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchactors._util import parse_size
from torchactors.errors import ObjectFreedError, OwnerDiedError, StoreFullError
from torchactors.store import _current, registry, serialize
from torchactors.store._current import active
from torchactors.store.records import (
    BY_DEVICE,
    KINDS,
    Kind,
    Location,
    Meta,
    PickledMeta,
    Placed,
    TensorMeta,
    ValueMeta,
    register,
)
from torchactors.store.refs import ObjectRef, SerializationContext
from torchactors.store.segments import PAGE, MappingCache, Segment, SegmentPool, shared_file, size_class
from torchactors.store.watcher import Watcher

__all__ = ["Store", "current", "attach", "active", "parse_size", "default_capacity", "pinned_buffer",
           "make_storage", "contiguous_strides"]

logger = logging.getLogger(__name__)

INLINE_LIMIT = 1024     # skeletons up to this size, with no tensor bytes, ride inside the ref


def default_capacity() -> int:
    """4 GiB, or a quarter of RAM if that is smaller (memfd memory is RAM, not /dev/shm)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 16 << 30
    return min(4 << 30, ram // 4)


class _Entry:
    """An object this process owns."""

    __slots__ = ("gen", "seg", "offset", "cls", "keep", "external", "loc", "meta", "exported")

    def __init__(self, gen: int, seg: Any, offset: int, cls: int, keep: Any, external: bool,
                 loc: Location | None, meta: Meta) -> None:
        self.gen = gen
        self.loc = loc              # the ref's loc and meta as put: a ref that differs is not this object's
        self.meta = meta
        self.seg = seg
        self.offset = offset
        self.cls = cls
        self.keep = keep            # nested refs / shared tensors that must live as long as the object
        self.external = external    # bytes in a storage torch already shares (not a pool block)
        self.exported = False       # a ref to it was pickled: other processes may hold it


def pinned_buffer(seg: Segment, offset: int, nbytes: int, pin: Any) -> Any:
    """A buffer over ``nbytes`` of ``seg`` at ``offset`` that keeps ``pin`` (the ref) alive:
    torch keeps the buffer alive as long as any tensor views it, so the object lives too."""
    buf: Any = (ctypes.c_char * nbytes).from_buffer(seg.mm, offset)
    buf.pin = pin
    return buf


def pinned_view(seg: Segment, offset: int, count: int, dtype: torch.dtype, pin: Any) -> torch.Tensor:
    """A flat tensor over ``count`` elements of ``seg`` at byte ``offset`` whose storage keeps
    ``pin`` (the ref) alive: the storage holds the segment's buffer (so the mapping stays), and
    torch keeps a storage's Python object, with its attributes, as long as any tensor views it.
    Half the cost of a ``pinned_buffer`` per get (no ctypes array per object)."""
    flat = torch.frombuffer(seg.mm, dtype=dtype, count=count, offset=offset)
    storage: Any = flat.untyped_storage()
    storage._torchactors_ref = pin
    return flat


def make_storage(seg: Segment, offset: int, nbytes: int, pin: Any) -> torch.UntypedStorage:
    if nbytes == 0:
        return torch.UntypedStorage(0)
    return pinned_view(seg, offset, nbytes, torch.uint8, pin).untyped_storage()


_strides_cache: dict[tuple, tuple] = {}


def contiguous_strides(shape: tuple) -> tuple:
    """The strides of a contiguous tensor of ``shape`` (cached: hot shapes repeat)."""
    strides = _strides_cache.get(shape)
    if strides is None:
        acc, out = 1, []
        for n in reversed(shape):
            out.append(acc)
            acc *= max(n, 1)
        strides = tuple(reversed(out))
        if len(_strides_cache) < 4096:
            _strides_cache[shape] = strides
    return strides


def _owner_died(ref: ObjectRef) -> OwnerDiedError:
    return OwnerDiedError(ref.id, f"process {ref.owner} (pid {ref.owner_pid})")


def _where(loc: Any, meta: Meta) -> tuple:
    """What the header table publishes of an object: fd, file offset, nbytes, signature of
    its meta (fd -1, offset and nbytes 0 for an object with no bytes)."""
    if loc is None:
        return (-1, 0, 0, meta.signature())
    if type(loc) is not Location:
        raise TypeError("not a Location")
    return (loc.fd, loc.file_off + loc.offset, loc.nbytes, meta.signature())


def _malformed(ref: Any, what: str) -> ValueError:
    return ValueError(f"{ref!r} is not a ref this store made ({what}); refs cannot be built or edited by hand")


class Store:
    """The store of one process of a job: the objects it owns, its view of everyone else's.

    Owns: a ``SegmentPool`` of memfd segments holding the objects this process put (Ray's
    ownership model: the putter owns), a slot per object in this process's header table, the
    hold table counting every ref this process holds (``registry.Membership``), a
    ``MappingCache`` of peers' segments it has read, and a ``Watcher`` thread started on first
    need. Created by ``attach`` (a process of a job) or ``current`` (standalone, its own job);
    it lives until ``close`` (``ta.shutdown``, or the process's exit), and a forked child never
    uses its parent's (see ``_current``).

    The reasons are in docs/design.md: "memfd segments, opened through /proc/<pid>/fd" (where
    bytes live), "Pooled, pre-faulted blocks" (the pool), "Counting refs without a server:
    single-writer hold tables" (when an object is free), "Tensors returned by `get` pin their
    object" and "The store: what comes back is what was put, and nothing outlives its use".
    """

    def __init__(self, job_dir: str | None = None, index: int | None = None,
                 capacity: int | None = None) -> None:
        self.own_job_dir = job_dir is None
        self.job_dir = job_dir or registry.create_job_dir()
        self.membership = registry.Membership(self.job_dir, index)
        self.job = os.path.basename(self.job_dir)      # named in every ref: refs of other jobs are refused
        self.index = self.membership.index
        self.pid = os.getpid()
        self._forks = _current.forks    # a forked child sees a larger count: never its store
        self.pool = SegmentPool(capacity or default_capacity())
        self.maps = MappingCache()
        self.entries: dict[int, _Entry] = {}
        self.free_slots = list(range(registry.MAX_SLOTS - 1, 0, -1))   # slot 0 holds the free epoch
        self.candidates: set[int] = set()      # owned objects no ref of this process holds
        self.quarantine: set[int] = set()      # freed slots that stale refs may still count
        self._free_epochs: tuple = ()
        self.lock = threading.RLock()
        self.closed = False
        self.watcher = Watcher(self)
        self.membership.on_new_peer = self.watcher.event.set
        self._holding = 0           # objects holding refs or storages that lost their last local ref
        self._unshared: list[tuple[int, int]] = []  # (slot, gen) no ref left here, none ever left: release
        logger.debug("store of process %d (index %d) in job %s, capacity %d bytes", self.pid, self.index, self.job,
                     self.pool.capacity)

    # -- put ------------------------------------------------------------------------------

    def put(self, obj: Any, timeout: float | None = None) -> ObjectRef:
        """Copy ``obj``'s tensor bytes once into shared memory and return its ref."""
        if isinstance(obj, torch.Tensor):
            if serialize.is_plain(obj):
                if obj.requires_grad:
                    serialize.check_shareable(obj)
                kind = BY_DEVICE.get("cpu" if obj.is_cpu else obj.device.type)     # is_cpu: no device object
                if kind is not None and kind.put is not None:
                    return self._register(kind.put(self, obj, timeout))
        elif isinstance(obj, ObjectRef):
            return obj
        return self._register(self._put_structure(obj, timeout))

    def put_empty(self, nbytes: int, timeout: float | None = None) -> ObjectRef:
        """A new object of ``nbytes`` uninitialized bytes (a flat uint8 tensor) for a buffer that
        its owner fills in place, e.g. a weights bucket: no source tensor to copy from."""
        seg, off, cls = self._allocate(nbytes, timeout)
        meta = TensorMeta("t", torch.uint8, (nbytes,), (1,), 0, nbytes, False, False)
        return self._register(Placed(seg, off, cls, None, meta, False))

    def _put_cpu_tensor(self, t: torch.Tensor, timeout: float | None) -> Placed:
        """``KINDS[TensorMeta].put``: one dense CPU tensor's bytes into a pool block."""
        storage = t.untyped_storage()
        shape, stride = tuple(t.shape), t.stride()
        nbytes: int = t.nbytes          # numel * element size: 0 for an empty tensor
        if not nbytes:
            meta = TensorMeta("t", t.dtype, shape, stride, 0, 0, t.requires_grad, type(t) is torch.nn.Parameter)
            return Placed(None, 0, 0, None, meta, False)
        offset = int(t.storage_offset())
        if storage.is_shared():
            shared = shared_file(storage)
            if shared is not None:      # aliased: peers open torch's fd, the owner reads the storage
                meta = TensorMeta("t", t.dtype, shape, stride, offset, storage.nbytes(), t.requires_grad,
                                  type(t) is torch.nn.Parameter)
                return Placed(shared, 0, 0, storage, meta, True)
        # Copy the storage from its start to the end of the view, so that the view comes back
        # with its own strides and storage offset (not what lies beyond it).
        if offset or not t.is_contiguous():
            extent = offset + 1
            for n, st in zip(shape, stride, strict=True):
                extent += (n - 1) * st
            nbytes = extent * t.element_size()
        seg, off, cls = self._allocate(nbytes, timeout)
        ctypes.memmove(seg.base + off, storage.data_ptr(), nbytes)
        meta = TensorMeta("t", t.dtype, shape, stride, offset, nbytes, t.requires_grad, type(t) is torch.nn.Parameter)
        return Placed(seg, off, cls, None, meta, False)

    def _put_structure(self, obj: Any, timeout: float | None) -> Placed:
        with SerializationContext() as ctx:
            skeleton, layout = serialize.dumps_for_store(obj)
        # Aliased shared storages first: the owner's get finds storage i at keep[i].
        keep = (layout.shared_storages + ctx.refs + layout.keep) or None
        shared = layout.shared_locs()
        if layout.nbytes == 0 and len(skeleton) <= INLINE_LIMIT:
            return Placed(None, 0, 0, keep, ValueMeta("v", skeleton, shared), False)
        total = layout.nbytes + len(skeleton)
        seg, off, cls = self._allocate(total, timeout)
        for storage, rel in zip(layout.storages, layout.offsets, strict=True):
            if storage.nbytes():        # an empty storage may have no data pointer at all
                ctypes.memmove(seg.base + off + rel, storage.data_ptr(), storage.nbytes())
        seg.mm[off + layout.nbytes:off + total] = skeleton
        return Placed(seg, off, cls, keep, PickledMeta("p", layout.nbytes, len(skeleton), shared), False)

    def _register(self, placed: Placed) -> ObjectRef:
        seg, offset, cls, keep, meta, external = placed
        with self.lock:
            if self.closed:
                raise RuntimeError("the store was shut down; call ta.init() to start a new one")
            if self._unshared:
                self._release_unshared()
            if not self.free_slots:
                self._reclaim()
                if not self.free_slots:
                    if seg is not None and not external:
                        self.pool.release(seg, offset, cls)
                    raise StoreFullError(0 if seg is None else meta.block_nbytes, self.pool.used,
                                         self.pool.capacity,
                                         f"this process owns {registry.MAX_SLOTS - 1} objects, the most it can; "
                                         f"put many tensors as one structure (one object) instead")
            slot = self.free_slots.pop()
            gen = self.membership.next_gen(slot)
            if seg is None:
                loc = None
                self.membership.set_live(slot, gen, -1, 0, 0, meta.signature())
            else:
                nbytes = meta.block_nbytes
                loc = Location(seg.fd, seg.inode, offset, nbytes, seg.file_off, seg.size)
                self.membership.set_live(slot, gen, seg.fd, seg.file_off + offset, nbytes, meta.signature())
            self.entries[slot] = _Entry(gen, seg, offset, cls, keep, external, loc, meta)
            if keep is not None:
                self.watcher.start()
                if self._holding:       # a loop of such puts (results holding refs): reclaim as it goes
                    self._reclaim()
        return ObjectRef(self.index, slot, gen, self.pid, loc, meta, self.job, store=self)

    def _allocate(self, nbytes: int, timeout: float | None) -> tuple[Segment, int, int]:
        with self.lock:
            if self._unshared:          # their blocks first: reused while still in the cache
                self._release_unshared()
            cls = size_class(nbytes)
            if cls > self.pool.capacity:        # would never fit: no point waiting
                raise StoreFullError(nbytes, self.pool.used, self.pool.capacity,
                                     "the object is bigger than the whole store")
            # Reclaim before taking new memory: small blocks are carved from the open arena
            # while it has room (reclaiming in batches), large ones reuse pooled segments.
            if self.candidates and not self.pool.has_free(cls) and not self.pool.can_carve(cls):
                self._reclaim()
            found = self.pool.allocate(nbytes, cls)
            if found is not None:
                return found
            logger.info("store of process %d is full: %d bytes requested, %d of %d bytes used (%d reserved); "
                        "reclaiming%s", self.pid, nbytes, self.pool.used, self.pool.capacity, self.pool.reserved,
                        "" if not timeout else f", then waiting up to {timeout} s for space")
            deadline = None if timeout is None else time.monotonic() + timeout
            while found is None:
                self._reclaim()
                found = self.pool.allocate(nbytes)
                if found is not None:
                    break
                if deadline is None or time.monotonic() >= deadline:
                    raise StoreFullError(nbytes, self.pool.used, self.pool.capacity)
                self.lock.release()
                try:
                    time.sleep(0.002)
                finally:
                    self.lock.acquire()
            return found

    # -- get ------------------------------------------------------------------------------

    def get(self, ref: Any, timeout: float | None = None, copy: bool = False) -> Any:
        if isinstance(ref, (list, tuple)):
            deadline = None if timeout is None else time.monotonic() + timeout
            return [self.get(r, None if deadline is None else max(0.0, deadline - time.monotonic()), copy)
                    for r in ref]
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"get() takes an ObjectRef or a list of them, not {type(ref).__name__}")
        if ref._pending is not None:
            value = ref._pending.result(timeout)
            if isinstance(value, ObjectRef):
                value = self.get(value)
        else:
            kind = KINDS.get(type(ref.meta))
            if kind is None:
                raise _malformed(ref, f"unknown kind of object {ref.meta!r:.80}")
            if ref.loc is not None:
                seg = self._segment_of(ref)
            else:
                seg = None
                if not kind.checks_itself:
                    self._check_inline(ref)
            value = kind.rebuild(self, ref, seg)
        return copy_module.deepcopy(value) if copy else value

    def _segment_of(self, ref: ObjectRef) -> Any:
        """The segment ``ref``'s bytes are in (in the owner, the storage itself for an aliased
        shared tensor)."""
        live = self.check_live(ref)
        if ref.owner == self.index:
            return live.keep if live.external else live.seg
        fd, inode, offset, nbytes, file_off, size = ref.loc     # a Location: check_live made sure
        if not 0 <= offset <= offset + nbytes <= size or file_off % PAGE or file_off < 0:
            raise _malformed(ref, "its bytes are not inside a segment")
        return self._map(ref, live, fd, inode, file_off, size)

    def _map(self, ref: ObjectRef, peer: Any, fd: int, inode: int, file_off: int, size: int) -> Segment:
        self.watcher.start()        # from now on, a dead owner's windows are dropped at once
        seg = self.maps.map(ref.owner_pid, fd, inode, file_off, size)
        if seg is None:
            if not peer.alive():
                raise _owner_died(ref)
            raise ObjectFreedError(ref.id, "its memory was returned to the system")
        return seg

    def _shared_storages(self, ref: ObjectRef) -> Callable[[int], torch.UntypedStorage] | None:
        """For a stored structure: index -> the shared storage it aliases."""
        locs = ref.meta.shared
        if not locs:
            return None
        live = self.check_live(ref)
        if ref.owner == self.index:
            return live.keep.__getitem__

        def shared(i: int) -> torch.UntypedStorage:
            fd, inode, size = locs[i]
            return make_storage(self._map(ref, live, fd, inode, 0, size), 0, size, ref)
        return shared

    def check_live(self, ref: ObjectRef) -> Any:
        """Raise ObjectFreedError / OwnerDiedError unless ``ref``'s object is live; returns its
        ``_Entry`` in the owner, else the owner's ``Peer``. A ref of another job, or one that
        does not match the live object it names (a forged or edited ref), never reads it."""
        if ref.job is not self.job:     # made here, its fields are ours; else check them first
            self._check_names(ref)
        m = self.membership
        if ref.owner == self.index and ref.owner_pid == self.pid:
            entry = self.entries.get(ref.slot)
            if entry is None or entry.gen != ref.gen:
                raise ObjectFreedError(ref.id)
            if (ref.loc is not entry.loc and ref.loc != entry.loc) or (ref.meta is not entry.meta
                                                                      and ref.meta != entry.meta):
                raise _malformed(ref, "its place or layout differs from the object's")
            if m.peers and m.freed_by_peer(self.index, ref.slot, ref.gen):
                with self.lock:
                    if self.entries.get(ref.slot) is entry:
                        self._release(ref.slot, entry, registry.STATE_FREED)
                raise ObjectFreedError(ref.id)
            return entry
        if ref.owner == self.index:         # an earlier process at this index
            raise _owner_died(ref)
        self._check_names(ref)
        peer = m.peer(ref.owner, ref.owner_pid)
        if peer.error is not None and peer.pid == ref.owner_pid and peer.alive():
            with m.lock:
                m.retry_unmapped()
            peer = m.peer(ref.owner, ref.owner_pid)
            if peer.error is not None and peer.alive():
                raise peer.error        # alive but unreadable here: never taken for dead
        if peer.pid != ref.owner_pid or not peer.alive():
            self.maps.forget(ref.owner_pid)
            raise _owner_died(ref)
        i = ref.slot * registry.HEADER_CELL
        header = peer.header
        if header is None:          # the watcher just dropped its tables: it died
            raise _owner_died(ref)
        try:
            gen, state = header.cells[i], header.cells[i + 1]
            where_cells = tuple(header.cells[i + 2:i + 6])
        except (AttributeError, ValueError):        # the watcher just dropped its tables: it died
            raise _owner_died(ref) from None
        if gen != ref.gen or state != registry.STATE_LIVE or m.freed_anywhere(ref.owner, ref.slot, ref.gen):
            raise ObjectFreedError(ref.id)
        try:
            where = _where(ref.loc, ref.meta)
        except (TypeError, IndexError, AttributeError):
            raise _malformed(ref, "its place is not (fd, inode, offset, nbytes, file offset, size)") from None
        if where_cells != where or (ref.loc is not None and ref.meta.block_nbytes != ref.loc.nbytes):
            raise _malformed(ref, "its place, size or layout differs from the object's")
        return peer

    def _check_inline(self, ref: ObjectRef) -> None:
        """An object with no bytes rides whole inside its ref: freed or edited is refused, but
        it outlives its owner (nothing of the owner is read), as a small result must."""
        try:
            self.check_live(ref)
        except OwnerDiedError:
            if (ref.job and ref.job != self.job) or (type(ref.meta) is ValueMeta and ref.meta.shared):
                raise               # another job's, or it aliases shared storages of the dead owner

    def _check_names(self, ref: ObjectRef) -> None:
        """``ref`` is of this job and names a slot that can exist."""
        if ref.job != self.job and ref.job:        # a ref built by hand names no job: checked as ours
            raise OwnerDiedError(ref.id, f"process {ref.owner} (pid {ref.owner_pid}) of job {ref.job or '?'!r}, "
                                         f"not of this job {self.job!r} (a ref only works in the job that made it)")
        if type(ref.owner) is not int or type(ref.slot) is not int or type(ref.gen) is not int \
                or not self.membership.valid(ref.owner, ref.slot):
            raise _malformed(ref, f"owner {ref.owner!r}, slot {ref.slot!r} out of range")

    def _get_cpu_tensor(self, ref: ObjectRef, seg: Any) -> torch.Tensor:
        """``KINDS[TensorMeta].rebuild``: a view of the block (or of the aliased shared storage)."""
        _, dtype, shape, stride, offset, nbytes, requires_grad, is_param = ref.meta
        if seg is None:
            t = torch.empty_strided(shape, stride, dtype=dtype)
        elif isinstance(seg, torch.UntypedStorage):
            t = torch.empty(0, dtype=dtype).set_(seg, offset, shape, stride)
        else:
            flat = pinned_view(seg, ref.loc.offset, nbytes // dtype.itemsize, dtype, ref)
            if offset == 0 and stride == contiguous_strides(shape):
                t = flat if len(shape) == 1 else flat.view(shape)
            else:
                t = flat.as_strided(shape, stride, offset)
        return serialize.finish_tensor(t, requires_grad, is_param) if requires_grad or is_param else t

    def _get_pickled(self, ref: ObjectRef, seg: Segment) -> Any:
        """``KINDS[PickledMeta].rebuild``: unpickle the skeleton; its tensors view the block."""
        base = ref.loc.offset
        nbytes, nskel = ref.meta.nbytes, ref.meta.skeleton_nbytes
        with serialize.BlockReader(self, ref, lambda rel, n: make_storage(seg, base + rel, n, ref),
                                   self._shared_storages(ref)):
            return pickle.loads(seg.mm[base + nbytes:base + nbytes + nskel])

    def _get_inline(self, ref: ObjectRef, seg: None) -> Any:
        """``KINDS[ValueMeta].rebuild``: unpickle the skeleton the ref carries."""
        with serialize.BlockReader(self, ref, lambda rel, n: torch.UntypedStorage(0), self._shared_storages(ref)):
            return pickle.loads(ref.meta.skeleton)

    # -- free and reclaim -----------------------------------------------------------------

    def free(self, ref: Any) -> None:
        """Release now: later gets raise ObjectFreedError. Views already rebuilt stay mapped,
        but their bytes may be reused by later puts."""
        if isinstance(ref, (list, tuple)):
            for r in ref:
                self.free(r)
            return
        if ref._pending is not None:
            ref = ref._pending.materialize()
        self._check_names(ref)
        if ref.owner != self.index:
            self.membership.mark_freed(ref.owner, ref.slot, ref.gen)
            return
        with self.lock:
            entry = self.entries.get(ref.slot)
            if entry is not None and entry.gen == ref.gen:
                self._release(ref.slot, entry, registry.STATE_FREED)

    def _release(self, slot: int, entry: _Entry, state: int) -> None:
        del self.entries[slot]
        self.candidates.discard(slot)
        self.membership.set_header(slot, entry.gen, state)
        if entry.seg is not None and not entry.external:
            self.pool.release(entry.seg, entry.offset, entry.cls)
        if state == registry.STATE_FREED:
            self.quarantine.add(slot)
        else:
            self.free_slots.append(slot)

    def _reclaim(self) -> None:
        """Return the blocks of objects no live process references (and of objects other
        processes freed) to the pool."""
        with self.lock:
            self._holding = 0
            if self._unshared:
                self._release_unshared()
            self.membership.refresh_peers()
            self._forget_dead_peers()
            epochs = self.membership.free_epochs()
            if epochs != self._free_epochs:
                self._free_epochs = epochs
                freed = self.membership.freed_anywhere
                for slot in [s for s, e in self.entries.items() if freed(self.index, s, e.gen)]:
                    self._release(slot, self.entries[slot], registry.STATE_FREED)
            # Releasing an object drops the refs stored inside it, which may free more: repeat.
            # (No local may keep a released entry alive, or its refs would drop a pass late.)
            while self.candidates or self.quarantine:
                dead = self.membership.unreferenced(sorted(self.candidates | self.quarantine))
                if not dead:
                    return
                for slot in dead:
                    self._reclaim_slot(slot)

    def _reclaim_slot(self, slot: int) -> None:
        if slot in self.quarantine:
            self.quarantine.discard(slot)
            self.membership.set_header(slot, self.membership.header.cells[slot * registry.HEADER_CELL],
                                       registry.STATE_EMPTY)
            self.free_slots.append(slot)
        elif slot in self.entries:
            self._release(slot, self.entries[slot], registry.STATE_EMPTY)
        else:
            self.candidates.discard(slot)

    def released(self, ref: ObjectRef) -> None:
        """``ref``, counted here, was dropped (its ``__del__``; never in a forked child). An
        object of ours that no ref ever left this process for is released at the next put;
        any other waits for a reclaim pass to find no holder in any process (see docs/design.md,
        "Objects that never left their owner are released at once")."""
        if self.closed or self._forks != _current.forks:
            return
        left = self.membership.unhold(ref.owner, ref.slot)
        if ref.owner == self.index and left <= 0:
            entry = self.entries.get(ref.slot)
            if left == 0 and entry is not None and entry.gen == ref.gen and not entry.exported \
                    and entry.keep is None:
                self._unshared.append((ref.slot, ref.gen))
                return
            self.candidates.add(ref.slot)
            if entry is not None and entry.keep is not None:
                self._holding += 1
                self.watcher.nudge()

    def exported(self, ref: ObjectRef) -> None:
        """A ref to ``ref``'s object is being pickled: from now on another process may hold it."""
        if ref.owner == self.index and ref.owner_pid == self.pid:
            entry = self.entries.get(ref.slot)
            if entry is not None and entry.gen == ref.gen:
                entry.exported = True

    def _release_unshared(self) -> None:
        """Release the objects ``released`` listed (under ``lock``), unless a ref to one was
        made here since (it would be counted again) or left this process (exported)."""
        unshared = self._unshared
        while unshared:
            slot, gen = unshared.pop()
            entry = self.entries.get(slot)
            if entry is not None and entry.gen == gen and not entry.exported and not self.membership.held_here(slot):
                self._release(slot, entry, registry.STATE_EMPTY)

    def background_reclaim(self) -> bool:
        """The watcher's round: reclaim; True while objects holding something still wait."""
        with self.lock:
            if self.closed:
                return False
            self._reclaim()
            entries = self.entries
            return any(entries[s].keep is not None for s in list(self.candidates) if s in entries)

    def drop_dead_peers(self) -> None:
        """Drop the tables and cached mappings of peers that died (the watcher calls this)."""
        with self.lock:
            if self.closed:
                return
            self._forget_dead_peers()

    def _forget_dead_peers(self) -> None:
        for pid in self.membership.drop_dead_peers():
            self.maps.forget(pid)
            logger.info("process %d of job %s died: the objects it owned are lost (get raises OwnerDiedError), "
                        "the refs it held no longer count", pid, self.job)

    # -- wait and stats -------------------------------------------------------------------

    def wait(self, refs: Sequence[ObjectRef], num_returns: int = 1,
             timeout: float | None = None) -> tuple[list[ObjectRef], list[ObjectRef]]:
        refs = list(refs)
        if num_returns > len(refs) or num_returns < 0:
            raise ValueError(f"num_returns={num_returns} must be between 0 and len(refs)={len(refs)}")
        deadline = None if timeout is None else time.monotonic() + timeout
        polled = False
        while True:
            done = [r._pending is None or r._pending.done() for r in refs]
            if sum(done) >= num_returns:
                break
            pendings = [r._pending for r, d in zip(refs, done, strict=False) if not d]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0 and polled:
                break
            type(pendings[0]).wait_any(pendings, left)      # timeout=0 still reads what arrived
            polled = True
        ready: list[ObjectRef] = []
        rest: list[ObjectRef] = []
        for r, d in zip(refs, done, strict=False):
            (ready if d and len(ready) < num_returns else rest).append(r)
        return ready, rest

    def stats(self) -> dict:
        with self.lock:
            self._reclaim()
            return {
                "objects": len(self.entries),
                "bytes_used": self.pool.used,
                "bytes_reserved": self.pool.reserved,
                "capacity": self.pool.capacity,
                "segments": len(self.pool.segments),
                "mapped_segments": self.maps.count(),
                "process_index": self.index,
            }

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.watcher.close()
            self.entries.clear()
            self.pool.close()
            self.maps.clear()
            self.membership.close()
            if self.own_job_dir:
                shutil.rmtree(self.job_dir, ignore_errors=True)


# -- the kinds this module puts and gets (cuda.py registers the CUDA one) --------------------

register(Kind(TensorMeta, "cpu", Store._put_cpu_tensor, Store._get_cpu_tensor))
register(Kind(PickledMeta, None, None, Store._get_pickled))
register(Kind(ValueMeta, None, None, Store._get_inline))


# -- the process's store (held in _current; these two are the only places that install one) ----

_install_lock = threading.Lock()


def current() -> Store:
    """This process's store. The one place a store starts implicitly: when nobody attached
    one, a standalone store (a job of its own) is started on first use, and removed at exit."""
    s = _current.active()
    if s is None:
        with _install_lock:
            s = _current.active()
            if s is None:
                s = Store()
                _current.install(s)
                atexit.register(s.close)    # removes its job directory (memfds go by themselves)
    return s


def attach(job_dir: str | None = None, index: int | None = None, capacity: int | None = None) -> Store:
    """Start this process's store inside job ``job_dir`` (the runtime calls this before any
    ref is read), closing the one it had."""
    with _install_lock:
        old = _current.active()
        if old is not None:
            old.close()
        s = Store(job_dir, index, capacity)
        _current.install(s)
        return s
