"""``ObjectRef``: the small, picklable name of an object in the store.

Box in the data flow: ``put`` returns one; it travels inside messages instead of tensor
bytes; ``get`` turns it back into a view. Creating a ref (put, or unpickling one) counts a
hold in this process's hold table; dropping the last Python reference to it uncounts it.
So a ref alive anywhere keeps its object alive, and nobody needs to call ``free``.

A ref may also stand for a value that is not there yet (an actor call's result): the
runtime attaches a *pending* object (the ``Pending`` protocol of actors/pending.py: ``done()``,
``result(timeout)``, ``materialize()``, ``wait_any``), and ``get``/``wait`` use it without
knowing what an actor is.

A ref's ``loc`` and ``meta`` are the named records of ``records``; pickled, they travel as
their plain tuples (``to_wire``) and are named again when the ref is rebuilt.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from torchactors.store import _current
from torchactors.store.records import location_from_wire, meta_from_wire, to_wire

if TYPE_CHECKING:
    from torchactors.store.core import Store

_local = threading.local()


class SerializationContext:
    """Collects the refs serialized into one message or stored object, so that the sender
    (or the containing object) can keep holding them until the receiver has counted its own."""

    def __init__(self) -> None:
        self.refs: list[ObjectRef] = []

    def __enter__(self) -> SerializationContext:
        self._prev = getattr(_local, "ctx", None)
        _local.ctx = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.ctx = self._prev


class ObjectRef:
    """Names object ``(owner, slot, gen)`` owned by process ``owner`` (pid ``owner_pid``).

    ``loc`` is where the bytes are (a ``records.Location``), or None for an object with no
    bytes. ``meta`` describes how to rebuild the value: one record per kind of object
    (``records.TensorMeta``, ``PickledMeta``, ``ValueMeta``, ``CudaMeta``). ``_holder`` is the
    store whose hold table counts this ref (None: uncounted).

    Built with ``count=True``, the ref is counted in ``store`` (default: the current one).
    Plain tuples given as ``loc``/``meta`` (a ref's wire form) are turned into their records.
    """

    __slots__ = ("owner", "slot", "gen", "owner_pid", "loc", "meta", "job", "_pending", "_holder", "__weakref__")

    def __init__(self, owner: int, slot: int, gen: int, owner_pid: int, loc: Any, meta: Any, job: str = "",
                 count: bool = True, store: Store | None = None) -> None:
        self.owner = owner
        self.slot = slot
        self.gen = gen
        self.owner_pid = owner_pid
        self.loc = location_from_wire(loc) if type(loc) is tuple else loc
        self.meta = meta_from_wire(meta) if type(meta) is tuple else meta
        self.job = job              # the job whose store made it: a ref means nothing elsewhere
        self._pending: Any = None
        self._holder: Store | None = None
        if count:
            holder = store if store is not None else _current.required("creating a counted ObjectRef")
            holder.membership.hold(owner, slot)
            self._holder = holder

    @classmethod
    def pending(cls, pending: Any) -> ObjectRef:
        """A ref to a value still being computed; ``pending`` resolves it."""
        ref = cls(-1, -1, 0, 0, None, None, count=False)
        ref._pending = pending
        return ref

    @property
    def id(self) -> str:
        if self._pending is not None:
            return getattr(self._pending, "id", "pending")
        return f"{self.owner:x}.{self.slot:x}.{self.gen:x}"

    def hex(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"ObjectRef({self.id})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ObjectRef):
            return NotImplemented
        if self._pending is not None or other._pending is not None:
            return self is other
        return (self.owner, self.slot, self.gen) == (other.owner, other.slot, other.gen)

    def __hash__(self) -> int:
        if self._pending is not None:
            return id(self)
        return hash((self.owner, self.slot, self.gen))

    def __reduce__(self) -> tuple:
        ref = self
        if self._pending is not None:
            ref = self._pending.materialize()   # blocks until the call's result is in the store
        ctx = getattr(_local, "ctx", None)
        if ctx is not None:
            ctx.refs.append(ref)
        return (_rebuild_ref, ref.wire())

    def wire(self) -> tuple:
        """The ref as plain values (owner, slot, gen, owner_pid, loc, meta, job), what its
        pickle carries; ``_rebuild_ref(*wire)`` counts it again. Whoever sends these values
        to another process must take them from here: the owner then knows the object left it."""
        holder = self._holder if self._holder is not None else _current.active()
        if holder is not None and self.owner == holder.index:
            holder.exported(self)
        return (self.owner, self.slot, self.gen, self.owner_pid, to_wire(self.loc), to_wire(self.meta), self.job)

    # -- asyncio (used by the actors' async methods and asyncio drivers) --------------------

    def __await__(self) -> Any:
        """``await ref``: the value, waited for on a helper thread, so the event loop never blocks."""
        return self.as_future().__await__()

    def as_future(self) -> Any:
        """An ``asyncio.Future`` of the value, on the running event loop."""
        import asyncio

        return asyncio.wrap_future(self.future())

    def future(self) -> Any:
        """A ``concurrent.futures.Future`` of the value. An unfinished call's value is waited
        for on a daemon thread of its own (a pool would stall ``gather`` over refs whose calls
        wait on one another, and would be joined at exit)."""
        from concurrent.futures import Future

        future: Future = Future()
        if self._pending is None or self._pending.done():
            _resolve_into(future, self)
        else:
            threading.Thread(target=_resolve_into, args=(future, self), daemon=True,
                             name="torchactors-await").start()
        return future

    def __del__(self) -> None:
        holder = self._holder
        if holder is not None:
            self._holder = None
            try:
                holder.released(self)
            except Exception:       # interpreter shutdown: the process's tables go with it
                pass


def _resolve_into(future: Any, ref: ObjectRef) -> None:
    if not future.set_running_or_notify_cancel():
        return          # cancelled (e.g. asyncio.wait_for timed out) before it started
    try:
        value = _current.required("resolving a ref").get(ref)
    except BaseException as e:
        future.set_exception(e)
    else:
        future.set_result(value)


def _rebuild_ref(owner: int, slot: int, gen: int, owner_pid: int, loc: tuple | None, meta: Any,
                 job: str = "") -> ObjectRef:
    """Unpickling: count the ref only in a store of its own job, and only when it names a cell
    of the hold table; any other ref is kept uncounted, and ``get`` says what is wrong with it.
    Starts no store (see ``_current``): a ref read before any store exists cannot be of the job
    one would start."""
    store = _current.active()
    count = (store is not None and job == store.job and type(owner) is int and type(slot) is int
             and store.membership.valid(owner, slot))
    return ObjectRef(owner, slot, gen, owner_pid, loc, meta, job, count=count, store=store)
