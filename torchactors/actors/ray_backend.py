"""The Ray backend: the same ``@ta.actor`` classes as Ray actors, on one machine or a cluster.

Box in the data flow: Ray places, starts and restarts each actor process (a ``_Host`` holding
the user's instance) and carries every call; torchactors still moves the tensors. When caller
and actor are on one node and the actor joined the driver's job there, a call is encoded as
on the local backend (tensors put into the sender's store, refs in the message: no copy, CUDA
IPC for CUDA tensors). Across nodes, arguments and results travel by value through Ray's
object store, each ref arriving as a ref to a copy in the receiver's store. Constructor
arguments always travel by value (the actor's node is not known before Ray places it).

Ray is imported only here, and only when ``ta.init(backend="ray")`` asks for it.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import itertools
import logging
import os
import pickle
import re
import sys
import threading
import time
import weakref
from typing import Any

import cloudpickle

from torchactors.actors import _current, calls, protocol
from torchactors.actors.handle import (
    ActorHandle,
    dumps_class,
    is_async_class,
    method_decorators,
    method_returns,
    new_actor_id,
    public_methods,
)
from torchactors.actors.options import default_num_threads
from torchactors.actors.pending import PendingResult, failed_ref
from torchactors.errors import ActorDiedError, ActorError, GetTimeoutError
from torchactors.runtime import job as job_module
from torchactors.store import core as store_core
from torchactors.store.core import Store
from torchactors.store.refs import ObjectRef

logger = logging.getLogger(__name__)

SWEEP_S = 1.0       # how often a host drops the reply holds of callers that died


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray: pip install 'torchactors[ray]'") from None
    return ray


def node_id() -> str:
    return _ray().get_runtime_context().get_node_id()


class _ByValue(cloudpickle.CloudPickler):
    """Pickles a message for another node, where nobody can map our store: tensors as bytes,
    and each ref as its value, put again into the receiver's store on arrival, so that a ref
    stays a ref (now to a copy) and the receiver's ``get`` works as usual."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, ObjectRef):
            return (_put_here, (store_core.current().get(obj, copy=True),))
        return super().reducer_override(obj)


def _put_here(value: Any) -> ObjectRef:
    return store_core.current().put(value)


