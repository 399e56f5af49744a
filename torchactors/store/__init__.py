"""The object store: tensors in shared memory keyed by ID, refs, reducers, zero-copy get.

``put`` copies a tensor's bytes once into this process's shared-memory pool and returns a
small ``ObjectRef``; ``get`` in any process of the job returns a view of the same bytes.
Works alone: it imports nothing from the runtime or the actors.

Modules, bottom up: ``_current`` (the process's one store), ``records`` (refs' named records and
the table of object kinds), ``segments`` (memfd segments, the pool, mappings), ``registry``
(job membership, hold tables), ``futex``, ``refs`` (``ObjectRef``), ``serialize`` (reducers,
picklers), ``watcher`` (the background thread), ``core`` (``Store``), ``cuda`` (the CUDA kind,
registered on import).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchactors._util import parse_size
from torchactors.store import cuda as _cuda  # noqa: F401  (registers the CUDA kind; initializes no CUDA)
from torchactors.store.core import Store, attach, current
from torchactors.store.refs import ObjectRef

__all__ = ["ObjectRef", "Store", "put", "get", "free", "wait", "stats", "attach", "current", "parse_size"]


def put(obj: Any, timeout: float | None = None) -> ObjectRef:
    """Store ``obj`` (a tensor or any picklable structure holding tensors) and return its ref.

    A snapshot: later writes to ``obj`` do not change the object, except for tensors whose
    storage torch already shares (``t.is_shared()``), which are registered without a copy and
    alias. ``timeout``: wait that long for space instead of raising ``StoreFullError``."""
    return current().put(obj, timeout)


def get(ref: Any, timeout: float | None = None, copy: bool = False) -> Any:
    """The value of ``ref`` (or a list of values for a list of refs). Tensors are views of
    shared memory, not copies; ``copy=True`` gives private copies."""
    return current().get(ref, timeout, copy)


def free(ref: Any) -> None:
    """Release the object now, whoever still holds the ref: later ``get`` raises
    ``ObjectFreedError``; tensors already rebuilt stay valid memory, but their bytes may be
    reused by later puts."""
    current().free(ref)


def wait(refs: Sequence[ObjectRef], num_returns: int = 1,
         timeout: float | None = None) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Split ``refs`` into (ready, not ready), in input order, once ``num_returns`` are ready."""
    return current().wait(refs, num_returns, timeout)


def stats() -> dict:
    """objects, bytes used, capacity, segments, mapped segments of this process's store."""
    return current().stats()
