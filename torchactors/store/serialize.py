"""Reducers: how tensors and storages cross a process boundary, as symmetric pairs.

Box in the data flow: ``put`` of a structure pickles it with ``StorePickler``. Each tensor
kind has one ``reduce_X`` (in the putting process) and one ``rebuild_X`` (in the getting
process), side by side, registered once in ``REDUCERS``. Tensor *bytes* never enter the
pickle: CPU storages are gathered into the object's block and the skeleton only says where.
``MessagePickler`` is the runtime's variant for call arguments and results: every tensor
becomes a store object of its own and travels as a ref, rebuilt as a view on arrival.
"""

from __future__ import annotations

import io
import pickle
import threading
from typing import Any, Callable, Optional

import cloudpickle
import torch

from torchactors.store.segments import align_up

_local = threading.local()

Reduced = tuple  # (rebuild function, args)


def tensor_kind(t: torch.Tensor) -> str:
    """The key of ``t`` in ``REDUCERS``: one entry per kind, no device branches elsewhere."""
    if t.layout == torch.sparse_coo:
        return "sparse_coo"
    if t.layout != torch.strided:
        return f"unsupported layout {t.layout}"
    return t.device.type


def check_shareable(t: torch.Tensor) -> None:
    if t.requires_grad and not t.is_leaf:
        raise RuntimeError(
            "cannot put a non-leaf tensor that requires grad: its autograd graph cannot be shared "
            "between processes. Call .detach() first (and .requires_grad_() on the copy if you need a "
            "leaf that requires grad)")


class StoreLayout:
    """The storages gathered while pickling one object: each copied once into the block,
    so views of one storage come back as views of one storage."""

    def __init__(self) -> None:
        self.storages: list[torch.UntypedStorage] = []
        self.offsets: list[int] = []
        self.keep: list[Any] = []          # what must live as long as the object (e.g. CUDA tensors)
        self._index: dict[tuple[int, int], int] = {}
        self.nbytes = 0

    def add(self, storage: torch.UntypedStorage) -> int:
        """Relative byte offset of ``storage`` in the block (added once)."""
        key = (storage.data_ptr(), storage.nbytes())
        i = self._index.get(key) if key[1] else None
        if i is None:
            i = len(self.storages)
            self.storages.append(storage)
            self.offsets.append(self.nbytes)
            self.nbytes = align_up(self.nbytes + storage.nbytes())
            if key[1]:
                self._index[key] = i
        return self.offsets[i]


# -- the reducer table: kind -> reduce function; rebuild functions sit beside each ----------

def reduce_cpu_tensor(t: torch.Tensor, layout: StoreLayout) -> Reduced:
    rel = layout.add(t.untyped_storage())
    return (rebuild_cpu_tensor, (rel, t.untyped_storage().nbytes(), t.dtype, tuple(t.shape), t.stride(),
                                 t.storage_offset(), t.requires_grad, isinstance(t, torch.nn.Parameter)))


def rebuild_cpu_tensor(rel: int, nbytes: int, dtype: torch.dtype, shape: tuple, stride: tuple,
                       storage_offset: int, requires_grad: bool, is_param: bool) -> torch.Tensor:
    storage = _block_storage(rel, nbytes)
    t = torch.empty(0, dtype=dtype).set_(storage, storage_offset, shape, stride)
    return finish_tensor(t, requires_grad, is_param)


def reduce_meta_tensor(t: torch.Tensor, layout: StoreLayout) -> Reduced:
    return (rebuild_meta_tensor, (t.dtype, tuple(t.shape), t.stride(), t.storage_offset(),
                                  t.requires_grad, isinstance(t, torch.nn.Parameter)))


def rebuild_meta_tensor(dtype: torch.dtype, shape: tuple, stride: tuple, storage_offset: int,
                        requires_grad: bool, is_param: bool) -> torch.Tensor:
    t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if storage_offset:
        t = t.as_strided(shape, stride, storage_offset)
    return finish_tensor(t, requires_grad, is_param)


def reduce_sparse_coo(t: torch.Tensor, layout: StoreLayout) -> Reduced:
    # indices and values are dense tensors: the pickler reduces them through this table too.
    return (rebuild_sparse_coo, (t._indices(), t._values(), tuple(t.shape), t.is_coalesced(), t.requires_grad))


def rebuild_sparse_coo(indices: torch.Tensor, values: torch.Tensor, shape: tuple, coalesced: bool,
                       requires_grad: bool) -> torch.Tensor:
    # Checked: rebuilt indices that are out of range raise instead of crashing later.
    t = torch.sparse_coo_tensor(indices, values, shape, is_coalesced=coalesced, check_invariants=True)
    return t.requires_grad_(requires_grad) if requires_grad else t


REDUCERS: dict[str, Callable[[torch.Tensor, StoreLayout], Reduced]] = {
    "cpu": reduce_cpu_tensor,
    "meta": reduce_meta_tensor,
    "sparse_coo": reduce_sparse_coo,
}


def register_reducer(kind: str, reduce: Callable[[torch.Tensor, StoreLayout], Reduced]) -> None:
    """Add a tensor kind (the CUDA module registers "cuda" this way)."""
    REDUCERS[kind] = reduce


