"""``ta.ActorPool``: Ray's ``ray.util.ActorPool`` on torchactors handles, same API and errors.

Box in the data flow: a driver-side scheduler over a fixed set of actor handles. ``submit``
calls ``fn(actor, value)`` on an idle actor (it returns the call's ref, or a list of refs for
``num_returns > 1``) or queues the value until an actor is free; results come back in
submission order (``get_next``) or as they finish (``get_next_unordered``). An actor whose call
raised ``ActorDiedError`` leaves the pool. Nothing here knows about processes: it uses the
store's ``get``/``wait`` on the refs the calls return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torchactors.errors import ActorDiedError, GetTimeoutError
from torchactors.store import core

TIMEOUT_MESSAGE = "Timed out waiting for result"


def _key(future: Any) -> Any:
    return tuple(future) if isinstance(future, list) else future


def _probe(future: Any) -> Any:
    """The ref to wait on: the refs of one call are settled together by its one reply."""
    return future[0] if isinstance(future, list) else future


class ActorPool:
    """Run ``fn(actor, value)`` over a fixed pool of actors, one call per idle actor."""

    def __init__(self, actors: list) -> None:
        self._idle_actors = list(actors)
        self._future_to_actor: dict[Any, tuple[int, Any]] = {}     # future key -> (task index, actor)
        self._index_to_future: dict[int, Any] = {}
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending_submits: list[tuple[Callable, Any]] = []

    def map(self, fn: Callable[[Any, Any], Any], values: Any) -> Iterator[Any]:
        """Submit ``fn`` over all ``values`` now; iterate the results in order. Results of
        earlier submissions not yet fetched are dropped first (as in Ray)."""
        self._drop_unfetched()
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next()
        return results()

    def map_unordered(self, fn: Callable[[Any, Any], Any], values: Any) -> Iterator[Any]:
        """As ``map``, but results come as they finish."""
        self._drop_unfetched()
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next_unordered()
        return results()

    def _drop_unfetched(self) -> None:
        """Fetch what is done, skip what is not (its actor goes back to the pool, as in Ray)."""
        while self.has_next():
            try:
                self.get_next_unordered(timeout=0)
            except TimeoutError:
                index = min(i for i, _ in self._future_to_actor.values())
                future = self._index_to_future.pop(index)
                _, actor = self._future_to_actor.pop(_key(future))
                self._next_return_index = max(self._next_return_index, index + 1)
                self._return_actor(actor)

    def submit(self, fn: Callable[[Any, Any], Any], value: Any) -> None:
        """Run ``fn(actor, value)`` on an idle actor, or as soon as one is free."""
        if self._idle_actors:
            actor = self._idle_actors.pop()
            future = fn(actor, value)
            self._future_to_actor[_key(future)] = (self._next_task_index, actor)
            self._index_to_future[self._next_task_index] = future
            self._next_task_index += 1
        else:
            self._pending_submits.append((fn, value))

    def has_next(self) -> bool:
        """Are there results not yet returned?"""
        return bool(self._future_to_actor)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order. ``TimeoutError`` after ``timeout``; with
        ``ignore_if_timedout`` the late task is skipped (its actor goes back to the pool) first."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        future = self._index_to_future[self._next_return_index]
        timed_out = False
        if timeout is not None:
            ready, _ = core.current().wait([_probe(future)], num_returns=1, timeout=timeout)
            if not ready:
                if not ignore_if_timedout:
                    raise GetTimeoutError(TIMEOUT_MESSAGE, timeout)
                timed_out = True
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(_key(future))
        if timed_out:
            self._return_actor(actor)
            raise GetTimeoutError(f"{TIMEOUT_MESSAGE}. The task {future} has been ignored.", timeout)
        return self._get_result(future, actor)

    def get_next_unordered(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """Any finished result. ``TimeoutError`` if none finishes within ``timeout``; with
        ``ignore_if_timedout`` returns None instead (no task is dropped: none was late)."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        probes = {_probe(self._index_to_future[i]): k for k, (i, _) in self._future_to_actor.items()}
        ready, _ = core.current().wait(list(probes), num_returns=1, timeout=timeout)
        if not ready:
            if ignore_if_timedout:
                return None
            raise GetTimeoutError(TIMEOUT_MESSAGE, timeout)
        key = probes[ready[0]]
        index, actor = self._future_to_actor.pop(key)
        future = self._index_to_future.pop(index)
        self._next_return_index = max(self._next_return_index, index + 1)
        return self._get_result(future, actor)

    def _get_result(self, future: Any, actor: Any) -> Any:
        alive = True
        try:
            return core.current().get(future)
        except ActorDiedError:
            alive = False
            raise
        finally:
            self._return_actor(actor, alive)

    def _return_actor(self, actor: Any, alive: bool = True) -> None:
        if alive:
            self._idle_actors.append(actor)
        if self._pending_submits and self._idle_actors:
            self.submit(*self._pending_submits.pop(0))

    def has_free(self) -> bool:
        """Is an actor idle, with no submission waiting for one?"""
        return len(self._idle_actors) > 0 and len(self._pending_submits) == 0

    def pop_idle(self) -> Any | None:
        """Take an idle actor out of the pool (None if none is free)."""
        if self.has_free():
            return self._idle_actors.pop()
        return None

    def push(self, actor: Any) -> None:
        """Add an actor to the pool (it takes a waiting submission at once, if any)."""
        busy = [a for _, a in self._future_to_actor.values()]
        if actor in self._idle_actors or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)
