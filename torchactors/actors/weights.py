"""Versioned weights: one publisher per name, any number of readers, never a torn version.

Box in the data flow::

    publish(sd) -> flatten: one bucket per (device, dtype), each leaf a view into its bucket
        -> take a buffer set that is not current and that no reader holds (its *lease*)
        -> copy the leaves in -> stamp[b] = v -> current = (v, b) -> futex wake
    latest() -> current (v, b) -> hold b's lease (an ObjectRef: the store's hold tables)
        -> fence -> stamp[b] still v? -> views into b's buckets, each pinned to the lease
        -> unpickle the skeleton (structure and keys) with those views as its tensors

A *buffer set* is one bucket per (device, dtype) (store objects: one segment or one CUDA IPC
handle each) plus a *lease*: a small store object that names the buckets and the leaves'
places. Readers' views keep the lease's ref alive, and the publisher reuses a buffer set only
when no live process holds its lease: a reader's ``sd`` stays valid while it lives. The check
is Dekker's: the reader counts its hold, fences, then re-reads the stamp; the publisher clears
the stamp, fences, then reads the holds; one of them sees the other (docs/design.md,
"Versioned weights: reused buffer sets, readers' holds, Dekker's check").

The control segment (a memfd of the publisher, found through the job's ``weights/<name>``
record) holds ``current`` and, per buffer set, its stamp, its lease and the published
skeleton. CUDA buckets: one interprocess event per buffer set, recorded after each copy;
readers' streams wait on it.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import time
from typing import Any

import torch

from torchactors.errors import GetTimeoutError, OwnerDiedError
from torchactors.runtime import job as job_module
from torchactors.store import core, cuda, futex
from torchactors.store.refs import ObjectRef
from torchactors.store.segments import OwnSegment, Segment

logger = logging.getLogger(__name__)

MAX_BUFFERS = 16                # buffer-set areas in a control segment
DEFAULT_MAX_BUFFERS = 4         # buffer sets a publisher keeps at most (see the module docstring)
AREA0 = 4096                    # header page, then one area per buffer set
AREA_SIZE = 256 << 10           # per buffer set: cells, lease, event handles, skeleton
LEASE_AT, LEASE_MAX = 64, 2048
EVENTS_AT, EVENTS_MAX = LEASE_AT + LEASE_MAX, 1024
SKELETON_AT = EVENTS_AT + EVENTS_MAX
SKELETON_MAX = AREA_SIZE - SKELETON_AT
MAGIC = 0x7473776569676874      # "tsweight"
WRITING = -1                    # stamp of a buffer set being written
WAIT_SLICE_S = 0.02             # a waiting reader checks that the publisher lives this often
ALIGN_BYTES = 64

# header cells
_H_MAGIC, _H_CURRENT = 0, 1
# area cells
_A_STAMP, _A_LEASE_LEN, _A_SKEL_LEN, _A_EVENTS_LEN = 0, 1, 2, 3

_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: a lock's acquire is a locked instruction on x86-64 (and a
    barrier on other architectures), so the store before it is visible before the load after."""
    _fence_lock.acquire()
    _fence_lock.release()


# -- flattening ----------------------------------------------------------------------------------

