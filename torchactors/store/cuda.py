"""CUDA tensors in the store: exported in place through CUDA IPC, never copied.

Box in the data flow (the CUDA branch of put, get and reclaim; the design's "How data flows" 1-4)::

    put(cuda t) -> KINDS[CudaMeta].put, or REDUCERS["cuda"] inside a structure
        -> export t's allocation block once per storage (torch's ``_share_cuda_``), record an
           interprocess event on the current stream -> a ``CudaMeta`` (handle, event, layout ...);
           the owner's entry keeps t (no copy, no pool block)
    ObjectRef --(any message)--> get(ref) -> KINDS[CudaMeta].rebuild / ``rebuild_cuda_tensor``
        -> open the block once per process (weak cache, as torch's SharedCache)
        -> the consumer's current stream waits on the producer's event
        -> a view of the same GPU bytes (in the owner: a view of the kept tensor)
    last ref dropped everywhere -> owner's reclaim drops t, hands torch's counter slot back
        -> ``torch.cuda.ipc_collect()``

Importing this module registers the CUDA kind (``records.KINDS``) and reducer
(``serialize.REDUCERS``); it calls no ``torch.cuda`` function, so a CPU-only process never
initializes CUDA.

Lifetime. The store's hold tables decide when an object is free, not torch's IPC reference
counter: torch counts one consumer per export, and one ``put`` is read by any number of
processes. So consumers never touch the counter (they open with a name that names no file),
and the owner holds its export's slot at 1 itself while any object made from that export
lives: if the owner's own tensor lets go of the memory meanwhile (``p.data = ...``,
``set_``, ``resize_``, ``Module.half()``), torch parks the block in its limbo instead of
reusing it under the consumers. A consumer's tensor keeps its ``ObjectRef`` (and the opened
block) alive through a pin on the storage it views, as the CPU path's mappings do. Before a
pin lets go it synchronizes the consumer's device, so the owner never reuses bytes a pending
kernel (on any of the consumer's streams) still reads.

- Consumer death. torch's docs (Multiprocessing best practices, "Sharing CUDA tensors") warn
  that a consumer killed by a fatal signal leaks the shared tensor for as long as the producer
  runs, because its reference count is never decremented. Here a dead process's holds are
  ignored at the owner's next reclaim, so the object is released like any other; what the
  dead consumer leaks is only its own process state, which the driver tears down with its
  CUDA context.
- Owner death. Later gets raise ``OwnerDiedError``. Tensors a consumer already rebuilt view
  memory of a dead process: as torch says, the producer must outlive the consumers' use.
- ``free(ref)`` releases now: views already rebuilt stay mapped but the owner may reuse the
  bytes (as for CPU objects).
- When. Released objects go back to the owner's GPU allocator at its reclaim points: its next
  put (CUDA puts trigger one), ``stats()``, or a pool allocation. torch's ref-counter file
  (``/dev/shm/torch_<pid>_*``, made by the first export) is unlinked by torch once every
  exported storage is gone and ``ipc_collect`` runs, or at a clean interpreter exit: an
  owner that leaves through a signal or ``os._exit`` leaves it behind.
- Device indices must name the same GPUs in every process (same ``CUDA_VISIBLE_DEVICES``).
- Exporting wraps the storage's memory in torch's IPC bookkeeping for the rest of its life,
  and torch's caching allocator then ignores ``record_stream`` on it: a tensor that was put
  and is used on a side stream must be synchronized before its last reference is dropped.
- CUDA IPC needs torch's native caching allocator: with ``backend:cudaMallocAsync`` or a
  pluggable allocator ``put`` of a CUDA tensor raises.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

from torchactors.errors import ObjectFreedError
from torchactors.store import _current, serialize
from torchactors.store.records import CudaMeta, Kind, Placed, register

if TYPE_CHECKING:
    from torchactors.store.core import Store
    from torchactors.store.refs import ObjectRef

logger = logging.getLogger(__name__)

MAX_EVENTS = 1000       # live interprocess events per process; beyond, put synchronizes instead
NO_COUNTER = b"/torchactors-no-ipc-counter"   # names no file: torch's consumer-side decrement is a no-op

_PIN = "_torchactors_pin"       # on a consumer's storage: the _Pin keeping its object and block alive
_EXPORT = "_torchactors_ipc"    # on an owner's storage: its live _Export, reused by later puts

_lock = threading.RLock()       # reentrant: finalizers below may run while it is held
_owned: weakref.WeakValueDictionary[tuple, torch.UntypedStorage] = weakref.WeakValueDictionary()
_opened: weakref.WeakValueDictionary[tuple, torch.UntypedStorage] = weakref.WeakValueDictionary()
_events_live = 0
_warned_clone = False


# -- put ----------------------------------------------------------------------------------------

class _Export:
    """One CUDA IPC export of a storage, shared by every object put from it while any lives.
    Holds the storage and torch's ref-counter slot for the export (left at 1 until the last of
    those objects is released), so the memory outlives the owner's own use of it."""

    __slots__ = ("storage", "key", "device", "handle", "nbytes", "offset_bytes", "counter", "counter_offset",
                 "live")

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.key = (storage.data_ptr(), storage.nbytes())
        (self.device, self.handle, self.nbytes, self.offset_bytes, self.counter, self.counter_offset,
         _event, _sync) = storage._share_cuda_()
        self.storage: torch.UntypedStorage | None = storage
        self.live = 0

    def drop(self) -> None:
        """One object made from this export is released; after the last, give torch its slot
        back and let it free the block (now, or from its limbo if the owner let go already)."""
        with _lock:
            self.live -= 1
            if self.live:
                return
            storage, self.storage = self.storage, None
            if getattr(storage, _EXPORT, None) is self:
                delattr(storage, _EXPORT)
        torch.UntypedStorage._release_ipc_counter_cuda(self.counter, self.counter_offset)
        del storage
        torch.cuda.ipc_collect()