def reduce_tensor(t: torch.Tensor, layout: StoreLayout) -> Reduced:
    check_shareable(t)
    kind = tensor_kind(t)
    reduce = REDUCERS.get(kind)
    if reduce is None:
        raise TypeError(f"torchactors cannot store a tensor of kind {kind!r}; supported: {sorted(REDUCERS)}. "
                        f"Move it to a supported device or layout first (e.g. .cpu() or .to_dense())")
    return reduce(t, layout)


def finish_tensor(t: torch.Tensor, requires_grad: bool, is_param: bool) -> torch.Tensor:
    if is_param:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _check_host_storage(s: torch.UntypedStorage) -> None:
    """Bare storages are copied into the block from their address: only host memory can be."""
    if s.device.type != "cpu":
        raise TypeError(f"cannot store a bare {s.device.type} storage; store a tensor viewing it instead")


def reduce_untyped_storage(s: torch.UntypedStorage, layout: StoreLayout) -> Reduced:
    _check_host_storage(s)
    return (rebuild_untyped_storage, (layout.add(s), s.nbytes()))


def rebuild_untyped_storage(rel: int, nbytes: int) -> torch.UntypedStorage:
    return _block_storage(rel, nbytes)


def reduce_typed_storage(s: torch.TypedStorage, layout: StoreLayout) -> Reduced:
    _check_host_storage(s._untyped_storage)
    return (rebuild_typed_storage, (layout.add(s._untyped_storage), s._untyped_storage.nbytes(), s.dtype))


def rebuild_typed_storage(rel: int, nbytes: int, dtype: torch.dtype) -> torch.TypedStorage:
    return torch.TypedStorage(wrap_storage=_block_storage(rel, nbytes), dtype=dtype, _internal=True)


# -- the block being rebuilt ----------------------------------------------------------------

class BlockReader:
    """Gives rebuild functions the storages of the object being read: one per stored
    storage, each pinning the ref so the bytes outlive any tensor viewing them."""

    def __init__(self, make_storage: Callable[[int, int], torch.UntypedStorage]) -> None:
        self.make_storage = make_storage
        self.cache: dict[int, torch.UntypedStorage] = {}

    def __enter__(self) -> "BlockReader":
        self._prev = getattr(_local, "reader", None)
        _local.reader = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.reader = self._prev


def _block_storage(rel: int, nbytes: int) -> torch.UntypedStorage:
    reader: Optional[BlockReader] = getattr(_local, "reader", None)
    if reader is None:
        raise RuntimeError("a stored tensor can only be rebuilt by torchactors' get()")
    s = reader.cache.get(rel) if nbytes else None
    if s is None:
        s = reader.make_storage(rel, nbytes)
        if nbytes:
            reader.cache[rel] = s
    return s


# -- picklers ---------------------------------------------------------------------------------

class StorePickler(cloudpickle.Pickler):
    """Pickles an object's skeleton for the store; tensor bytes go to ``layout``."""

    def __init__(self, file: io.BytesIO, layout: StoreLayout) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.layout = layout

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return reduce_tensor(obj, self.layout)
        if isinstance(obj, torch.UntypedStorage):
            return reduce_untyped_storage(obj, self.layout)
        if isinstance(obj, torch.TypedStorage):
            return reduce_typed_storage(obj, self.layout)
        return super().reducer_override(obj)


def dumps_for_store(obj: Any) -> tuple[bytes, StoreLayout]:
    layout = StoreLayout()
    buf = io.BytesIO()
    StorePickler(buf, layout).dump(obj)
    return buf.getvalue(), layout


class _MessageReducers:
    """Shared by both message picklers: each tensor is put into this process's store and
    travels as a ref, so no tensor bytes ever enter the pipe."""

    def __init__(self, file: io.BytesIO, put: Callable[[Any], Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.put = put
        self._seen: dict[int, tuple] = {}

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return self._other(obj)
        ref = self._seen.get(id(obj))
        if ref is None:
            ref = self._seen[id(obj)] = (self.put(obj), obj)
        return (rebuild_tensor_from_ref, (ref[0],))


class MessagePickler(_MessageReducers, pickle.Pickler):
    """The fast path: the C pickler, with a Python hook for tensors only."""

    def _other(self, obj: Any) -> Any:
        return NotImplemented


class CloudMessagePickler(_MessageReducers, cloudpickle.Pickler):
    """The fallback for what plain pickle refuses (lambdas, classes defined in __main__ or
    inside functions): pickled by value."""

    def _other(self, obj: Any) -> Any:
        return cloudpickle.Pickler.reducer_override(self, obj)


def dumps_message(obj: Any, put: Callable[[Any], Any]) -> bytes:
    buf = io.BytesIO()
    try:
        MessagePickler(buf, put).dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        buf = io.BytesIO()
        CloudMessagePickler(buf, put).dump(obj)
    return buf.getvalue()


def rebuild_tensor_from_ref(ref: Any) -> torch.Tensor:
    from torchactors.store import core
    return core.current().get(ref)
