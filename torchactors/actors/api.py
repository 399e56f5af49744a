"""The process's runtime: its job, its supervisor, its channels to actors.

Box in the data flow: ``ta.init`` (or the first use) creates the job in the driver; an
actor process attaches to the job it was started in. Both can create, call, look up and kill
actors: the API is the same inside actors.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import threading
from typing import Any, Optional

import cloudpickle
import torch

from torchactors.actors import protocol
from torchactors.actors.channel import Channel
from torchactors.actors.handle import ActorHandle, encode_args, new_actor_id, public_methods
from torchactors.errors import ActorDiedError
from torchactors.runtime import job as job_module
from torchactors.runtime.child import ChildContext
from torchactors.runtime.supervisor import Backoff, ProcessSpec, Supervisor, check_start_method
from torchactors.store import core as store_core
from torchactors.store import parse_size
from torchactors.store.refs import ObjectRef

logger = logging.getLogger(__name__)


class _Owned:
    """An actor this process started: what must live as long as it may restart."""

    def __init__(self, handle: ActorHandle, name: Optional[str], held: list) -> None:
        self.handle = handle
        self.name = name
        self.held = held        # refs in the constructor arguments (a restart re-reads them)


class Runtime:
    def __init__(self, job: job_module.Job, start_method: str = "zygote") -> None:
        self.job = job
        self.start_method = start_method      # the default of actors that do not choose one
        self.store = store_core.current()
        self._supervisor: Optional[Supervisor] = None
        self.channels: dict[str, Channel] = {}
        self.owned: dict[str, _Owned] = {}
        self.lock = threading.Lock()

    @property
    def supervisor(self) -> Supervisor:
        with self.lock:
            if self._supervisor is None:
                self._supervisor = Supervisor(self.job)
            return self._supervisor

    def create_actor(self, cls: type, options: dict, args: tuple, kwargs: dict) -> ActorHandle:
        if self.store.closed:
            raise RuntimeError("torchactors was shut down; call ta.init() again before starting actors")
        actor_id = new_actor_id(cls)
        name = options.get("name")
        label = name or actor_id
        handle = ActorHandle(actor_id, label, public_methods(cls), options["max_task_retries"])
        body, held = encode_args(args, kwargs, self.store.put)
        try:
            cls_bytes = cloudpickle.dumps(cls)
        except Exception as e:
            raise TypeError(f"actor class {cls.__qualname__} cannot be pickled for its process: {e}") from e
        if name is not None:
            self.job.register_name(name, {"actor_id": actor_id, "methods": handle._methods,
                                          "max_task_retries": handle._max_task_retries})
        spec = {"cls": cls_bytes, "args": body, "name": label, "max_concurrency": options["max_concurrency"]}
        threads = options["num_threads"] or max(1, (os.cpu_count() or 1) // (len(self.owned) + 2))
        self.owned[actor_id] = _Owned(handle, name, held)
        self.supervisor.start(ProcessSpec(
            key=actor_id, target="torchactors.actors.worker:serve", payload=pickle.dumps(spec),
            num_threads=threads, env=dict(options.get("env") or {}), max_restarts=options["max_restarts"],
            device=options["device"], start_method=options.get("start_method") or self.start_method,
            backoff=Backoff.parse(options.get("restart_backoff"))))
        return handle

    def call(self, handle: ActorHandle, method: str, args: tuple, kwargs: dict) -> ObjectRef:
        """Send a method call; its result ref at once. Tensors in the arguments travel as refs."""
        body, held = encode_args(args, kwargs, self.store.put)
        return self.channel(handle).call(method, body, held)

    def ping(self, handle: ActorHandle) -> ObjectRef:
        """A ref that resolves once the actor has run its constructor and answers calls."""
        return self.channel(handle).call("", b"", [], kind=protocol.PING)

    def channel(self, handle: ActorHandle) -> Channel:
        ch = self.channels.get(handle._actor_id)
        if ch is None:
            with self.lock:
                ch = self.channels.setdefault(handle._actor_id, Channel(self.job, handle._actor_id, handle._name,
                                                                        handle._max_task_retries))
        return ch

    def get_actor(self, name: str) -> ActorHandle:
        record = self.job.lookup_name(name)
        if record is None:
            raise ValueError(f"no actor named {name!r} in this job")
        return ActorHandle(record["actor_id"], name, record["methods"], record["max_task_retries"])

    def kill(self, handle: ActorHandle) -> None:
        owned = self.owned.pop(handle._actor_id, None)
        if owned is not None:
            self.supervisor.kill(handle._actor_id)
            if owned.name:
                self.job.drop_name(owned.name)
        else:
            self.job.mark_killed(handle._actor_id)
            try:
                self.channel(handle).call("", b"", [], kind=protocol.KILL)
            except ActorDiedError:
                pass        # already gone

    def shutdown(self) -> None:
        for ch in list(self.channels.values()):
            ch.close()
        self.channels.clear()
        if self._supervisor is not None:
            self._supervisor.shutdown()
            self._supervisor = None
        self.owned.clear()
        if self.job.driver:
            self.store.close()
            self.job.remove()


_runtime: Optional[Runtime] = None
_lock = threading.Lock()


def init(backend: str = "local", num_threads: Optional[int] = None, store_capacity: Any = None,
         address: Optional[str] = None, start_method: str = "zygote") -> Runtime:
    """Start torchactors in this process (optional: the first use does it with defaults).

    ``backend="local"``: actors are processes of this machine started by our supervisor.
    ``backend="ray"``: actors are Ray actors; ``address`` names the cluster (None starts a
    local one, as ``ray.init()`` does).

    ``start_method`` (local backend): how actor processes start unless they choose with the
    actor option of that name. ``"zygote"`` forks them from a fresh interpreter that has
    imported torch (started now, in the background: milliseconds per actor); ``"spawn"``
    starts a fresh interpreter for each (a second each), needed for environment variables
    that libraries read when they are imported."""
    global _runtime
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; use 'local' or 'ray'")
    if address is not None and backend != "ray":
        raise ValueError("address is only used with backend='ray'")
    check_start_method(start_method)
    with _lock:
        if _runtime is not None:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            return _runtime
        capacity = parse_size(store_capacity) if store_capacity is not None else None
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // 2))
        if backend == "ray":
            from torchactors.actors import ray_backend

            _runtime = ray_backend.start(capacity, address)
        else:
            job = job_module.Job.create(capacity)
            job_module.set_current(job)
            _runtime = Runtime(job, start_method)
            if start_method == "zygote":
                _runtime.supervisor.prestart()
        atexit.register(shutdown)
        return _runtime


def attach_runtime(ctx: ChildContext) -> Runtime:
    """In an actor process: the runtime of the job it was started in."""
    global _runtime
    _runtime = Runtime(job_module.current())
    return _runtime


def attach_ray_runtime(rt: Any) -> None:
    """In a Ray actor's process: the Ray backend's runtime of the job it was started in."""
    global _runtime
    _runtime = rt


def runtime() -> Runtime:
    return _runtime if _runtime is not None else init()


def is_initialized() -> bool:
    return _runtime is not None


def shutdown() -> None:
    """Stop every actor this process started, free every object, remove the job directory."""
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is not None:
        rt.shutdown()
        job_module.set_current(None)
    else:
        standalone = store_core.active()    # put/get used without init: a store of its own
        if standalone is not None and standalone.own_job_dir:
            standalone.close()


def kill(handle: ActorHandle) -> None:
    """Stop the actor for good (no restart); its pending and later calls raise ActorDiedError."""
    runtime().kill(handle)


def get_actor(name: str) -> ActorHandle:
    """The handle of the actor started with ``.options(name=name)`` anywhere in the job."""
    return runtime().get_actor(name)


def wait_ready(handles: list[ActorHandle], timeout: Optional[float] = None) -> None:
    """Block until every actor in ``handles`` has finished its constructor and answers calls
    (raises ActorDiedError for one that died, GetTimeoutError after ``timeout``)."""
    rt = runtime()
    rt.store.get([rt.ping(h) for h in handles], timeout)