class _Kept:
    """What the owner's entry holds for one CUDA object: its export and its ready event.
    Its release is a reclaim point: torch may then free blocks it held for IPC."""

    __slots__ = ("export", "event")

    def __init__(self, export: _Export, event: Any) -> None:
        self.export: _Export | None = export
        self.event = event

    def __del__(self) -> None:
        global _events_live
        export, self.export = self.export, None
        had_event, self.event = self.event is not None, None
        try:
            if had_event:
                with _lock:
                    _events_live -= 1
            if export is not None:
                export.drop()
        except Exception:       # interpreter shutdown
            pass


def put_cuda_tensor(store: Store, t: torch.Tensor, timeout: float | None) -> Placed:
    """``KINDS[CudaMeta].put``: no pool block; the entry keeps the export (``timeout``: no
    space to wait for)."""
    _reclaim(store)
    meta, kept = share(t)
    return Placed(None, 0, 0, kept, meta, True)


def reduce_cuda_tensor(t: torch.Tensor, layout: serialize.StoreLayout) -> serialize.Reduced:
    """``REDUCERS["cuda"]``: the tensor stays where it is; the skeleton carries its meta."""
    _reclaim(_current.active())
    meta, kept = share(t)
    if kept is not None:
        layout.keep.append(kept)
    return (rebuild_cuda_tensor, (tuple(meta),))


def share(t: torch.Tensor) -> tuple[CudaMeta, _Kept | None]:
    """The meta of ``t`` and what the owner must keep while the object lives."""
    device = t.device.index
    is_param = isinstance(t, torch.nn.Parameter)
    if t.numel() == 0:
        return CudaMeta("c", device, None, 0, 0, None, t.dtype, tuple(t.shape), t.stride(), 0,
                        t.requires_grad, is_param), None
    t, export = _exportable(t)
    try:
        event, event_handle = _ready_event(t.device)
    except BaseException:
        export.drop()
        raise
    meta = CudaMeta("c", export.device, export.handle, export.nbytes, export.offset_bytes, event_handle,
                    t.dtype, tuple(t.shape), t.stride(), int(t.storage_offset()), t.requires_grad, is_param)
    return meta, _Kept(export, event)


def _exportable(t: torch.Tensor) -> tuple[torch.Tensor, _Export]:
    """``t`` and its export (one more live object counted on it), or a clone's if ``t``'s
    storage cannot be exported from here (it was itself received over IPC)."""
    global _warned_clone
    storage = t.untyped_storage()
    if getattr(storage, _PIN, None) is None:
        try:
            return t, _export(storage)
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
    else:
        reason = "its storage was received from another process"
    c = t.detach().clone()
    try:
        export = _export(c.untyped_storage())
    except RuntimeError as e:
        raise RuntimeError(
            f"cannot share a CUDA tensor through CUDA IPC: {reason}; nor a copy of it "
            f"({str(e).splitlines()[0]}). CUDA IPC needs torch's native caching allocator: unset "
            f"PYTORCH_CUDA_ALLOC_CONF's backend:cudaMallocAsync or any pluggable allocator, or put "
            f"t.cpu() instead") from None
    if not _warned_clone:
        _warned_clone = True
        logger.warning("put of a CUDA tensor that cannot be exported in place (%s): storing a clone. "
                       "Put the original in the process that made it to avoid the copy "
                       "(this warning is shown once)", reason)
    return c, export


def _export(storage: torch.UntypedStorage) -> _Export:
    """The storage's live export, or a new one; counts one more object made from it."""
    with _lock:
        export = getattr(storage, _EXPORT, None)
        if export is None or export.key != (storage.data_ptr(), storage.nbytes()):
            export = _Export(storage)
            setattr(storage, _EXPORT, export)
            _owned[(export.handle, export.offset_bytes)] = storage
        export.live += 1
        return export


