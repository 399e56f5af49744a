"""Reducers: how tensors and storages cross a process boundary, as symmetric pairs.

Box in the data flow: ``put`` of a structure pickles it with ``StorePickler``. Each tensor
kind has one ``reduce_X`` (in the putting process) and one ``rebuild_X`` (in the getting
process), side by side, registered once in ``REDUCERS``. Tensor *bytes* never enter the
pickle: CPU storages are gathered into the object's block and the skeleton only says where.
``MessagePickler`` is the runtime's variant for call arguments: a message's tensors are put
into the store once it is pickled (views of one storage as one object, as one ``put`` keeps
them) and travel as refs, rebuilt as views on arrival.
"""

from __future__ import annotations

import io
import pickle
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cloudpickle
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from torchactors.store import _current
from torchactors.store.records import SharedLoc
from torchactors.store.segments import SharedFile, align_up, shared_file

if TYPE_CHECKING:
    from torchactors.store.core import Store
    from torchactors.store.refs import ObjectRef

_local = threading.local()

Reduced = tuple  # (rebuild function, args)


SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def tensor_kind(t: torch.Tensor) -> str:
    """The key of ``t`` in ``REDUCERS``: one entry per kind, no device branches elsewhere.
    Kinds wrap others (a nested tensor of a device, a quantized tensor's integer storage):
    the outer kind comes first."""
    if t.is_nested:
        return "nested"
    if isinstance(t, _masked_tensor_type()):
        return "masked"
    layout = t.layout
    if layout == torch.sparse_coo:
        return "sparse_coo"
    if layout in SPARSE_COMPRESSED:
        return "sparse_compressed"
    if layout != torch.strided:
        return f"unsupported layout {layout}"
    if t.is_quantized:
        return "quantized"
    if type(t) not in PLAIN_TYPES and is_traceable_wrapper_subclass(t):
        return "wrapper_subclass"
    return t.device.type


def is_plain(t: torch.Tensor) -> bool:
    """A dense tensor or Parameter with no conj/neg bit: what the single putters store as raw bytes."""
    return (type(t) in PLAIN_TYPES and t.layout == torch.strided and not t.is_quantized and not t.is_nested
            and not t.is_conj() and not t.is_neg())


_MASKED = None


def _masked_tensor_type() -> type:
    global _MASKED
    if _MASKED is None:
        from torch.masked import MaskedTensor
        _MASKED = MaskedTensor
    return _MASKED


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
        self.shared: list[SharedFile] = []            # storages torch already shares: aliased
        self.shared_storages: list[torch.UntypedStorage] = []
        self._shared_index: dict[int, int] = {}

    def add_shared(self, storage: torch.UntypedStorage) -> int | None:
        """Index of ``storage`` among the object's aliased shared storages, or None when it
        is not shared through an fd (then its bytes are copied with ``add``)."""
        if not storage.nbytes():
            return None
        key = storage.data_ptr()
        i = self._shared_index.get(key)
        if i is None:
            found = shared_file(storage)
            if found is None:
                return None
            i = self._shared_index[key] = len(self.shared)
            self.shared.append(found)
            self.shared_storages.append(storage)
        return i

    def shared_locs(self) -> tuple[SharedLoc, ...]:
        return tuple(SharedLoc(f.fd, f.inode, f.size) for f in self.shared)

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
    storage = t.untyped_storage()
    if storage.is_shared():
        i = layout.add_shared(storage)
        if i is not None:       # aliased, as a bare shared tensor is
            return (rebuild_shared_tensor, (i, t.dtype, tuple(t.shape), t.stride(), t.storage_offset(),
                                            t.requires_grad, isinstance(t, torch.nn.Parameter)))
    rel = layout.add(storage)
    return (rebuild_cpu_tensor, (rel, t.untyped_storage().nbytes(), t.dtype, tuple(t.shape), t.stride(),
                                 t.storage_offset(), t.requires_grad, isinstance(t, torch.nn.Parameter)))


def rebuild_cpu_tensor(rel: int, nbytes: int, dtype: torch.dtype, shape: tuple, stride: tuple,
                       storage_offset: int, requires_grad: bool, is_param: bool) -> torch.Tensor:
    storage = _block_storage(rel, nbytes)
    t = torch.empty(0, dtype=dtype).set_(storage, storage_offset, shape, stride)
    return finish_tensor(t, requires_grad, is_param)


