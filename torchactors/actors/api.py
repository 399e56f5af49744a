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
import queue
import signal
import threading
from collections.abc import Sequence
from typing import Any

import torch

from torchactors.actors import handle as handle_module
from torchactors.actors import lifetime, protocol
from torchactors.actors.channel import Channel, failed_ref
from torchactors.actors.handle import (
    ActorHandle,
    DependencyFailed,
    dumps_class,
    encode_args,
    method_returns,
    new_actor_id,
    public_methods,
)
from torchactors.actors.options import default_num_threads
from torchactors.errors import ActorDiedError
from torchactors.runtime import job as job_module
from torchactors.runtime.child import ChildContext
from torchactors.runtime.status import ActorStatus
from torchactors.runtime.supervisor import Backoff, ProcessSpec, Supervisor, check_start_method
from torchactors.store import core as store_core
from torchactors.store import parse_size
from torchactors.store.refs import ObjectRef

logger = logging.getLogger(__name__)


class _Owned:
    """An actor this process started: what must live as long as it may restart."""

    def __init__(self, actor_id: str, name: str | None, held: list) -> None:
        self.actor_id = actor_id
        self.name = name        # its key in the job's names (namespace included), if named
        self.held = held        # refs in the constructor arguments (a restart re-reads them)


def name_key(name: str, namespace: str | None) -> str:
    """An actor's key among the job's names: Ray's namespaces are prefixes of one table."""
    return name if not namespace else f"{namespace}/{name}"


