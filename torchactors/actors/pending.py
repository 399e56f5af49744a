"""The pending result of an actor call: what a ref that stands for an unfinished call offers.

Box in the data flow: ``.remote()`` -> ``ObjectRef.pending(p)`` -> ``get``/``wait`` in the
store, which use ``p`` through the ``Pending`` protocol below without knowing what an actor
is. Each backend's pending call (``channel.PendingCall``, ``ray_backend.RayPendingCall``)
subclasses ``PendingResult``; ``Settled`` is a result known at once (a failed dependency's
error), ``Returned`` one value of a ``num_returns=n`` call.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from torchactors.actors import protocol
from torchactors.errors import GetTimeoutError
from torchactors.store import core as store_core
from torchactors.store.refs import ObjectRef


class Pending(Protocol):
    """What the store's ``get``/``wait`` ask of a pending ref's object (``ref._pending``).

    ``kind`` is 0 until the result is in, then ``protocol.OK_VALUE``/``OK_REF``/``ERROR``
    with ``value`` the value, the result's ref or the exception; ``id`` names the call in
    errors. ``wait_any`` is called on the type of the first of a list of pendings of one
    backend, and returns once one of them is done or ``timeout`` passed."""

    kind: int
    value: Any
    id: str

    def done(self) -> bool: ...

    def result(self, timeout: float | None = None) -> Any: ...

    def materialize(self) -> ObjectRef: ...

    @staticmethod
    def wait_any(pendings: list, timeout: float | None) -> None: ...


class PendingResult:
    """The shared half of a ``Pending``: ``result`` and ``materialize``. A backend's subclass
    says how to wait for the reply (``_wait``), sets ``kind``/``value``, and offers ``done``,
    ``id`` and ``wait_any``."""

    __slots__ = ("kind", "value")
    kind: int           # 0 until the result is in (see Pending)
    value: Any

    def _wait(self, timeout: float | None) -> None:
        raise NotImplementedError

    def result(self, timeout: float | None = None) -> Any:
        if not self.kind:
            self._wait(timeout)
        if self.kind == protocol.ERROR:
            raise self.value
        return self.value

    def materialize(self) -> ObjectRef:
        """The result as a store ref (to pass it on): the actor's ref, or a put of a small value."""
        value = self.result()
        if self.kind != protocol.OK_REF:
            self.value = value = store_core.current().put(value)
            self.kind = protocol.OK_REF
        return value


class Settled(PendingResult):
    """A result known when the call is made (e.g. the error of a call's failed dependency)."""

    __slots__ = ("id",)

    def __init__(self, kind: int, value: Any, label: str) -> None:
        self.kind, self.value, self.id = kind, value, label

    def done(self) -> bool:
        return True

    def _wait(self, timeout: float | None) -> None:
        pass

    @staticmethod
    def wait_any(pendings: list, timeout: float | None) -> None:
        pass


def failed_ref(error: BaseException, label: str) -> ObjectRef:
    return ObjectRef.pending(Settled(protocol.ERROR, error, label))


class Returned(PendingResult):
    """Value ``index`` of a call declared with ``num_returns=n``: one ref per returned value."""

    __slots__ = ("whole", "index", "count", "id")

    def __init__(self, whole: Pending, index: int, count: int) -> None:
        self.whole, self.index, self.count = whole, index, count
        self.kind, self.value = 0, None
        self.id = f"{getattr(whole, 'id', 'call')}[{index}]"

    def __getattr__(self, item: str) -> Any:      # channel/oref: wait_any of the whole call's kind
        return getattr(self.whole, item)

    def done(self) -> bool:
        return self.kind != 0 or self.whole.done()

    def _wait(self, timeout: float | None) -> None:
        try:
            values = self.whole.result(timeout)
            if isinstance(values, ObjectRef):       # the tuple was put into the actor's store
                values = store_core.current().get(values)
        except GetTimeoutError:
            raise
        except BaseException as e:
            self.kind, self.value = protocol.ERROR, e
            return
        try:
            if len(values) != self.count:
                raise TypeError
            self.kind, self.value = protocol.OK_VALUE, values[self.index]
        except TypeError:
            self.kind, self.value = protocol.ERROR, ValueError(
                f"{self.id}: the method was declared with num_returns={self.count} but returned "
                f"{type(values).__name__} {str(values)[:80]!r}; return a tuple of {self.count} values")

    @staticmethod
    def wait_any(pendings: list, timeout: float | None) -> None:
        wholes: list[Any] = [p.whole if isinstance(p, Returned) else p for p in pendings]
        type(wholes[0]).wait_any(wholes, timeout)


def split_returns(ref: ObjectRef, count: int) -> list[ObjectRef] | None:
    """One ref per value of the ``num_returns=count`` call ``ref`` stands for (None for 0, as in Ray)."""
    if count == 0:
        return None
    whole = cast(Pending, ref._pending)
    return [ObjectRef.pending(Returned(whole, i, count)) for i in range(count)]