def rebuild_shared_tensor(i: int, dtype: torch.dtype, shape: tuple, stride: tuple, storage_offset: int,
                          requires_grad: bool, is_param: bool) -> torch.Tensor:
    shared = reading().shared
    if shared is None:
        raise ValueError("the object's skeleton names an aliased shared storage that its ref does not carry")
    t = torch.empty(0, dtype=dtype).set_(shared(i), storage_offset, shape, stride)
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
    d = t.detach()
    return (rebuild_sparse_coo, (d._indices(), d._values(), tuple(t.shape), t.is_coalesced(), t.requires_grad))


def rebuild_sparse_coo(indices: torch.Tensor, values: torch.Tensor, shape: tuple, coalesced: bool,
                       requires_grad: bool) -> torch.Tensor:
    # Checked: rebuilt indices that are out of range raise instead of crashing later.
    t = torch.sparse_coo_tensor(indices, values, shape, is_coalesced=coalesced, check_invariants=True)
    return t.requires_grad_(requires_grad) if requires_grad else t


def reduce_sparse_compressed(t: torch.Tensor, layout: StoreLayout) -> Reduced:
    d = t.detach()
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        compressed, plain = d.crow_indices(), d.col_indices()
    else:
        compressed, plain = d.ccol_indices(), d.row_indices()
    return (rebuild_sparse_compressed, (compressed, plain, d.values(), tuple(t.shape), t.layout, t.requires_grad))


def rebuild_sparse_compressed(compressed: torch.Tensor, plain: torch.Tensor, values: torch.Tensor, shape: tuple,
                              layout: torch.layout, requires_grad: bool) -> torch.Tensor:
    t = torch.sparse_compressed_tensor(compressed, plain, values, shape, layout=layout, check_invariants=True)
    return t.requires_grad_(requires_grad) if requires_grad else t


_QUANTIZED_INT = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}
_PER_TENSOR = (torch.per_tensor_affine,)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_affine_float_qparams)


def reduce_quantized(t: torch.Tensor, layout: StoreLayout) -> Reduced:
    """Per-tensor: the integer storage as it is (strides and offset kept) and (scale, zero
    point). Per-channel: the integers, the per-channel scales and zero points, the axis."""
    scheme = t.qscheme()
    params: tuple
    if t.dtype not in _QUANTIZED_INT or t.device.type != "cpu":
        raise TypeError(f"torchactors cannot store a {t.device.type} quantized tensor of dtype {t.dtype}; "
                        f"store t.int_repr() with t.q_scale() and t.q_zero_point(), or t.dequantize()")
    if scheme in _PER_TENSOR:
        ints = torch.empty(0, dtype=_QUANTIZED_INT[t.dtype]).set_(t.untyped_storage())
        params = (float(t.q_scale()), int(t.q_zero_point()))
        return (rebuild_quantized, (ints, scheme, params, tuple(t.shape), t.stride(), t.storage_offset()))
    if scheme in _PER_CHANNEL:
        if not t.is_contiguous():
            raise TypeError("torchactors cannot keep the strides of a non-contiguous per-channel quantized "
                            "tensor; store t.contiguous()")
        params = (t.q_per_channel_scales(), t.q_per_channel_zero_points(), int(t.q_per_channel_axis()))
        return (rebuild_quantized, (t.int_repr(), scheme, params, tuple(t.shape), t.stride(), 0))
    raise TypeError(f"torchactors cannot store a quantized tensor with scheme {scheme}; "
                    f"store t.dequantize() or its int_repr() and parameters")


def rebuild_quantized(ints: torch.Tensor, scheme: torch.qscheme, params: tuple, shape: tuple, stride: tuple,
                      storage_offset: int) -> torch.Tensor:
    if scheme in _PER_TENSOR:
        flat = torch._make_per_tensor_quantized_tensor(ints, params[0], params[1])
        return flat.as_strided(shape, stride, storage_offset)
    return torch._make_per_channel_quantized_tensor(ints, params[0], params[1], params[2])


def reduce_nested(t: Any, layout: StoreLayout) -> Reduced:
    """A nested tensor travels as its components and comes back built from them (a copy)."""
    if t.layout == torch.jagged and t._ragged_idx != 1:
        raise TypeError("torchactors cannot store a jagged nested tensor whose ragged dimension is not 1 "
                        "(a transposed one); store it before transposing, or store t.unbind()")
    parts = list(t.detach().unbind())
    return (rebuild_nested, (parts, t.layout, t.requires_grad))


def rebuild_nested(parts: list, layout: torch.layout, requires_grad: bool) -> torch.Tensor:
    return torch.nested.nested_tensor(parts, layout=layout, requires_grad=requires_grad)