def _ready_event(device: torch.device) -> tuple[Any, bytes | None]:
    """An interprocess event recorded on the current stream after the data is ready, and its
    handle; or (None, None) after synchronizing the stream when too many events are live."""
    global _events_live
    stream = torch.cuda.current_stream(device)
    with _lock:
        room = _events_live < MAX_EVENTS
        if room:
            _events_live += 1
    if not room:
        stream.synchronize()
        return None, None
    try:
        with torch.cuda.device(device):
            event = torch.cuda.Event(interprocess=True)
            event.record(stream)
            return event, bytes(event.ipc_handle())
    except BaseException:
        with _lock:
            _events_live -= 1
        raise


def _reclaim(store: Store | None) -> None:
    """A CUDA put is a reclaim point: CUDA objects use no pool block, so nothing else would
    return the GPU memory of released ones."""
    if store is not None and store.candidates and not store.closed:
        store._reclaim()


# -- get ----------------------------------------------------------------------------------------

class _Pin:
    """Hung on the storage a consumer's tensor views: keeps the object's ref and the opened
    block alive while any view exists; on release, lets this process's work on it finish first."""

    __slots__ = ("opened", "ref", "device")

    def __init__(self, opened: Any, ref: Any, device: int | None) -> None:
        self.opened = opened
        self.ref = ref
        self.device = device

    def __del__(self) -> None:
        try:
            if self.device is not None and torch.cuda.is_initialized():
                torch.cuda.synchronize(self.device)     # every stream: any may still read the block
        except Exception:       # interpreter shutdown, or a CUDA error already reported
            pass
        self.opened = None      # closes the block if this was its last view here
        self.ref = None         # then the owner may reuse the bytes


def alias_storage(base: torch.UntypedStorage, nbytes: int, device: torch.device, pin: Any) -> torch.UntypedStorage:
    """A storage over the first ``nbytes`` of ``base`` that keeps ``pin`` alive as long as any
    tensor views it (torch keeps a storage's Python object, and so its attributes, alive with it)."""
    s: Any = torch._C._construct_storage_from_data_pointer(base.data_ptr(), device, nbytes)
    setattr(s, _PIN, pin)
    return s


def rebuild_cuda_tensor(meta: tuple) -> torch.Tensor:
    """The rebuild function in a structure's skeleton (the pair of ``reduce_cuda_tensor``),
    checked against the object ``get`` is reading."""
    reader = serialize.reading()
    return rebuild(reader.store, reader.ref, meta)


def get_cuda_tensor(store: Store, ref: ObjectRef, seg: None) -> torch.Tensor:
    """``KINDS[CudaMeta].rebuild``."""
    return rebuild(store, ref, ref.meta)


def rebuild(store: Store, ref: ObjectRef, meta: tuple) -> torch.Tensor:
    """A view of the object's GPU bytes, ordered after the producer's writes (``meta``: a
    ``CudaMeta`` or its wire tuple, as a skeleton carries it)."""
    (_, device, handle, nbytes, offset_bytes, event_handle, dtype, shape, stride, offset,
     requires_grad, is_param) = meta
    store.check_live(ref)
    dev = torch.device("cuda", device)
    if handle is None:
        t = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
        return serialize.finish_tensor(t, requires_grad, is_param)
    if ref.owner_pid == os.getpid():
        storage = _owned.get((handle, offset_bytes))
        if storage is None:
            raise ObjectFreedError(ref.id, "its CUDA storage is gone")
    else:
        try:
            opened = _open(device, handle, nbytes, offset_bytes)
            storage = alias_storage(opened, nbytes, dev, _Pin(opened, ref, device))
            if event_handle is not None:
                torch.cuda.Event.from_ipc_handle(device, event_handle).wait(torch.cuda.current_stream(device))
        except RuntimeError:
            store.check_live(ref)   # the owner died or freed it meanwhile: say so, not a CUDA error
            raise
    t = torch.empty(0, dtype=dtype, device=dev).set_(storage, offset, shape, stride)
    return serialize.finish_tensor(t, requires_grad, is_param)


def _open(device: int, handle: bytes, nbytes: int, offset_bytes: int) -> torch.UntypedStorage:
    """The producer's storage, opened once per process while any view of it lives here."""
    key = (handle, offset_bytes)
    with _lock:
        s = _opened.get(key)
        if s is None:
            torch.cuda.init()
            s = torch.UntypedStorage._new_shared_cuda(device, handle, nbytes, offset_bytes, NO_COUNTER, 0,
                                                      b"", False)
            _opened[key] = s
        return s


register(Kind(CudaMeta, "cuda", put_cuda_tensor, get_cuda_tensor, checks_itself=True))
serialize.register_reducer("cuda", reduce_cuda_tensor)
