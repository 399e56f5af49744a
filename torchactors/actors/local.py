"""The local backend: actors as processes of this machine, started and watched by our supervisor.

Box in the data flow: ``Cls.remote()`` -> ``Runtime.create_actor`` -> supervisor -> actor
process (``actors.worker``); ``h.m.remote()`` -> ``Runtime.call`` -> the actor's ``Channel``
-> socket. The driver's runtime and each actor process's own are the same class: the API is
the same inside actors (docs/design.md, "Layers and the current objects").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import signal
import threading

from torchactors.actors import handle as handle_module
from torchactors.actors import lifetime, protocol
from torchactors.actors.calls import DependencyFailed, encode_args
from torchactors.actors.channel import Channel
from torchactors.actors.handle import (
    ActorHandle,
    dumps_class,
    method_decorators,
    method_returns,
    new_actor_id,
    public_methods,
)
from torchactors.actors.options import default_num_threads
from torchactors.actors.pending import failed_ref
from torchactors.errors import ActorDiedError
from torchactors.runtime.job import Job
from torchactors.runtime.status import ActorStatus
from torchactors.runtime.supervisor import Backoff, ProcessSpec, Supervisor
from torchactors.store.core import Store
from torchactors.store.refs import ObjectRef

logger = logging.getLogger(__name__)


class _Owned:
    """An actor this process started: what must live as long as it may restart."""

    def __init__(self, actor_id: str, name: str | None, held: list, shutdown_hook: bool = False) -> None:
        self.actor_id = actor_id
        self.name = name        # its key in the job's names (namespace included), if named
        self.held = held        # refs in the constructor arguments (a restart re-reads them)
        self.shutdown_hook = shutdown_hook      # its class has __ray_shutdown__: stop it, do not kill it


def name_key(name: str, namespace: str | None) -> str:
    """An actor's key among the job's names: Ray's namespaces are prefixes of one table."""
    return name if not namespace else f"{namespace}/{name}"


class Runtime:
    """The local backend of one process (the driver's, or an actor's own): it implements
    ``actors.backend.Backend``.

    It owns the process's ``Channel`` to each actor it called (one connection per actor), the
    actors it started (``owned``: what a restart needs), and, started on first need, the
    ``Supervisor`` that runs their processes. ``actors.api`` creates it in the driver
    (``ta.init``), ``actors.worker.serve`` in each actor process; ``actors.handle`` calls it
    through ``actors._current``. See docs/design.md, "Calls before an actor is up" and "Ray's
    semantics: dependencies travel after the call, lifetime is counted where handles are made".
    """

    def __init__(self, job: Job, store: Store, start_method: str = "zygote") -> None:
        self.job = job
        self.start_method = start_method      # the default of actors that do not choose one
        self.store = store
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
        deps: list = []
        body, held = encode_args(args, kwargs, self.store.put, deps)
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
        handle = ActorHandle(actor_id, label, methods, options["max_task_retries"], returns,
                             decorators=method_decorators(cls))
        spec = {"cls": cls_bytes, "name": label, "max_concurrency": options["max_concurrency"]}
        process = ProcessSpec(
            key=actor_id, target="torchactors.actors.worker:serve", payload=b"",
            num_threads=options["num_threads"] or default_num_threads(len(self.owned)),
            env=dict(options.get("env") or {}), max_restarts=options["max_restarts"],
            device=options["device"], start_method=options.get("start_method") or self.start_method,
            backoff=Backoff.parse(options.get("restart_backoff")),
            # Outlives this actor (Ray); the driver's own detached actors end with it as before.
            detached=options.get("lifetime") == "detached" and not self.job.driver)
        self.owned[actor_id] = _Owned(actor_id, key, held, callable(getattr(cls, "__ray_shutdown__", None)))
        if deps:
            # Its constructor waits for calls still running: start it once they are done
            # (Ray's rule; .remote() returns at once). Until then callers find it "starting",
            # owned by this process, and learn of its death if this process dies first.
            self.job.write_status(actor_id, ActorStatus("starting", restarts_left=options["max_restarts"]))
            threading.Thread(target=self._start_after_deps, args=(process, spec, args, kwargs), daemon=True,
                             name=f"torchactors-deps-{label}").start()
        else:
            self._start(process, spec, body)
        return handle

    def _start(self, process: ProcessSpec, spec: dict, body: bytes) -> None:
        self.supervisor.start(dataclasses.replace(process, payload=pickle.dumps({**spec, "args": body})))

    def _start_after_deps(self, process: ProcessSpec, spec: dict, args: tuple, kwargs: dict) -> None:
        """Wait for the constructor's pending arguments, then start the actor; if one failed,
        the actor is dead with that error as its constructor's (its calls raise ActorDiedError)."""
        actor_id = process.key
        try:
            body, held = encode_args(args, kwargs, self.store.put)     # waits for the pending refs
        except DependencyFailed as failed:
            error = failed.error
        except Exception as e:          # shut down meanwhile, or the store is full
            error = e
        else:
            owned = self.owned.get(actor_id)
            if owned is not None and not self.store.closed and not self.job.was_killed(actor_id):
                owned.held = held
                self._start(process, spec, body)
            return
        logger.info("%s is not started: a constructor argument failed: %s", actor_id, error)
        if self.store.closed:
            return
        self.job.write_error(actor_id, f"a constructor argument is the ref of a call that failed: {error!r}")
        self.job.write_status(actor_id, ActorStatus("dead", restarts_left=0, error=str(error)))

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
            dropped: queue.SimpleQueue[str | None] = queue.SimpleQueue()
            self._dropped = dropped
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
        owned = self.owned.pop(actor_id, None)
        if ch is None and owned is not None and not owned.shutdown_hook:
            self.supervisor.kill(actor_id)          # never called from here: nothing to wait for
            return
        if ch is None:      # a borrower, the last holder, that never called it, or a __ray_shutdown__ to run
            ch = self.channel(ActorHandle(actor_id, actor_id, []))
        self._send_stop(ch)
        self.channels.pop(actor_id, None)   # its pending refs keep it (and their replies)

    def terminate(self, handle: ActorHandle) -> ObjectRef:
        """``h.__ray_terminate__.remote()``: stop once the calls sent so far ran; the ref
        raises ActorDiedError once it has ended."""
        self.job.mark_killed(handle._actor_id, "it was terminated with __ray_terminate__")
        return self._send_stop(self.channel(handle))

    @staticmethod
    def _send_stop(ch: Channel) -> ObjectRef:
        try:
            return ch.call("", b"", [], kind=protocol.STOP)    # no reply: the pending call fails at the EOF
        except ActorDiedError as e:
            return failed_ref(e, f"{ch.actor_id}.__ray_terminate__")       # already gone

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

    def _named(self, record: dict, name: str | None) -> ActorHandle:
        """The handle of the named actor a names-table ``record`` describes."""
        return ActorHandle(record["actor_id"], name or record["actor_id"], record["methods"],
                           record["max_task_retries"], record.get("returns"))

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