def reduce_masked(t: Any, layout: StoreLayout) -> Reduced:
    return (rebuild_masked, (t.get_data().detach(), t.get_mask(), t.requires_grad))


def rebuild_masked(data: torch.Tensor, mask: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return _masked_tensor_type()(data, mask, requires_grad=requires_grad)


def reduce_wrapper_subclass(t: Any, layout: StoreLayout) -> Reduced:
    """A tensor subclass that wraps inner tensors (no storage of its own): through its
    ``__tensor_flatten__`` / ``__tensor_unflatten__`` pair."""
    names, ctx = t.__tensor_flatten__()
    inner = {n: getattr(t, n) for n in names}
    return (rebuild_wrapper_subclass, (type(t), inner, ctx, tuple(t.shape), t.stride(), t.requires_grad))


def rebuild_wrapper_subclass(cls: Any, inner: dict, ctx: Any, shape: tuple, stride: tuple,
                             requires_grad: bool) -> torch.Tensor:
    t = cls.__tensor_unflatten__(inner, ctx, shape, stride)
    return t.requires_grad_(requires_grad) if requires_grad else t


REDUCERS: dict[str, Callable[[torch.Tensor, StoreLayout], Reduced]] = {
    "cpu": reduce_cpu_tensor,
    "meta": reduce_meta_tensor,
    "sparse_coo": reduce_sparse_coo,
    "sparse_compressed": reduce_sparse_compressed,
    "quantized": reduce_quantized,
    "nested": reduce_nested,
    "masked": reduce_masked,
    "wrapper_subclass": reduce_wrapper_subclass,
}
# Kinds whose reducers handle the tensor's class themselves (or are not subclassable).
_OWN_CLASS = {"nested", "masked", "wrapper_subclass"}


def register_reducer(kind: str, reduce: Callable[[torch.Tensor, StoreLayout], Reduced]) -> None:
    """Add a tensor kind (the CUDA module registers "cuda" this way)."""
    REDUCERS[kind] = reduce


def reduce_tensor(t: torch.Tensor, layout: StoreLayout) -> Reduced:
    """Peel what wraps a plain tensor (a subclass and its attributes, a conj or neg bit), then
    reduce it by kind. Anything a reducer cannot take is a TypeError naming the kind."""
    check_shareable(t)
    kind = tensor_kind(t)
    if type(t) not in PLAIN_TYPES and kind not in _OWN_CLASS:
        with torch._C.DisableTorchFunctionSubclass():
            base = t.detach()
        state = dict(getattr(t, "__dict__", {}))
        return (rebuild_subclass, (type(t), base, state, t.requires_grad))
    if t.layout == torch.strided and (t.is_conj() or t.is_neg()):
        # conj()/_neg_view() of a tensor carrying the bit gives the same storage without it.
        base = t.conj() if t.is_conj() else t
        base = torch._neg_view(base) if base.is_neg() else base
        return (rebuild_bits, (base, t.is_conj(), t.is_neg()))
    reduce = REDUCERS.get(kind)
    if reduce is None:
        raise TypeError(f"torchactors cannot store a tensor of kind {kind!r}; supported: {sorted(REDUCERS)}. "
                        f"Move it to a supported device or layout first (e.g. .cpu() or .to_dense())")
    try:
        return reduce(t, layout)
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        raise TypeError(f"torchactors cannot store this tensor of kind {kind!r} ({type(t).__name__}, "
                        f"{t.dtype}, layout {t.layout}): {e}. Store a dense copy instead "
                        f"(e.g. .to_dense() or .contiguous())") from e


def rebuild_subclass(cls: type, base: torch.Tensor, state: dict, requires_grad: bool) -> torch.Tensor:
    t: torch.Tensor = base.as_subclass(cls)
    if requires_grad and not t.requires_grad:
        t.requires_grad_(True)
    if state:
        t.__dict__.update(state)
    return t


def rebuild_bits(base: torch.Tensor, conj: bool, neg: bool) -> torch.Tensor:
    t = torch._neg_view(base) if neg else base
    return t.conj() if conj else t


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
    """Gives rebuild functions the object being read (``store``, ``ref``: the CUDA rebuild
    checks its object) and its storages: one per stored storage, each pinning the ref so the
    bytes outlive any tensor viewing them."""

    def __init__(self, store: Store, ref: ObjectRef, make_storage: Callable[[int, int], torch.UntypedStorage],
                 shared: Callable[[int], torch.UntypedStorage] | None = None) -> None:
        self.store = store
        self.ref = ref
        self.make_storage = make_storage
        self.shared = shared            # index -> an aliased shared storage of the object
        self.cache: dict[int, torch.UntypedStorage] = {}

    def __enter__(self) -> BlockReader:
        self._prev = getattr(_local, "reader", None)
        _local.reader = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.reader = self._prev


def reading() -> BlockReader:
    """The object this thread's ``get`` is rebuilding (for rebuild functions)."""
    reader: BlockReader | None = getattr(_local, "reader", None)
    if reader is None:
        raise RuntimeError("a stored tensor can only be rebuilt by torchactors' get()")
    return reader


def _block_storage(rel: int, nbytes: int) -> torch.UntypedStorage:
    reader = reading()
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


class _MessageReducers(pickle.Pickler):
    """Shared by both message picklers: each tensor is replaced by its index in the message;
    once the whole message is pickled, its tensors are put into this process's store and
    travel as refs, so no tensor bytes ever enter the pipe."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self._seen: dict[int, int] = {}

    def _other(self, obj: Any) -> Any:
        """How a non-tensor is reduced (NotImplemented: by pickle's own rules)."""
        return NotImplemented

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return self._other(obj)
        i = self._seen.get(id(obj))
        if i is None:
            i = self._seen[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return (_message_tensor, (i,))


class MessagePickler(_MessageReducers):
    """The fast path: the C pickler, with a Python hook for tensors only."""


class CloudMessagePickler(_MessageReducers, cloudpickle.Pickler):
    """The fallback for what plain pickle refuses (lambdas, classes defined in __main__ or
    inside functions): pickled by value."""

    def _other(self, obj: Any) -> Any:
        return cloudpickle.Pickler.reducer_override(self, obj)


def dumps_message(obj: Any, put: Callable[[Any], Any]) -> bytes:
    """Pickle a message whose tensors travel as store refs. Tensors that share a storage are
    put as one object, so that they come back as views of one storage, as in one ``put``;
    the others are put one by one (the single-tensor fast path)."""
    buf = io.BytesIO()
    try:
        pickler: _MessageReducers = MessagePickler(buf)
        pickler.dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        buf = io.BytesIO()
        pickler = CloudMessagePickler(buf)
        pickler.dump(obj)
    tensors = pickler.tensors
    if not tensors:
        return buf.getvalue()
    return pickle.dumps(_Message(_put_message_tensors(tensors, put), buf.getvalue()), pickle.HIGHEST_PROTOCOL)


def _put_message_tensors(tensors: list[torch.Tensor], put: Callable[[Any], Any]) -> list:
    """Per tensor, a ref to it or (ref of a list of tensors, index in the list)."""
    if len(tensors) == 1:
        return [put(tensors[0])]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        try:
            storage = t.untyped_storage()
            key = (storage.device, storage.data_ptr()) if storage.nbytes() else ("empty", i)
        except (RuntimeError, NotImplementedError, TypeError):     # no storage of its own (sparse, wrapper)
            key = ("own", i)
        groups.setdefault(key, []).append(i)
    parts: list = [None] * len(tensors)
    try:
        for members in groups.values():
            if len(members) == 1:
                parts[members[0]] = put(tensors[members[0]])
            else:
                ref = put([tensors[i] for i in members])
                for j, i in enumerate(members):
                    parts[i] = (ref, j)
                del ref
    except BaseException:
        parts.clear()       # the traceback keeps this frame: let what was put go now
        raise
    return parts


class _Message:
    """A pickled message and the refs of its tensors; unpickles to the message itself."""

    __slots__ = ("parts", "body")

    def __init__(self, parts: list, body: bytes) -> None:
        self.parts = parts
        self.body = body

    def __reduce__(self) -> tuple:
        return (_open_message, (self.parts, self.body))


def _open_message(parts: list, body: bytes) -> Any:
    st = _current.required("opening a message that holds torchactors refs")
    groups: dict[int, list] = {}
    values = []
    for part in parts:
        if isinstance(part, tuple):
            ref, j = part
            group = groups.get(id(ref))
            if group is None:
                group = groups[id(ref)] = st.get(ref)
            values.append(group[j])
        else:
            values.append(st.get(part))
    stack = getattr(_local, "messages", None)
    if stack is None:
        stack = _local.messages = []
    stack.append(values)
    try:
        return pickle.loads(body)
    finally:
        stack.pop()


def _message_tensor(i: int) -> torch.Tensor:
    stack = getattr(_local, "messages", None)
    if not stack:
        raise RuntimeError("a tensor of a torchactors message can only be rebuilt with its message")
    return stack[-1][i]
