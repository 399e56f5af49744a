"""The records that cross the store's modules and processes, and the one table of object kinds.

Box in the data flow: what ``put`` hands to ``get``. An ``ObjectRef`` carries a ``Location``
(where the bytes are) and a *meta* (how to rebuild the value), one record type per kind of
object:

=================  ====  =================================================================
record             tag   object
=================  ====  =================================================================
``TensorMeta``     "t"   one dense CPU tensor, its bytes in a pool block (or an aliased
                         storage torch already shares)
``PickledMeta``    "p"   a structure: its storages' bytes, then its pickled skeleton
``ValueMeta``      "v"   a structure with no tensor bytes: the skeleton rides in the ref
``CudaMeta``       "c"   one CUDA tensor, exported in place through CUDA IPC (``cuda.py``)
=================  ====  =================================================================

Wire form (see docs/design.md, "Named records, plain tuples on the wire"): each record's first
field is its tag (typed as a ``Literal``, so the type checker holds every construction to it),
so ``tuple(record)`` is exactly the positional tuple refs carried before records had names, and
a 4 KB tensor's pickled ref is as small as it was. ``ObjectRef``
converts at its two edges (``to_wire`` when pickled, ``meta_from_wire``/``location_from_wire``
when built); anything that is not a well-formed record stays as it came, and ``get`` refuses it
as a malformed ref.

``KINDS`` is the one table from record type to its (put, rebuild) pair, in the shape of
torch's ``multiprocessing/reductions.py``: core registers the CPU tensor and the two structure
kinds, ``cuda.py`` registers the CUDA one. Adding a kind is one record, one pair, one
``register`` call. (Tensors *inside* a structure go through ``serialize.REDUCERS`` instead.)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args, get_type_hints

import torch

if TYPE_CHECKING:
    from torchactors.store.core import Store
    from torchactors.store.refs import ObjectRef


class Location(NamedTuple):
    """Where an object's bytes are, as the owner published them: ``nbytes`` at ``offset`` of
    a window of ``size`` bytes at ``file_off`` of the owner's file ``fd`` (inode ``inode``)."""

    fd: int
    inode: int
    offset: int
    nbytes: int
    file_off: int
    size: int


class SharedLoc(NamedTuple):
    """A storage torch already shares through an fd (``share_memory_()``), aliased by a
    structure: peers map all ``size`` bytes of the owner's file ``fd``."""

    fd: int
    inode: int
    size: int


_DTYPE_CODES = {d: i for i, d in enumerate(sorted((v for v in vars(torch).values() if isinstance(v, torch.dtype)),
                                                   key=str))}


class TensorMeta(NamedTuple):
    """One dense CPU tensor: ``nbytes`` of its storage, from the start to the view's end."""

    kind: Literal["t"]   # the wire tag
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    storage_offset: int
    nbytes: int
    requires_grad: bool
    is_param: bool

    @property
    def block_nbytes(self) -> int:
        return self.nbytes

    def signature(self) -> int:
        """The same number in every process for the same meta (ints and tuples of them hash
        alike everywhere; dtypes go by a fixed code), so a reader can tell an edited one."""
        return hash((_DTYPE_CODES.get(self.dtype, -1),) + self[2:])


class PickledMeta(NamedTuple):
    """A structure: ``nbytes`` of storages, then ``skeleton_nbytes`` of pickled skeleton."""

    kind: Literal["p"]   # the wire tag
    nbytes: int
    skeleton_nbytes: int
    shared: tuple        # SharedLoc of each aliased shared storage, in the skeleton's order

    @property
    def block_nbytes(self) -> int:
        return self.nbytes + self.skeleton_nbytes

    def signature(self) -> int:
        return hash(self[1:])


class ValueMeta(NamedTuple):
    """A structure with no tensor bytes, riding whole inside its ref."""

    kind: Literal["v"]   # the wire tag
    skeleton: bytes
    shared: tuple        # SharedLoc of each aliased shared storage

    @property
    def block_nbytes(self) -> int:
        return 0

    def signature(self) -> int:
        return hash((zlib.crc32(self.skeleton),) + self[2:])


class CudaMeta(NamedTuple):
    """One CUDA tensor. ``handle`` is None for an empty tensor (nothing to open);
    ``event_handle`` is None when the producer synchronized its stream instead."""

    kind: Literal["c"]   # the wire tag
    device: int | None
    handle: bytes | None
    storage_nbytes: int
    storage_offset_bytes: int
    event_handle: bytes | None
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    storage_offset: int
    requires_grad: bool
    is_param: bool

    @property
    def block_nbytes(self) -> int:
        return 0

    def signature(self) -> int:
        return 0        # no header cell to match: the CUDA getter checks its export itself


Meta = TensorMeta | PickledMeta | ValueMeta | CudaMeta


class Placed(NamedTuple):
    """What a kind's ``put`` made, for the store to register: the block (``seg``, ``offset``,
    size class ``cls``; seg None for an object with no pool block), what must live as long as
    the object (``keep``), its meta, and whether its bytes are outside the pool (``external``)."""

    seg: Any             # a Segment; for an aliased shared tensor, the SharedFile torch shares
    offset: int
    cls: int
    keep: Any
    meta: Meta
    external: bool


class Kind(NamedTuple):
    """One entry of ``KINDS``. ``device``: the device type whose plain tensors ``put`` hands to
    ``put`` (None for structures, which ``Store.put`` makes itself). ``rebuild(store, ref, seg)``
    is ``get``; ``checks_itself``: it checks the object is live itself (CUDA: its export's life)."""

    meta: type
    device: str | None
    put: Callable[[Store, torch.Tensor, float | None], Placed] | None
    rebuild: Callable[[Store, ObjectRef, Any], Any]     # the segment, the shared storage, or None
    checks_itself: bool = False


KINDS: dict[type, Kind] = {}
BY_DEVICE: dict[str, Kind] = {}         # derived from KINDS: the single-tensor putters
_BY_TAG: dict[str, tuple[type, int]] = {}   # wire tag -> (record type, number of fields)


def tag_of(meta_type: type) -> str:
    """The wire tag of a record type: its ``kind`` field's ``Literal``."""
    return get_args(get_type_hints(meta_type)["kind"])[0]


def register(kind: Kind) -> None:
    """Add (or replace) a kind of object."""
    KINDS[kind.meta] = kind
    _BY_TAG[tag_of(kind.meta)] = (kind.meta, len(get_type_hints(kind.meta)))
    if kind.device is not None:
        BY_DEVICE[kind.device] = kind


def meta_from_wire(meta: Any) -> Any:
    """The record of a wire tuple, or ``meta`` unchanged if it is one already or is malformed
    (``get`` then refuses it)."""
    if type(meta) is tuple and meta:
        known = _BY_TAG.get(meta[0]) if type(meta[0]) is str else None
        if known is not None and len(meta) == known[1]:
            return tuple.__new__(known[0], meta)
    return meta


def location_from_wire(loc: Any) -> Any:
    """The ``Location`` of a wire tuple, or ``loc`` unchanged (None, a record, or malformed)."""
    if type(loc) is tuple and len(loc) == 6:
        return tuple.__new__(Location, loc)
    return loc


def to_wire(value: Any) -> Any:
    """A record as its plain tuple (what is pickled); anything else as it is."""
    return tuple(value) if type(value) is not tuple and isinstance(value, tuple) else value
