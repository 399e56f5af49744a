"""The public functions of the actors layer: ``ta.init``, ``ta.shutdown``, ``ta.kill``, ...

Box in the data flow: the user's program -> these functions -> the process's backend
(``actors._current``: the local ``Runtime`` of ``actors.local`` or the ``RayRuntime`` of
``actors.ray_backend``). ``init`` (or the first use) creates the job in the driver; an actor
process has its backend set when it starts serving, so the API is the same inside actors.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from typing import Any

import torch

from torchactors.actors import _current, calls
from torchactors.actors.backend import Backend
from torchactors.actors.handle import ActorHandle
from torchactors.actors.local import Runtime
from torchactors.actors.options import default_num_threads
from torchactors.runtime.job import Job
from torchactors.runtime.status import ActorStatus
from torchactors.runtime.supervisor import check_start_method
from torchactors.store import core as store_core
from torchactors.store import parse_size
from torchactors.store.refs import ObjectRef

_lock = threading.Lock()


def init(backend: str = "local", num_threads: int | None = None, store_capacity: Any = None,
         address: str | None = None, start_method: str = "zygote") -> Backend:
    """Start torchactors in this process (optional: the first use does it with defaults).

    ``backend="local"``: actors are processes of this machine started by our supervisor.
    ``backend="ray"``: actors are Ray actors; ``address`` names the cluster (None starts a
    local one, as ``ray.init()`` does).

    ``start_method`` (local backend): how actor processes start unless they choose with the
    actor option of that name. ``"zygote"`` forks them from a fresh interpreter that has
    imported torch (started now, in the background: milliseconds per actor); ``"spawn"``
    starts a fresh interpreter for each (a second each), needed for environment variables
    that libraries read when they are imported."""
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; use 'local' or 'ray'")
    if address is not None and backend != "ray":
        raise ValueError("address is only used with backend='ray'")
    check_start_method(start_method)
    with _lock:
        if _current.backend is not None:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            return _current.backend
        capacity = parse_size(store_capacity) if store_capacity is not None else None
        torch.set_num_threads(num_threads or default_num_threads(0))
        if backend == "ray":
            # Ray is imported only when asked for (the "ray" extra).
            from torchactors.actors import ray_backend

            _current.backend = ray_backend.start(capacity, address)
        else:
            local = Runtime(*Job.create(capacity), start_method=start_method)
            if start_method == "zygote":
                local.supervisor.prestart()
            _current.backend = local
        atexit.register(shutdown)
        return _current.backend


_current.start_default = init


def runtime() -> Backend:
    """The process's backend, started with the defaults (``ta.init()``) if there is none."""
    return _current.get()


def is_initialized() -> bool:
    return _current.backend is not None


def shutdown() -> None:
    """Stop every actor this process started, free every object, remove the job directory."""
    with _lock:
        rt, _current.backend = _current.backend, None
    if rt is not None:
        rt.shutdown()
    else:
        standalone = store_core.active()    # put/get used without init: a store of its own
        if standalone is not None and standalone.own_job_dir:
            standalone.close()


def kill(handle: ActorHandle, no_restart: bool = True) -> None:
    """Stop the actor for good (no restart); its pending and later calls raise ActorDiedError.
    ``no_restart=False``: kill its process, and let its ``max_restarts`` restart it (Ray's rule)."""
    if not isinstance(handle, ActorHandle):
        raise ValueError(f"ta.kill() only supported for actor handles; got {type(handle).__name__} {handle!r}")
    runtime().kill(handle, no_restart)


def actor_status(handle: ActorHandle) -> ActorStatus | None:
    """What the actor's supervisor last said of it: state, incarnation, pid, how its last
    process ended and how often it was restarted. None where the backend cannot say (the Ray
    backend, or before the supervisor wrote anything)."""
    if not isinstance(handle, ActorHandle):
        raise TypeError(f"actor_status() takes an actor handle, not {type(handle).__name__} {handle!r}")
    return runtime().status(handle)


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the actor started with ``.options(name=name)`` anywhere in the job."""
    if not name:
        raise ValueError(f"Please supply a non-empty name to get_actor, not {name!r}")
    if not isinstance(name, str):
        raise TypeError(f"get_actor takes the actor's name (a str), not {type(name).__name__} {name!r}")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ValueError(f"namespace must be a non-empty str or None, not {namespace!r}")
    return runtime().get_actor(name, namespace)


def exit_actor() -> None:
    """Inside an actor method: end this actor after the current call. Its atexit handlers run,
    calls queued behind fail with ActorDiedError saying it exited on purpose, no restart."""
    calls.exit_actor()


def wait(refs: Sequence[ObjectRef], num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Split ``refs`` into (ready, not ready), in input order, once ``num_returns`` are ready
    (checked as Ray does: a list of distinct refs, ``[]`` gives ``([], [])``). ``fetch_local``
    is Ray's; one machine's store has nothing to fetch."""
    if isinstance(refs, ObjectRef) or not isinstance(refs, (list, tuple)):
        raise TypeError(f"wait() expected a list of ObjectRef, got {type(refs).__name__}")
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"wait() expected a list of ObjectRef, got an element of type {type(r).__name__}: {r!r}")
    if len(set(refs)) != len(refs):
        raise ValueError("Wait requires a list of unique object refs; the list given holds one ref twice")
    if not refs:
        return [], []
    if not isinstance(num_returns, int) or num_returns <= 0:
        raise ValueError(f"Invalid number of objects to return {num_returns!r}: num_returns must be an int "
                         f"from 1 to the number of refs ({len(refs)})")
    if num_returns > len(refs):
        raise ValueError(f"num_returns cannot be greater than the number of objects provided to wait(): "
                         f"{num_returns} > {len(refs)} refs")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, not {timeout!r}")
    return store_core.current().wait(refs, num_returns, timeout)


def wait_ready(handles: list[ActorHandle], timeout: float | None = None) -> None:
    """Block until every actor in ``handles`` has finished its constructor and answers calls
    (raises ActorDiedError for one that died, GetTimeoutError after ``timeout``)."""
    rt = runtime()
    rt.store.get([rt.ping(h) for h in handles], timeout)