class Runtime:
    def __init__(self, job: job_module.Job, start_method: str = "zygote") -> None:
        self.job = job
        self.start_method = start_method      # the default of actors that do not choose one
        self.store = store_core.current()
        self._supervisor: Supervisor | None = None
        self.channels: dict[str, Channel] = {}
        self.owned: dict[str, _Owned] = {}
        self.lock = threading.Lock()
        self._dropped: queue.SimpleQueue | None = None     # actors whose last handle went
        handle_module.on_borrow = self._watch_handles       # a lent handle arrived: count it here

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
        key = name_key(name, options.get("namespace")) if name is not None else None
        if key is not None and options.get("get_if_exists"):
            record = self.job.lookup_name(key)
            if record is not None:
                return self._named(record, name)
        label = name or actor_id
        methods, returns = public_methods(cls), method_returns(cls)
        body, held = encode_args(args, kwargs, self.store.put)
        try:
            cls_bytes = dumps_class(cls)
        except Exception as e:
            raise TypeError(f"actor class {cls.__qualname__} cannot be pickled for its process: {e}") from e
        if key is not None:
            record = {"actor_id": actor_id, "methods": methods, "max_task_retries": options["max_task_retries"],
                      "returns": returns}
            try:
                self.job.register_name(key, record)
            except ValueError:
                found = self.job.lookup_name(key) if options.get("get_if_exists") else None
                if found is None:
                    raise
                return self._named(found, name)     # another process won the race to create it
        elif options.get("lifetime") != "detached":
            lifetime.track(actor_id)        # stopped when its last handle is dropped (README)
            self._watch_handles()
        handle = ActorHandle(actor_id, label, methods, options["max_task_retries"], returns)
        spec = {"cls": cls_bytes, "args": body, "name": label, "max_concurrency": options["max_concurrency"]}
        threads = options["num_threads"] or default_num_threads(len(self.owned))
        self.owned[actor_id] = _Owned(actor_id, key, held)
        self.supervisor.start(ProcessSpec(
            key=actor_id, target="torchactors.actors.worker:serve", payload=pickle.dumps(spec),
            num_threads=threads, env=dict(options.get("env") or {}), max_restarts=options["max_restarts"],
            device=options["device"], start_method=options.get("start_method") or self.start_method,
            backoff=Backoff.parse(options.get("restart_backoff"))))
        return handle

    def call(self, handle: ActorHandle, method: str, args: tuple, kwargs: dict) -> ObjectRef:
        """Send a method call; its result ref at once. Tensors in the arguments travel as refs;
        refs of unfinished calls among the top-level arguments are not waited for here."""
        deps: list = []
        try:
            body, held = encode_args(args, kwargs, self.store.put, deps)
        except DependencyFailed as failed:
            return failed_ref(failed.error, f"{handle._name}.{method}")
        if deps:
            return self.channel(handle).call_with_deps(method, body, held, deps)
        return self.channel(handle).call(method, body, held)

    # -- handle-scoped lifetime -------------------------------------------------------------

    def _watch_handles(self) -> None:
        """Start the thread that stops actors whose last handle was dropped. ``__del__`` only
        queues the actor (it may run inside any code, holding any lock)."""
        with self.lock:
            if self._dropped is not None:
                return
            self._dropped = dropped = queue.SimpleQueue()
        handle_module.on_last_handle = dropped.put
        threading.Thread(target=self._stop_dropped, args=(dropped,), daemon=True,
                         name="torchactors-handles").start()

    def _stop_dropped(self, dropped: queue.SimpleQueue) -> None:
        while True:
            actor_id = dropped.get()
            if actor_id is None:
                return
            try:
                if lifetime.nobody_holds(actor_id):
                    self.stop_gracefully(actor_id, "its last handle was dropped")
            except Exception:       # shut down meanwhile
                logger.debug("stopping %s after its last handle went", actor_id, exc_info=True)

    def stop_gracefully(self, actor_id: str, reason: str) -> None:
        """Stop the actor once the calls sent to it so far have run; no restart."""
        self.job.mark_killed(actor_id, reason)
        ch = self.channels.get(actor_id)
        if ch is None and actor_id in self.owned:
            self.supervisor.kill(actor_id)          # never called from here: nothing to wait for
        elif ch is not None:
            self._send_stop(ch)
            self.channels.pop(actor_id, None)   # its pending refs keep it (and their replies)
        else:                                   # a borrower, the last holder, that never called it
            self._send_stop(self.channel(ActorHandle(actor_id, actor_id, [])))
        self.owned.pop(actor_id, None)

    def terminate(self, handle: ActorHandle) -> None:
        """``h.__ray_terminate__.remote()``: stop once the calls sent so far ran."""
        self.job.mark_killed(handle._actor_id, "it was terminated with __ray_terminate__")
        self._send_stop(self.channel(handle))

    @staticmethod
    def _send_stop(ch: Channel) -> None:
        try:
            ch.call("", b"", [], kind=protocol.STOP)    # no reply: the pending call fails at the EOF
        except ActorDiedError:
            pass            # already gone

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

    def _named(self, record: dict, name: str) -> ActorHandle:
        return ActorHandle(record["actor_id"], name, record["methods"], record["max_task_retries"],
                           record.get("returns"))

    def get_actor(self, name: str, namespace: str | None = None) -> ActorHandle:
        record = self.job.lookup_name(name_key(name, namespace))
        if record is None:
            where = f" in namespace {namespace!r}" if namespace else ""
            raise ValueError(f"Failed to look up actor with name {name!r}{where}: no actor named {name!r} in this "
                             f"job (it was never started with .options(name=...), or it was killed)")
        return self._named(record, name)

    def kill(self, handle: ActorHandle, no_restart: bool = True) -> None:
        if not no_restart:
            self._crash(handle)
            return
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

    def _crash(self, handle: ActorHandle) -> None:
        """``kill(h, no_restart=False)``: kill its process now; the restart policy applies."""
        status = self.job.read_status(handle._actor_id)
        pid = None if status is None else status.pid
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def status(self, handle: ActorHandle) -> ActorStatus | None:
        """The actor's status as its supervisor last wrote it (None before the first)."""
        return self.job.read_status(handle._actor_id)

    def shutdown(self) -> None:
        if self._dropped is not None:
            self._dropped.put(None)
            lifetime.forget_all()
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


_runtime: Runtime | None = None
_lock = threading.Lock()


def init(backend: str = "local", num_threads: int | None = None, store_capacity: Any = None,
         address: str | None = None, start_method: str = "zygote") -> Runtime:
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
        torch.set_num_threads(num_threads or default_num_threads(0))
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
    from torchactors.actors import worker

    worker.exit_actor()


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
    if not isinstance(num_returns, int) or num_returns < 0 or num_returns > len(refs):
        raise ValueError(f"num_returns must be an int from 0 to the number of refs ({len(refs)}), not {num_returns!r}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, not {timeout!r}")
    return store_core.current().wait(refs, num_returns, timeout)


def wait_ready(handles: list[ActorHandle], timeout: float | None = None) -> None:
    """Block until every actor in ``handles`` has finished its constructor and answers calls
    (raises ActorDiedError for one that died, GetTimeoutError after ``timeout``)."""
    rt = runtime()
    rt.store.get([rt.ping(h) for h in handles], timeout)