def dumps_by_value(obj: Any) -> bytes:
    buf = io.BytesIO()
    _ByValue(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


class RayActorHandle(ActorHandle):
    """An ActorHandle that also carries the Ray actor it names (picklable inside a Ray job)."""

    def __init__(self, actor_id: str, name: str, methods: list[str], max_task_retries: int, ray_actor: Any,
                 returns: dict | None = None, decorators: dict | None = None) -> None:
        super().__init__(actor_id, name, methods, max_task_retries, returns, decorators=decorators)
        self._ray_actor = ray_actor

    def __reduce__(self) -> tuple:
        # Passed on inside our own messages, where Ray does not count it: hold Ray's handle in
        # this process until shutdown, so Ray does not stop the actor when ours goes.
        _passed_on[self._actor_id] = self._ray_actor
        return (RayActorHandle, (self._actor_id, self._name, self._methods, self._max_task_retries, self._ray_actor,
                                 self._returns, self._decorators or None))


_passed_on: dict[str, Any] = {}     # actor id -> Ray handle, for handles this process pickled


class RayPendingCall(PendingResult):
    """A call on the Ray backend: its reply is the result of a Ray task."""

    __slots__ = ("oref", "held", "host", "handle", "runtime", "id")

    def __init__(self, oref: Any, held: list, handle: RayActorHandle, runtime: RayRuntime) -> None:
        self.oref = oref
        self.held: list | None = held       # refs in the request: kept until the reply is in
        self.host = handle._ray_actor
        self.handle = handle
        self.runtime = runtime
        self.kind = 0
        self.value: Any = None
        self.id = f"{handle._name}.{oref.hex()[:16] if oref is not None else 'refused'}"

    def done(self) -> bool:
        if not self.kind and _ray().wait([self.oref], timeout=0)[0]:
            self._wait(None)
        return self.kind != 0

    def _wait(self, timeout: float | None) -> None:
        ray = _ray()
        try:
            reply = ray.get(self.oref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise GetTimeoutError(f"get timed out after {timeout}s waiting for {self.handle._name} (call {self.id}); "
                                  "the call is still running", timeout) from None
        except ray.exceptions.RayActorError as e:
            self.runtime.forget(self.handle)    # Ray may restart it on another node
            self._set(protocol.ERROR, _death(self.handle._name, e, self.handle._actor_id in self.runtime.killed))
            return
        except ray.exceptions.RayError as e:
            self._set(protocol.ERROR, ActorError(type(e).__qualname__, str(e).splitlines()[0], str(e),
                                                 self.handle._name, "?"))
            return
        kind, call_id, holds, value = calls.decode_reply(reply)
        if holds:
            self.host.ack.remote(call_id)   # the actor may drop its hold on the result now
        if isinstance(value, ActorDiedError):
            self.runtime.forget(self.handle)    # it moved: ask where it is before the next call
        self._set(kind, value)

    def _set(self, kind: int, value: Any) -> None:
        self.kind, self.value, self.held = kind, value, None

    @staticmethod
    def wait_any(pendings: list[RayPendingCall], timeout: float | None) -> None:
        _ray().wait([p.oref for p in pendings if not p.kind], num_returns=1, timeout=timeout)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")     # the colours of Ray's task names in its messages


def _death(actor: str, error: Exception, killed: bool) -> ActorDiedError:
    """Ray's RayActorError as ours: its first line, or all of it (the constructor's traceback
    and exception) when the constructor raised, as the local backend says it."""
    ray = _ray()
    restarting = isinstance(error, getattr(ray.exceptions, "ActorUnavailableError", ()))
    text = _ANSI.sub("", str(error)).strip()
    if getattr(error, "actor_init_failed", False):
        return ActorDiedError(actor, detail=f"its constructor raised (Ray says):\n{text}", restarting=restarting)
    said = text.splitlines()[0] if text else type(error).__name__
    detail = ("it was killed with ta.kill(); " if killed else "") + f"Ray says: {said}"
    return ActorDiedError(actor, detail=detail, restarting=restarting)


class RayRuntime:
    """The Ray backend of one process (the driver's, or an actor's inside its ``_Host``): it
    implements ``actors.backend.Backend``.

    It owns this process's Ray handles of the actors it started (named and detached ones
    until shutdown, unnamed ones while the user holds a handle) and where each actor runs
    (whether it reads this process's store). ``actors.api.init(backend="ray")`` creates it
    through ``start``; a ``_Host`` creates its own. See docs/design.md, "On Ray, Ray carries
    the calls and torchactors the tensors".
    """

    def __init__(self, job: job_module.Job, store: Store, started_ray: bool) -> None:
        self.job = job
        self.store = store
        self.node = node_id()
        self.started_ray = started_ray
        # Named and detached actors are held until shutdown; unnamed ones only while the user
        # holds a handle: dropping the last one lets Ray stop the actor (handle-scoped lifetime).
        self.owned: dict[str, RayActorHandle] = {}
        self.unnamed: weakref.WeakValueDictionary[str, RayActorHandle] = weakref.WeakValueDictionary()
        self.killed: set[str] = set()
        self._refs_ok: dict[str, Any] = {}     # actor id -> its ("node", joined job dir) future or answer

    def create_actor(self, cls: type, options: dict, args: tuple, kwargs: dict) -> RayActorHandle:
        ray = _ray()
        if self.store.closed:
            raise RuntimeError("torchactors was shut down; call ta.init() again before starting actors")
        actor_id = new_actor_id(cls)
        name = options.get("name")
        if name is not None and options.get("get_if_exists"):
            try:
                return self.get_actor(name, options.get("namespace"))
            except ValueError:
                pass        # not there yet: create it (Ray's get_if_exists settles a race)
        try:
            cls_bytes = dumps_class(cls)
            args_bytes = dumps_by_value((args, kwargs))
        except Exception as e:
            raise TypeError(f"actor {cls.__qualname__} or its constructor arguments cannot be sent to Ray: {e}") from e
        ray_options: dict[str, Any] = {
            "max_restarts": options["max_restarts"], "max_task_retries": options["max_task_retries"],
            "max_concurrency": options["max_concurrency"], "num_cpus": 0,
        }
        if options["device"] != "cpu":
            ray_options["num_gpus"] = 1
        for key in ("num_cpus", "num_gpus", "resources", "memory", "object_store_memory", "accelerator_type",
                    "scheduling_strategy", "namespace", "lifetime"):
            if options.get(key) is not None:
                ray_options[key] = options[key]
        if name is not None:
            ray_options["name"] = name
            if options.get("get_if_exists"):
                ray_options["get_if_exists"] = True
        if options.get("env"):
            ray_options["runtime_env"] = {"env_vars": dict(options["env"])}
        ray_options.update(options.get("ray_options") or {})      # the user's word wins
        spec = {"actor_id": actor_id, "name": name or actor_id, "cls": cls_bytes, "args": args_bytes,
                "num_threads": options["num_threads"] or default_num_threads(len(self.owned) + len(self.unnamed)), "device": options["device"],
                "job": job_module.describe(self.job), "sys_path": list(sys.path),
                "max_task_retries": options["max_task_retries"]}
        host_cls = _AsyncHost if is_async_class(cls) else _Host
        host = ray.remote(host_cls).options(**ray_options).remote(spec)
        handle = RayActorHandle(actor_id, name or actor_id, public_methods(cls), options["max_task_retries"], host,
                                method_returns(cls), method_decorators(cls))
        if name is not None or options.get("lifetime") == "detached":
            self.owned[actor_id] = handle
        else:
            self.unnamed[actor_id] = handle
        return handle

    def forget(self, handle: ActorHandle) -> None:
        """Ask the actor where it runs again before the next call (it died, or moved)."""
        self._refs_ok.pop(handle._actor_id, None)

    def _same_store(self, handle: RayActorHandle) -> bool:
        """Whether the actor reads this process's store: same node, joined the same job."""
        known = self._refs_ok.get(handle._actor_id)
        if known is None:
            known = self._refs_ok[handle._actor_id] = handle._ray_actor.where.remote()
        if not isinstance(known, bool):
            try:
                node, job_dir = _ray().get(known)
            except _ray().exceptions.RayActorError:
                return False        # the call itself will report the death
            known = self._refs_ok[handle._actor_id] = node == self.node and job_dir == self.job.dir
        return known

    @staticmethod
    def _ours(handle: ActorHandle) -> RayActorHandle:
        if not isinstance(handle, RayActorHandle):
            raise TypeError(f"{handle!r} is an actor of the local backend; this process runs backend='ray'")
        return handle

    def _killed(self, handle: RayActorHandle) -> ObjectRef | None:
        """A call to an actor this process killed fails at once (Ray's kill is asynchronous)."""
        if handle._actor_id not in self.killed:
            return None
        pending = RayPendingCall(None, [], handle, self)
        pending._set(protocol.ERROR, ActorDiedError(handle._name, detail="it was killed with ta.kill()"))
        return ObjectRef.pending(pending)

    def call(self, handle: ActorHandle, method: str, args: tuple, kwargs: dict) -> ObjectRef:
        ours = self._ours(handle)
        refused = self._killed(ours)
        if refused is not None:
            return refused
        by_ref = self._same_store(ours)
        deps: list = []
        try:
            if by_ref:
                body, held = calls.encode_args(args, kwargs, self.store.put, deps)
            else:
                body, held = dumps_by_value((args, kwargs)), []
        except calls.DependencyFailed as failed:
            return failed_ref(failed.error, f"{handle._name}.{method}")
        # Refs of unfinished calls go to Ray as top-level arguments: Ray waits for them (not us),
        # and the host decodes their replies in place of the Dep placeholders.
        oref = ours._ray_actor.call.remote(method, body, self.node, os.getpid(), by_ref,
                                           *[d._pending.oref for d in deps])
        return ObjectRef.pending(RayPendingCall(oref, held + deps, ours, self))

    def ping(self, handle: ActorHandle) -> ObjectRef:
        ours = self._ours(handle)
        refused = self._killed(ours)
        if refused is not None:
            return refused
        return ObjectRef.pending(RayPendingCall(ours._ray_actor.ping.remote(), [], ours, self))

    def get_actor(self, name: str, namespace: str | None = None) -> RayActorHandle:
        ray = _ray()
        try:
            host = ray.get_actor(name, namespace=namespace)
        except ValueError:
            raise ValueError(f"Failed to look up actor with name {name!r}: no actor named {name!r} in this job") from None
        actor_id, methods, retries, returns = ray.get(host.describe.remote())
        return RayActorHandle(actor_id, name, methods, retries, host, returns)

    def kill(self, handle: ActorHandle, no_restart: bool = True) -> None:
        if no_restart:
            self.owned.pop(handle._actor_id, None)
            self.killed.add(handle._actor_id)
        _ray().kill(self._ours(handle)._ray_actor, no_restart=no_restart)

    def terminate(self, handle: ActorHandle) -> ObjectRef:
        ours = self._ours(handle)
        return ObjectRef.pending(RayPendingCall(ours._ray_actor.__ray_terminate__.remote(), [], ours, self))

    def status(self, handle: ActorHandle) -> None:
        """Ray keeps its actors' states in its GCS, read only through its state API (a
        dashboard round trip): not cheap enough to offer, so the status is unknown here."""
        return None

    def shutdown(self) -> None:
        ray = _ray()
        hosts: dict[str, Any] = {**_passed_on, **{h._actor_id: h._ray_actor
                                                  for h in [*self.owned.values(), *self.unnamed.values()]}}
        for actor_id, host in hosts.items():
            try:
                ray.kill(host, no_restart=True)
            except Exception as e:      # already gone, or Ray itself is going down
                logger.debug("kill %s: %s", actor_id, e)
        _passed_on.clear()
        self.owned.clear()
        self.unnamed.clear()
        if self.job.driver:
            self.store.close()
            self.job.remove()
            if self.started_ray:
                ray.shutdown()


def start(capacity: int | None, address: str | None) -> RayRuntime:
    """The driver's side of ``ta.init(backend="ray")``: connect to (or start) Ray, make the job."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False if address is None else None)
    job, store = job_module.Job.create(capacity)
    return RayRuntime(job, store, started)


class _Host:
    """The Ray actor around a user's instance: joins the driver's job when it runs on the
    driver's node, runs calls, and encodes replies for the caller's node."""

    def __init__(self, spec: dict) -> None:
        from torchactors.runtime.child import enter_process

        enter_process(spec["sys_path"], spec["num_threads"], spec["device"])
        info = spec["job"]
        if os.path.isdir(info["dir"]):
            job, store = job_module.Job.join(info["dir"], info["secret"], info["capacity"])
        else:                   # another node: a job of this node's own, for puts made here
            job, store = job_module.Job.create(info["capacity"])
        _current.backend = RayRuntime(job, store, started_ray=False)
        _current.in_actor = True
        self.actor_id, self.name = spec["actor_id"], spec["name"]
        self.max_task_retries = spec["max_task_retries"]
        self.node = node_id()
        self.job_dir = job.dir if not job.driver else None
        self.held: dict[int, tuple[int, list]] = {}    # call id -> (caller pid, refs sent in its reply)
        self.seq = itertools.count(1)
        self.lock = threading.Lock()
        self.swept = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exited: ActorDiedError | None = None
        self.inflight = 0       # calls of a sync host running now (a threaded one runs several)
        cls = cloudpickle.loads(spec["cls"])
        args, kwargs = calls.resolve_top_level(*pickle.loads(spec["args"]))
        self.instance = cls(*args, **kwargs)
        self.methods = public_methods(cls)
        self.returns = method_returns(cls)

    def where(self) -> tuple[str, str | None]:
        return self.node, self.job_dir

    def describe(self) -> tuple[str, list[str], int, dict]:
        return self.actor_id, self.methods, self.max_task_retries, self.returns

    def ping(self) -> bytes:
        return protocol.reply(protocol.OK_VALUE, 0, False, calls.READY)

    def ack(self, call_id: int) -> None:
        with self.lock:
            self.held.pop(call_id, None)

    def call(self, method: str, body: bytes, caller_node: str, caller_pid: int, by_ref: bool, *deps: bytes) -> bytes:
        call_id, prepared = self._prepare(method, body, caller_node, by_ref, deps)
        if isinstance(prepared, bytes):
            return prepared
        fn, call, same_store = prepared
        with self.lock:
            self.inflight += 1
        try:
            if inspect.iscoroutinefunction(fn):
                ok, value = asyncio.run_coroutine_threadsafe(calls.run_coroutine(fn, call),
                                                             self._event_loop()).result()
            else:
                ok, value = calls.run_method(fn, call)
            return self._outcome(call_id, method, ok, value, caller_pid, same_store)
        finally:
            with self.lock:
                self.inflight -= 1

    def _outcome(self, call_id: int, method: str, ok: bool, value: Any, caller_pid: int, same_store: bool) -> bytes:
        """The reply to a call that ran: its result, its error, or the end of the actor (a
        SystemExit, or a ``ta.exit_actor()`` whose SystemExit the method caught)."""
        if calls.exit_requested.get() or (not ok and isinstance(value, SystemExit)):
            return self._exit(call_id, method, calls.exit_reason(method, None if ok else value))
        if ok:
            return self._encode(call_id, value, method, caller_pid, same_store)
        return self._error(call_id, value, method)

    def _exit(self, call_id: int, method: str, reason: str) -> bytes:
        """An exit on purpose in ``method``: this call fails with ActorDiedError saying so, and
        the host asks Ray to end it for good once the calls running in its other threads
        have returned (Ray's kill: atexit handlers of the process do not run there, since
        Ray's own would tear the worker down mid-call)."""
        err = self.exited = calls.exited(self.name, self.actor_id, method, reason)
        me = _ray().get_runtime_context().current_actor
        threading.Thread(target=self._kill_when_idle, args=(me,), daemon=True, name="host-exit").start()
        return calls.error_reply(call_id, err, self.name, method)

    def _kill_when_idle(self, me: Any) -> None:
        while self.inflight > 0:
            time.sleep(0.005)
        time.sleep(0.05)            # Ray sends the last replies
        _ray().kill(me, no_restart=True)

    def __ray_shutdown__(self) -> None:
        """Ray calls this when the actor ends gracefully: the user's ``__ray_shutdown__``."""
        hook = getattr(self.instance, "__ray_shutdown__", None)
        if hook is not None:
            hook()

    def _prepare(self, method: str, body: bytes, caller_node: str, by_ref: bool, deps: tuple) -> tuple[int, Any]:
        """The call's id and (bound method, [args, kwargs], same store), or the reply bytes of
        an error (the caller's refs are not readable here, a dependency failed, bad args)."""
        call_id = next(self.seq)
        if self.exited is not None:         # queued behind ta.exit_actor(): fails as Ray's would
            return call_id, calls.error_reply(call_id, self.exited, self.name, method)
        self._sweep()
        same_store = caller_node == self.node and self.job_dir is not None
        if by_ref and not same_store:
            # Refs from a caller that believes we share its node: we were restarted elsewhere.
            moved = ActorDiedError(self.name, detail="it was restarted on another node than its caller "
                                   "knew; call again (the call did not run)", restarting=True)
            return call_id, calls.error_reply(call_id, moved, self.name, method)
        try:
            args, kwargs = calls.decode_args(body)
            if deps:
                values = []
                for reply in deps:          # the replies of the calls whose refs were arguments
                    kind, _, _, dep_body = protocol.parse_reply(reply)
                    if kind == protocol.ERROR:
                        return call_id, protocol.reply(protocol.ERROR, call_id, False, bytes(dep_body))
                    values.append(pickle.loads(dep_body))
                args, kwargs = calls.fill_deps(args, kwargs, values)
            call = list(calls.resolve_top_level(args, kwargs))
            del args, kwargs        # only ``call`` holds them now (see calls.run_method)
            fn = getattr(self.instance, method)
        except BaseException as e:
            return call_id, self._error(call_id, e, method)
        return call_id, (fn, call, same_store)

    def _error(self, call_id: int, exc: BaseException, method: str) -> bytes:
        return calls.error_reply(call_id, calls.remote_error(exc, self.name, method), self.name, method)

    def _encode(self, call_id: int, result: Any, method: str, caller_pid: int, same_store: bool) -> bytes:
        try:
            if same_store:
                kind, out, held = calls.encode_result(result)
            else:
                kind, out, held = protocol.OK_VALUE, dumps_by_value(result), None
        except BaseException as e:
            return self._error(call_id, e, method)
        if held:
            with self.lock:
                self.held[call_id] = (caller_pid, held)
        return protocol.reply(kind, call_id, held is not None, out)

    def _sweep(self) -> None:
        """Drop the reply holds of callers (on this node) that died before acknowledging."""
        if not self.held or time.monotonic() - self.swept < SWEEP_S:
            return
        self.swept = time.monotonic()
        with self.lock:
            for call_id, (pid, _) in list(self.held.items()):
                if not os.path.exists(f"/proc/{pid}"):
                    del self.held[call_id]

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self.lock:
            if self.loop is None:
                self.loop = calls.start_event_loop()
            return self.loop


class _AsyncHost(_Host):
    """The host of an async actor: a Ray async actor, so that every method of the user's
    class, sync ones included, runs on Ray's one event-loop thread, and Ray's
    ``max_concurrency`` bounds the coroutines."""

    # The same Ray method name as the sync host's, as a coroutine: Ray runs it on the loop.
    async def call(self, method: str, body: bytes, caller_node: str, caller_pid: int,  # type: ignore[override]
                   by_ref: bool, *deps: bytes) -> bytes:
        call_id, prepared = self._prepare(method, body, caller_node, by_ref, deps)
        if isinstance(prepared, bytes):
            return prepared
        fn, call, same_store = prepared
        ok, value = await calls.run_coroutine(fn, call)
        return self._outcome(call_id, method, ok, value, caller_pid, same_store)