class _FlatPickler(pickle.Pickler):
    """Pickles the structure with every tensor replaced by its leaf index (kept in ``leaves``)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.leaves: list[torch.Tensor] = []
        self._index: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        if not isinstance(obj, torch.Tensor):
            return None
        if obj.layout != torch.strided:
            raise TypeError(f"Weights.publish takes strided (dense) tensors, not {obj.layout}")
        i = self._index.get(id(obj))
        if i is None:
            i = self._index[id(obj)] = len(self.leaves)
            self.leaves.append(obj)
        return i


class _ViewUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, views: list[torch.Tensor]) -> None:
        super().__init__(io.BytesIO(data))
        self.views = views

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self.views[pid]


def _flatten(sd: Any) -> tuple[bytes, list[torch.Tensor]]:
    buf = io.BytesIO()
    p = _FlatPickler(buf)
    p.dump(sd)
    return buf.getvalue(), p.leaves


def _plan(leaves: list[torch.Tensor]) -> tuple:
    """The layout of a buffer set for these leaves: buckets ((device, dtype, nbytes), ...) and
    leaves ((bucket, element offset, shape), ...). Equal plans share buffer sets."""
    buckets: dict[tuple[str, torch.dtype], int] = {}
    sizes: list[int] = []
    places = []
    for t in leaves:
        key = (str(t.device), t.dtype)
        b = buckets.get(key)
        if b is None:
            b = buckets[key] = len(sizes)
            sizes.append(0)
        es = t.element_size()
        offset = -(-sizes[b] // ALIGN_BYTES) * ALIGN_BYTES
        places.append((b, offset // es, tuple(t.shape)))
        sizes[b] = offset + t.numel() * es
    return tuple((dev, dt, n) for (dev, dt), n in zip(buckets, sizes, strict=True)), tuple(places)


def _leaf_views(buckets: list[torch.Tensor], places: tuple) -> list[torch.Tensor]:
    """Views of the leaves into typed bucket tensors (zero-copy, one torch call each)."""
    return [buckets[b].as_strided(shape, core.contiguous_strides(shape), offset) for b, offset, shape in places]


# -- the publisher's side --------------------------------------------------------------------------

class _BufferSet:
    """Buckets this publisher writes, and the lease readers hold while they read them."""

    def __init__(self, store: core.Store, plan: tuple) -> None:
        self.plan = plan
        bucket_specs, places = plan
        self.bucket_refs: list[ObjectRef] = []
        typed: list[torch.Tensor] = []
        self.events: dict[int, Any] = {}        # CUDA device index -> interprocess event
        for dev, dtype, nbytes in bucket_specs:
            device = torch.device(dev)
            es = torch.empty(0, dtype=dtype).element_size()
            if device.type == "cpu":
                ref = store.put_empty(max(nbytes, es))
                flat = store.get(ref).view(dtype)
            else:
                flat = torch.empty(max(nbytes, es) // es, dtype=dtype, device=device)
                ref = store.put(flat)
                if device.index not in self.events:
                    self.events[device.index] = torch.cuda.Event(interprocess=True)
            self.bucket_refs.append(ref)
            typed.append(flat)
        self.views = _leaf_views(typed, places)
        self.lease = store.put({"buckets": [(dev, dtype, nbytes, ref) for (dev, dtype, nbytes), ref
                                            in zip(bucket_specs, self.bucket_refs, strict=True)], "places": places})
        self.lease_bytes = pickle.dumps(_ref_args(self.lease), protocol=pickle.HIGHEST_PROTOCOL)
        if len(self.lease_bytes) > LEASE_MAX:
            raise ValueError(f"this state dict's layout needs {len(self.lease_bytes)} bytes of lease, more than "
                             f"{LEASE_MAX}; publish fewer tensors per Weights channel")
        self.event_bytes = pickle.dumps([(d, e.ipc_handle()) for d, e in self.events.items()])

    def copy_from(self, leaves: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip(self.views, leaves, strict=False):
                dst.copy_(src.detach(), non_blocking=dst.device.type != "cpu")
        for device, event in self.events.items():
            event.record(torch.cuda.current_stream(device))


def _ref_args(ref: ObjectRef) -> tuple:
    return ref.wire()[:6]


class _Publisher:
    def __init__(self, store: core.Store, channel: _Channel, max_buffers: int) -> None:
        self.store = store
        self.channel = channel
        self.max_buffers = max_buffers
        self.sets: list[_BufferSet | None] = [None] * MAX_BUFFERS
        self.version = 0
        self.lock = threading.Lock()

    def publish(self, sd: Any) -> int:
        skeleton, leaves = _flatten(sd)
        if len(skeleton) > SKELETON_MAX:
            raise ValueError(f"the structure around the tensors pickles to {len(skeleton)} bytes, more than "
                             f"{SKELETON_MAX}; keep large non-tensor values out of what you publish")
        plan = _plan(leaves)
        with self.lock:
            b = self._take(plan)
            bs = self._set(b)
            bs.copy_from(leaves)
            ch = self.channel
            area = ch.area(b)
            ch.mm[area + SKELETON_AT:area + SKELETON_AT + len(skeleton)] = skeleton
            ch.cells[area // 8 + _A_SKEL_LEN] = len(skeleton)
            self.version += 1
            v = self.version
            ch.cells[area // 8 + _A_STAMP] = v             # after every byte of the version ...
            ch.cells[_H_CURRENT] = (v << 8) | b             # ... and then readers may see it
            futex.wake(ch.current_addr)
            return v

    def _take(self, plan: tuple) -> int:
        """A buffer set for ``plan`` that no reader holds, its stamp cleared: reuse one, make
        one (up to ``max_buffers``), or wait for a reader to let go."""
        ch = self.channel
        current = ch.cells[_H_CURRENT] & 0xFF if self.version else -1
        membership = self.store.membership
        waited = 0.0
        while True:
            membership.refresh_peers()
            # Oldest first: the set least likely to be held.
            order = sorted((i for i, s in enumerate(self.sets) if s is not None and i != current),
                           key=lambda i: ch.cells[ch.area(i) // 8 + _A_STAMP])
            for i in order:
                if self._claim(i):
                    if self._set(i).plan == plan:
                        return i
                    self.sets[i] = None         # another layout: the store frees it once unheld
                    return self._make(i, plan)
            used = sum(s is not None for s in self.sets)
            if used < self.max_buffers:
                return self._make(self.sets.index(None), plan)
            if waited == 0.0 or waited > 5.0:
                logger.warning("Weights %r: all %d buffer sets are held by readers; publish waits for one "
                               "to drop its state dict (keep fewer old versions alive, or raise max_buffers)",
                               ch.name, used)
                waited = 0.0
            time.sleep(0.001)
            waited += 0.001

    def _set(self, i: int) -> _BufferSet:
        """Buffer set ``i``, which exists (it was made and not dropped)."""
        bs = self.sets[i]
        assert bs is not None, f"buffer set {i} was never made"
        return bs

    def _claim(self, i: int) -> bool:
        ch = self.channel
        stamp_cell = ch.area(i) // 8 + _A_STAMP
        old = ch.cells[stamp_cell]
        ch.cells[stamp_cell] = WRITING
        _fence()
        if self.store.membership.holders(self._set(i).lease.slot) > 1:     # ours is one
            ch.cells[stamp_cell] = old
            return False
        return True

    def _make(self, i: int, plan: tuple) -> int:
        ch = self.channel
        area = ch.area(i)
        ch.cells[area // 8 + _A_STAMP] = WRITING
        bs = _BufferSet(self.store, plan)
        ch.mm[area + LEASE_AT:area + LEASE_AT + len(bs.lease_bytes)] = bs.lease_bytes
        ch.cells[area // 8 + _A_LEASE_LEN] = len(bs.lease_bytes)
        ch.mm[area + EVENTS_AT:area + EVENTS_AT + len(bs.event_bytes)] = bs.event_bytes
        ch.cells[area // 8 + _A_EVENTS_LEN] = len(bs.event_bytes)
        self.sets[i] = bs
        logger.debug("Weights %r: buffer set %d made for %d buckets", ch.name, i, len(plan[0]))
        return i


# -- the channel and the readers' side -------------------------------------------------------------

class _Lease:
    """What a reader keeps of a buffer set it has read once: the lease's ref fields, and
    each bucket's place (opened once per process)."""

    def __init__(self, store: core.Store, args: tuple) -> None:
        ref = ObjectRef(*args)
        layout = store.get(ref)
        self.args = args
        self.places = layout["places"]
        self.buckets: list[tuple[Any, Any, int, Any]] = []   # (device, dtype, nbytes, segment and offset,
        #                                                      or the opened CUDA tensor)
        for dev, dtype, nbytes, bref in layout["buckets"]:
            device = torch.device(dev)
            if device.type == "cpu":
                self.buckets.append((device, dtype, nbytes, (store._segment_of(bref), bref.loc[2])))
            else:
                self.buckets.append((device, dtype, nbytes, store.get(bref)))
        self.events: dict[int, Any] = {}

    def views(self, lease: ObjectRef, event_bytes: bytes, own_events: dict | None) -> list[torch.Tensor]:
        """Views of the leaves, pinned to ``lease``; CUDA ones ordered after the publication's
        copies (``own_events``: the publisher's own events, when it reads its own channel)."""
        typed = []
        for device, dtype, nbytes, where in self.buckets:
            if device.type == "cpu":
                seg, offset = where
                typed.append(torch.frombuffer(core.pinned_buffer(seg, offset, nbytes, lease), dtype=dtype)
                             if nbytes else torch.empty(0, dtype=dtype))
            else:
                base = where.untyped_storage()
                storage = cuda.alias_storage(base, base.nbytes(), device, cuda._Pin(base, lease, device.index))
                typed.append(torch.empty(0, dtype=dtype, device=device).set_(storage, 0, (nbytes // where.element_size(),), (1,)))
        if own_events is not None:
            for d, event in own_events.items():
                event.wait(torch.cuda.current_stream(d))
        elif event_bytes:
            for d, handle in pickle.loads(event_bytes):
                ev = self.events.get(d)
                if ev is None or ev[0] != handle:
                    ev = self.events[d] = (handle, torch.cuda.Event.from_ipc_handle(d, handle))
                ev[1].wait(torch.cuda.current_stream(d))
        return _leaf_views(typed, self.places)


class _Channel:
    """One name's control segment as this process sees it, and its publisher if it is us."""

    def __init__(self, store: core.Store, name: str, seg: Segment, record: dict) -> None:
        self.store = store
        self.name = name
        self.seg = seg
        self.mm: Any = seg.mm       # a ctypes char array: its slices read and write bytes
        self.cells = memoryview(seg.mm).cast("B").cast("q")
        self.current_addr = seg.base + _H_CURRENT * 8
        self.record = record
        self.publisher: _Publisher | None = None
        self.leases: dict[tuple[int, int], _Lease] = {}

    @staticmethod
    def area(i: int) -> int:
        return AREA0 + i * AREA_SIZE

    def publisher_alive(self) -> bool:
        if self.publisher is not None:
            return True
        peer = self.store.membership.peer(self.record["index"])
        return peer.pid == self.record["pid"] and peer.alive()

    def died(self) -> OwnerDiedError:
        return OwnerDiedError(f"weights {self.name!r}", f"process {self.record['index']} (pid {self.record['pid']}), "
                                                        f"its publisher,")

    def version(self) -> int:
        return self.cells[_H_CURRENT] >> 8

    def read(self) -> tuple[int, Any]:
        """The newest complete version and its state dict of views (see the module docstring)."""
        cells = self.cells
        while True:
            cur = cells[_H_CURRENT]
            v, b = cur >> 8, cur & 0xFF
            if v == 0:
                return 0, None
            a = self.area(b)
            if cells[a // 8 + _A_STAMP] != v:
                continue                        # being rewritten: current has moved on
            n = cells[a // 8 + _A_LEASE_LEN]
            try:
                args = pickle.loads(self.mm[a + LEASE_AT:a + LEASE_AT + n])
                lease = ObjectRef(*args)
            except Exception:                   # read while its area was rewritten: check below
                continue
            _fence()
            if cells[a // 8 + _A_STAMP] != v:
                continue
            # From here the publisher cannot touch buffer set b: our hold is counted.
            skeleton = bytes(self.mm[a + SKELETON_AT:a + SKELETON_AT + cells[a // 8 + _A_SKEL_LEN]])
            event_bytes = bytes(self.mm[a + EVENTS_AT:a + EVENTS_AT + cells[a // 8 + _A_EVENTS_LEN]])
            key = (args[1], args[2])
            info = self.leases.get(key)
            if info is None:
                self._forget_old_leases()
                info = self.leases[key] = _Lease(self.store, args)
            mine = self.publisher.sets[b] if self.publisher is not None else None
            own = mine.events if mine is not None else None
            views = info.views(lease, event_bytes, own)
            del lease       # the views pin it now
            return v, _ViewUnpickler(skeleton, views).load()

    def _forget_old_leases(self) -> None:
        """Drop what we kept of buffer sets the publisher no longer has (layout changed)."""
        if len(self.leases) < MAX_BUFFERS:
            return
        live = set()
        for i in range(MAX_BUFFERS):
            a = self.area(i)
            n = self.cells[a // 8 + _A_LEASE_LEN]
            if n:
                try:
                    args = pickle.loads(self.mm[a + LEASE_AT:a + LEASE_AT + n])
                    live.add((args[1], args[2]))
                except Exception:
                    pass
        for key in [k for k in self.leases if k not in live]:
            del self.leases[key]

    def wait_newer(self, version: int, deadline: float | None) -> None:
        """Sleep until the channel's version exceeds ``version``."""
        while True:
            cur = self.cells[_H_CURRENT]
            if cur >> 8 > version:
                return
            if not self.publisher_alive():
                raise self.died()
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                raise GetTimeoutError(f"no version of weights {self.name!r} newer than {version} within the "
                                      f"timeout", None)
            futex.wait(self.current_addr, futex.low32(cur), left)


_channels: dict[tuple[str, str], _Channel] = {}
_channels_lock = threading.Lock()


def _find(store: core.Store, name: str) -> _Channel | None:
    """This process's view of channel ``name``: cached, or opened from the job's record."""
    key = (store.job_dir, name)
    ch = _channels.get(key)
    if ch is not None and ch.store is store:
        if ch.publisher is not None or ch.publisher_alive():
            return ch
        # Its publisher died: a new one may have taken the name over.
        record = job_module.read_record(store.job_dir, "weights", name)
        if record is None or record == ch.record:
            return ch
    with _channels_lock:
        for k in [k for k, c in _channels.items() if c.store is not store]:
            old = _channels.pop(k)  # a closed store's channels
            if old.publisher is not None:
                old.seg.close()
        record = job_module.read_record(store.job_dir, "weights", name)
        if record is None:
            return None
        seg = store.maps.map(record["pid"], record["fd"], record["inode"], 0, AREA0 + MAX_BUFFERS * AREA_SIZE)
        if seg is None:
            ch = _channels.get(key)
            if ch is not None:
                return ch               # keep the dead publisher's last version readable
            raise OwnerDiedError(f"weights {name!r}", f"process {record['index']} (pid {record['pid']}), "
                                                      f"its publisher,")
        ch = _channels[key] = _Channel(store, name, seg, record)
        return ch


def _become_publisher(store: core.Store, name: str, max_buffers: int) -> _Channel:
    with _channels_lock:
        key = (store.job_dir, name)
        ch = _channels.get(key)
        if ch is not None and ch.publisher is not None and ch.store is store:
            return ch
        seg = OwnSegment("weights", AREA0 + MAX_BUFFERS * AREA_SIZE)
        record = {"pid": os.getpid(), "index": store.index, "fd": seg.fd, "inode": seg.inode}
        try:
            job_module.write_record(store.job_dir, "weights", name, record)
        except FileExistsError:
            old = job_module.read_record(store.job_dir, "weights", name) or {}
            peer = store.membership.peer(old.get("index", -1))
            if peer.pid == old.get("pid") and peer.alive():
                seg.close()
                raise ValueError(f"Weights {name!r} is already published by process {old['index']} (pid "
                                 f"{old['pid']}); one process publishes each name: use another name, or "
                                 f"publish from that process") from None
            job_module.write_record(store.job_dir, "weights", name, record, replace=True)
        ch = _Channel(store, name, seg, record)
        ch.cells[_H_MAGIC] = MAGIC
        ch.publisher = _Publisher(store, ch, max_buffers)
        _channels[key] = ch
        return ch


class Weights:
    """A named channel of versioned state dicts, usable from any process of the job.

    ``publish`` (one process per name) copies the tensors into reused shared buffers and
    returns the new version (1, 2, ...). ``latest``/``wait_newer`` return ``(version, sd)``:
    ``sd`` has the published structure and keys, and its tensors are read-only-by-convention
    views of the shared buffer (zero-copy), valid as long as you keep them. ``max_buffers``
    bounds the buffer sets the publisher keeps while readers hold old versions (then it waits).
    """

    def __init__(self, name: str, max_buffers: int = DEFAULT_MAX_BUFFERS) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Weights needs a non-empty string name, not {name!r}")
        if not 2 <= max_buffers <= MAX_BUFFERS:
            raise ValueError(f"max_buffers={max_buffers} must be between 2 and {MAX_BUFFERS}")
        self.name = name
        self.max_buffers = max_buffers

    def __reduce__(self) -> tuple:
        return Weights, (self.name, self.max_buffers)

    def __repr__(self) -> str:
        return f"Weights({self.name!r})"

    def publish(self, state_dict: Any) -> int:
        """Publish a new version (any structure of tensors); returns its number."""
        store = core.current()
        ch = _find(store, self.name)
        publisher = None if ch is None else ch.publisher
        if publisher is None:
            publisher = _become_publisher(store, self.name, self.max_buffers).publisher
            assert publisher is not None, "a channel made to publish has its publisher"
        return publisher.publish(state_dict)

    def latest(self) -> tuple[int, Any]:
        """The newest complete version and its state dict; ``(0, None)`` before the first."""
        ch = _find(core.current(), self.name)
        if ch is None:
            return 0, None
        return ch.read()

    def wait_newer(self, version: int, timeout: float | None = None) -> tuple[int, Any]:
        """Block until a version newer than ``version`` is published, then return the newest.
        Raises ``GetTimeoutError`` after ``timeout`` seconds, ``OwnerDiedError`` at once when
        the publisher dies (the versions already read stay valid)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        store = core.current()
        pause = 0.001
        while True:
            ch = _find(store, self.name)
            if ch is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise GetTimeoutError(f"nothing was published as weights {self.name!r} within {timeout}s", timeout)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 0.02)
        try:
            ch.wait_newer(version, deadline)
        except GetTimeoutError:
            raise GetTimeoutError(f"no version of weights {self.name!r} newer than {version} within {timeout}s",
                                  timeout) from None
        return ch.read()

    def load_into(self, module: torch.nn.Module) -> int:
        """Copy the newest version into ``module``'s parameters and buffers (strict keys);
        returns its number, or 0 (module untouched) before the first publication."""
        v, sd = self.latest()
        if sd is None:
            return 0
        module.load_state_dict(sd)
        return v
