"""The actor process's call loop.

Box in the data flow: socket -> actor loop -> method -> result ref -> socket. One thread
reads every connection (epoll); a call from one caller runs in the order it was sent.
With ``max_concurrency == 1`` a plain method runs on the loop thread itself (no thread hop per
call); with ``max_concurrency > 1`` on a thread pool. An actor with any ``async def`` method
is an async actor (Ray's rule): every method, sync ones included, runs on its one event-loop
thread, and at most ``max_concurrency`` coroutines run at once.

A call whose arguments wait for other calls' results (CALL_DEPS) is held in its caller's
queue until its DEP messages arrive; in an ordered (sync, single-threaded) actor that caller's
later calls wait behind it, other callers' calls do not.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import inspect
import logging
import os
import pickle
import select
import signal
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cloudpickle

from torchactors.actors import _current, protocol
from torchactors.actors.calls import (
    READY,
    ExitActor,
    decode_args,
    encode_result,
    error_reply,
    exit_reason,
    exit_requested,
    exited,
    fill_deps,
    remote_error,
    resolve_top_level,
    run_coroutine,
    run_method,
    start_event_loop,
)
from torchactors.actors.handle import is_async_class
from torchactors.actors.local import Runtime
from torchactors.runtime.child import ChildContext
from torchactors.runtime.transport import (
    AUTH_TIMEOUT,
    AuthenticationError,
    Connection,
    ConnectionClosed,
    Handshake,
    Listener,
    ProtocolError,
)

logger = logging.getLogger(__name__)


SPIN_S = 200e-6     # the loop polls this long before it sleeps in epoll_wait (docs/design.md "Poll before sleeping, yielding the core")
MAX_JOINING = 64    # connections mid-handshake at most; a new one beyond drops the oldest
ACCEPT_BACKOFF = (0.01, 1.0)    # the listener rests this long (doubling) when out of fds
REFUSAL_LOG_S = 5.0             # refused connections are logged at most this often
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
class _Refusals:
    """Connections refused before they authenticated, logged at most once per
    ``REFUSAL_LOG_S``: a flood of them must not flood the log too."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0
        self.logged_at = -REFUSAL_LOG_S

    def add(self, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= REFUSAL_LOG_S:
            logger.warning("refused %d connection(s) on %s since the last report; the latest: %s",
                           self.count, self.path, why)
            self.count, self.logged_at = 0, now


_exit_lock = threading.Lock()


def exit_process(code: int = 0) -> None:
    """End this actor's process from any thread: its atexit handlers run first, once (a second
    caller waits here for the first's ``os._exit``)."""
    _exit_lock.acquire()
    try:
        atexit._run_exitfuncs()
    finally:
        os._exit(code)


class _Waiting:
    """A call held in its caller's queue: for its dependencies, or behind one that waits."""

    __slots__ = ("method", "args", "kwargs", "missing", "values", "error")

    def __init__(self, method: str | None, args: tuple, kwargs: dict, missing: int) -> None:
        self.method = method        # None: the caller's STOP
        self.args, self.kwargs = args, kwargs
        self.missing = missing
        self.values: dict[int, Any] = {}
        self.error: BaseException | None = None

    def ready(self) -> bool:
        return self.missing == 0 or self.error is not None


class _Peer:
    """A caller's connection, with the refs sent to it that it has not acknowledged yet and
    the replies its socket had no room for (a caller that is stopped or not reading)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.send_lock = threading.Lock()
        self.held: dict[int, list] = {}
        self.outbox: deque[memoryview] = deque()
        self.waiting: dict[int, _Waiting] = {}     # seq -> held call, in arrival order

    def ack(self, upto: int) -> None:
        for seq in [s for s in self.held if s <= upto]:
            del self.held[seq]


class ActorServer:
    """The actor server: the user's instance, and the loop that serves its callers.

    It owns the instance (built from the pickled class and constructor arguments), the
    listening socket of this incarnation, each caller's connection (``_Peer``: replies not yet
    acknowledged, calls held for their dependencies) and, for concurrent actors, the thread
    pool or event loop the calls run on. ``serve`` (the supervisor's target for actor
    processes) builds it and runs ``serve_forever`` until the process ends. Calls are decoded
    and answered with the codec of ``actors.calls``. See docs/design.md, "One thread per
    actor, no thread per call", "Small results ride inside the reply" and "Poll before
    sleeping, yielding the core".
    """

    def __init__(self, spec: dict, ctx: ChildContext) -> None:
        self.job = ctx.job
        self.key = ctx.key
        self.name = spec["name"]
        self.max_concurrency = spec["max_concurrency"]
        self.listener = Listener(self.job.socket_path(ctx.key, ctx.incarnation), self.job.secret)
        self.poller = select.epoll()
        self.pool: ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slots: asyncio.Semaphore | None = None
        self.ordered = True         # calls run inline on the loop thread, one at a time
        self.inflight = 0           # calls handed to the pool or event loop, not replied yet
        self.inflight_lock = threading.Lock()
        self._methods: dict[str, tuple[Any, bool]] = {}
        self._refusals = _Refusals(self.listener.path)
        self._fd_shortage = _Refusals(self.listener.path)       # logged apart: the operator's problem
        self._backoff = 0.0                      # the listener's current rest after EMFILE
        self._listen_at: float | None = None  # when a resting listener listens again
        self.exiting: BaseException | None = None   # set once the actor ends on purpose: queued calls' error
        self.instance = self._construct(spec)

    def _construct(self, spec: dict) -> Any:
        try:
            cls = cloudpickle.loads(spec["cls"])
            if is_async_class(cls):
                self.loop = start_event_loop(on_exit=self._exit_from_task)
                self.slots = asyncio.Semaphore(self.max_concurrency)
                self.ordered = False
            elif self.max_concurrency > 1:
                self.pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="actor-call")
                self.ordered = False
            args, kwargs = resolve_top_level(*pickle.loads(spec["args"]))
            return cls(*args, **kwargs)
        except SystemExit as e:     # ta.exit_actor() or sys.exit() in __init__: an exit on purpose, no restart
            self.job.mark_killed(self.key, exit_reason("__init__", e))
            exit_process(0)
        except BaseException:
            text = traceback.format_exc()
            self.job.write_error(self.key, text)
            logger.error("constructor of %s failed:\n%s", self.name, text)
            os._exit(1)

    def serve_forever(self) -> None:
        # epoll directly, not the selectors module: one less layer of Python per call.
        listen_fd = self.listener.fileno()
        self.poller.register(listen_fd, select.EPOLLIN)
        peers: dict[int, _Peer] = {}
        joining: dict[int, Handshake] = {}     # accepted, not yet authenticated; oldest first
        poll = self.poller.poll
        while True:
            # Poll without sleeping for a moment first: a caller's next call usually follows
            # its last reply within microseconds, and a sleep/wake-up costs more than that.
            events = poll(0)
            deadline = time.perf_counter() + SPIN_S
            while not events and time.perf_counter() < deadline:
                os.sched_yield()        # spin only while nobody else wants this core
                events = poll(0)
            if not events:
                events = poll(self._sleep_for(joining))
            for fd, ev in events:
                peer = peers.get(fd)
                if peer is None:
                    self._join(fd, listen_fd, joining, peers)
                    continue
                if ev & select.EPOLLOUT:
                    self._flush(fd, peer)
                if not ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    continue
                try:
                    for msg in peer.conn.read_available():
                        self._handle(peer, msg)
                except ConnectionClosed:
                    self._drop(fd, peers)
                except ProtocolError as e:
                    logger.warning("%s: closed a caller's connection that sent a malformed message: %s",
                                   self.name, e)
                    self._drop(fd, peers)
            if joining:
                self._expire(joining)
            if self._listen_at is not None and time.monotonic() >= self._listen_at:
                self._listen_at = None
                self.poller.register(listen_fd, select.EPOLLIN)

    def _sleep_for(self, joining: dict[int, Handshake]) -> float:
        """Seconds epoll may sleep: until the first pending handshake times out or a resting
        listener listens again (-1: until an event)."""
        times = [hs.deadline for hs in joining.values()]
        if self._listen_at is not None:
            times.append(self._listen_at)
        return max(0.0, min(times) - time.monotonic()) if times else -1

    def _drop(self, fd: int, peers: dict[int, _Peer]) -> None:
        peer = peers.pop(fd)
        self.poller.unregister(fd)
        with peer.send_lock:
            peer.conn.close()
            peer.outbox.clear()
            peer.held.clear()       # the caller is gone: nobody will read those replies

    def _join(self, fd: int, listen_fd: int, joining: dict[int, Handshake], peers: dict[int, _Peer]) -> None:
        """A new caller knocks (the listener) or answers (its handshake); an authenticated
        one becomes a peer on the same socket."""
        if fd == listen_fd:
            self._accept(listen_fd, joining)
            return
        hs = joining.get(fd)
        if hs is None:          # an event of a socket closed earlier in this batch
            return
        try:
            conn = hs.advance()
        except AuthenticationError as e:
            self._refuse(joining, fd, str(e))
            return
        if conn is not None:
            del joining[fd]
            peers[fd] = _Peer(conn)

    def _accept(self, listen_fd: int, joining: dict[int, Handshake]) -> None:
        """Start the handshake of the next caller in the listen queue. Out of fds (a flood of
        connections that do not authenticate), drop the oldest pending handshake to make
        room or, with none to drop, rest the listener with a growing back-off: never exit."""
        try:
            hs = self.listener.accept()
        except OSError as e:
            if e.errno not in _OUT_OF_FDS:
                self._refusals.add(f"accept failed: {e}")
                return
            if joining:
                self._refuse(joining, next(iter(joining)), f"out of file descriptors ({e.strerror}); "
                             "dropped the oldest connection waiting to authenticate", self._fd_shortage)
                return
            self._backoff = min(max(2 * self._backoff, ACCEPT_BACKOFF[0]), ACCEPT_BACKOFF[1])
            self._fd_shortage.add(f"out of file descriptors ({e.strerror}); not accepting for "
                                  f"{self._backoff:.2f} s")
            self.poller.unregister(listen_fd)
            self._listen_at = time.monotonic() + self._backoff
            return
        self._backoff = 0.0
        if hs is None:
            return
        if len(joining) >= MAX_JOINING:
            self._refuse(joining, next(iter(joining)), f"more than {MAX_JOINING} connections waiting to "
                         "authenticate; dropped the oldest")
        joining[hs.fileno()] = hs
        self.poller.register(hs.fileno(), select.EPOLLIN)

    def _refuse(self, joining: dict[int, Handshake], fd: int, why: str, log: _Refusals | None = None) -> None:
        hs = joining.pop(fd)
        self.poller.unregister(fd)
        hs.close()
        (log or self._refusals).add(why)

    def _expire(self, joining: dict[int, Handshake]) -> None:
        now = time.monotonic()
        for fd, hs in list(joining.items()):
            if hs.deadline <= now:
                self._refuse(joining, fd, f"no answer to the handshake within {AUTH_TIMEOUT:.0f} s")

    def _handle(self, peer: _Peer, msg: bytes) -> None:
        """Run one request. ProtocolError if it is malformed (the caller closes the connection)."""
        kind, seq, ack, method, body = protocol.parse_request(msg)
        if ack:
            peer.ack(ack)
        if kind != protocol.CALL or peer.waiting:
            self._control(peer, kind, seq, method, body)
            return
        try:
            # No arguments (the common small call): skip decoding and the ref scan (2 us of 5).
            call: list = [(), {}] if body == protocol.EMPTY_ARGS else list(resolve_top_level(*decode_args(body)))
            fn, is_async = self._method(method)
        except ProtocolError:
            raise
        except BaseException as e:
            self._reply_error(peer, seq, method, e)
            return
        if self.ordered:
            self._run_inline(peer, seq, method, fn, call)
        else:
            self._dispatch(peer, seq, method, fn, is_async, call)

    def _run_inline(self, peer: _Peer, seq: int, method: str, fn: Any, call: list) -> None:
        """Run ``fn(*args, **kwargs)`` (``call`` = [args, kwargs], emptied: see below) and reply."""
        ok, value = run_method(fn, call)
        self._finish(peer, seq, method, ok, value)

    def _finish(self, peer: _Peer, seq: int, method: str, ok: bool, value: Any) -> None:
        """Reply with a call's outcome, in the thread or task that ran it. A SystemExit
        (``ta.exit_actor()``, ``sys.exit()``), or a ``ta.exit_actor()`` whose SystemExit the
        method caught, ends the actor instead (Ray's rule)."""
        if exit_requested.get() or (not ok and isinstance(value, SystemExit)):
            self._exit_on_purpose(peer, seq, method, exit_reason(method, None if ok else value))
        elif ok:
            self._reply(peer, seq, method, value)
        else:
            self._reply_error(peer, seq, method, value)

    def _dispatch(self, peer: _Peer, seq: int, method: str, fn: Any, is_async: bool, call: list) -> None:
        """Run a call on the event loop (async actor) or the pool (threaded actor)."""
        with self.inflight_lock:
            self.inflight += 1
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._on_loop, peer, seq, method, fn, is_async, call)
        else:
            assert self.pool is not None, "an unordered sync actor has a pool"
            self.pool.submit(self._run_pooled, peer, seq, method, fn, call)

    def _run_pooled(self, peer: _Peer, seq: int, method: str, fn: Any, call: list) -> None:
        try:
            if self.exiting is not None:    # queued behind ta.exit_actor() in another thread
                call.clear()
                self._send(peer, seq, error_reply(seq, self.exiting, self.name, method), None)
            else:
                self._run_inline(peer, seq, method, fn, call)
        finally:
            self._done()

    def _on_loop(self, peer: _Peer, seq: int, method: str, fn: Any, is_async: bool, call: list) -> None:
        assert self.loop is not None, "called on the loop"
        if is_async:
            self.loop.create_task(self._run_coroutine(peer, seq, method, fn, call))
        else:                           # a sync method of an async actor blocks the loop, as in Ray
            self._run_inline(peer, seq, method, fn, call)
            self._done()

    async def _run_coroutine(self, peer: _Peer, seq: int, method: str, fn: Any, call: list) -> None:
        assert self.slots is not None, "an async actor has its slots"
        try:
            async with self.slots:
                ok, value = await run_coroutine(fn, call)
            self._finish(peer, seq, method, ok, value)
        finally:
            self._done()

    def _done(self) -> None:
        with self.inflight_lock:
            self.inflight -= 1

    # -- calls that wait (dependencies, ordering), and control requests -----------------------

    def _control(self, peer: _Peer, kind: int, seq: int, method: str, body: memoryview) -> None:
        if kind == protocol.ACK:
            return
        if kind == protocol.KILL:
            logger.info("%s killed on request", self.name)
            os._exit(0)
        if kind == protocol.PING:
            self._send(peer, seq, protocol.reply(protocol.OK_VALUE, seq, False, READY), None)
        elif kind == protocol.DEP:
            if not method.isdigit():
                raise ProtocolError(f"a dependency's index is {method!r}, not a number")
            self._dep_arrived(peer, seq, int(method), body)
        elif kind == protocol.STOP:
            if self.ordered and peer.waiting:
                peer.waiting[seq] = _Waiting(None, (), {}, 0)       # after this caller's held calls
            else:
                self._stop()
        elif kind in (protocol.CALL, protocol.CALL_DEPS):
            try:
                args, kwargs = decode_args(body)
            except ProtocolError:
                raise
            except BaseException as e:
                self._reply_error(peer, seq, method, e)
                return
            missing = 0
            if kind == protocol.CALL_DEPS:
                missing = sum(type(a) is protocol.Dep for a in args) + sum(
                    type(v) is protocol.Dep for v in kwargs.values())
            waiting = _Waiting(method, args, kwargs, missing)
            if missing or (self.ordered and peer.waiting):
                peer.waiting[seq] = waiting
            else:
                self._start(peer, seq, waiting)
        else:
            logger.warning("%s: unknown request kind %d ignored", self.name, kind)

    def _dep_arrived(self, peer: _Peer, seq: int, index: int, body: memoryview) -> None:
        waiting = peer.waiting.get(seq)
        if waiting is None or waiting.error is not None:
            return
        try:
            ok, value = pickle.loads(body)
        except BaseException as e:
            ok, value = False, e
        if ok:
            waiting.values[index] = value
        else:
            waiting.error = value
        waiting.missing -= 1
        self._advance(peer)

    def _advance(self, peer: _Peer) -> None:
        """Start the held calls that can run: in an ordered actor only from the head of the
        caller's queue; otherwise any whose dependencies arrived."""
        for seq in list(peer.waiting):
            waiting = peer.waiting[seq]
            if not waiting.ready():
                if self.ordered:
                    return
                continue
            del peer.waiting[seq]
            if waiting.method is None:
                self._stop()
                return
            self._start(peer, seq, waiting)

    def _start(self, peer: _Peer, seq: int, waiting: _Waiting) -> None:
        method = waiting.method
        assert method is not None, "a held STOP is not started: _advance stops instead"
        if waiting.error is not None:       # a dependency failed: its error is this call's
            self._send(peer, seq, error_reply(seq, waiting.error, self.name, method), None)
            return
        values = waiting.values
        try:
            call: list = list(resolve_top_level(*fill_deps(waiting.args, waiting.kwargs, values)))
            fn, is_async = self._method(method)
        except BaseException as e:
            self._reply_error(peer, seq, method, e)
            return
        finally:
            waiting.args, waiting.kwargs, waiting.values = (), {}, {}
            del values      # only ``call`` holds the arguments now (see _run_inline)
        if self.ordered:
            self._run_inline(peer, seq, method, fn, call)
        else:
            self._dispatch(peer, seq, method, fn, is_async, call)

    def _stop(self) -> None:
        """A caller's STOP (its last handle went, or __ray_terminate__): end once the calls
        in progress have replied, calling the instance's ``__ray_shutdown__`` first (Ray's)."""
        if self.ordered:
            self._call_shutdown()
            exit_process(0)
        threading.Thread(target=self._exit_when_idle, args=(True,), daemon=True, name="actor-stop").start()

    def _exit_when_idle(self, shutdown: bool) -> None:
        while self.inflight > 0:
            time.sleep(0.005)
        if shutdown:
            self._call_shutdown()
        exit_process(0)

    def _call_shutdown(self) -> None:
        """The instance's ``__ray_shutdown__()`` (a coroutine of an async actor runs on its
        loop). Its error is logged: the actor ends anyway."""
        hook = getattr(self.instance, "__ray_shutdown__", None)
        if hook is None:
            return
        try:
            result = hook()
            if inspect.isawaitable(result) and self.loop is not None:
                asyncio.run_coroutine_threadsafe(_awaited(result), self.loop).result()
        except BaseException:
            logger.exception("%s: __ray_shutdown__ raised; the actor ends anyway", self.name)

    def _method(self, name: str) -> tuple[Any, bool]:
        """The bound method and whether it is ``async``, looked up once per name."""
        found = self._methods.get(name)
        if found is None:
            fn = getattr(self.instance, name)
            found = self._methods[name] = (fn, inspect.iscoroutinefunction(fn))
        return found

    def _reply(self, peer: _Peer, seq: int, method: str, result: Any) -> None:
        try:
            kind, body, held = encode_result(result)
        except BaseException as e:
            self._reply_error(peer, seq, method, e)
            return
        self._send(peer, seq, protocol.reply(kind, seq, held is not None, body), held)

    def _reply_error(self, peer: _Peer, seq: int, method: str, exc: BaseException) -> None:
        self._send(peer, seq, error_reply(seq, remote_error(exc, self.name, method), self.name, method), None)

    def _exit_on_purpose(self, peer: _Peer, seq: int, method: str, reason: str) -> None:
        """An exit on purpose in ``method``: no restart; this call and the ones queued behind
        it fail with ActorDiedError saying so (the callers read the reason from the job). A
        threaded actor's calls running in its other threads finish and reply first (Ray's)."""
        self.job.mark_killed(self.key, reason)
        err = self.exiting = exited(self.name, self.key, method, reason)
        self._send(peer, seq, error_reply(seq, err, self.name, method), None)
        if self.pool is None:
            exit_process(0)
        threading.Thread(target=self._exit_when_idle, args=(False,), daemon=True, name="actor-exit").start()

    def _exit_from_task(self, exc: SystemExit) -> None:
        """A SystemExit out of the event loop: ``ta.exit_actor()`` in an asyncio task that a
        method created. The loop is gone, so the actor ends now."""
        how = "ta.exit_actor() was called" if isinstance(exc, ExitActor) else f"SystemExit({exc.code!r}) was raised"
        self.job.mark_killed(self.key, f"it exited on purpose: {how} in an asyncio task the actor started")
        exit_process(0)

    def _send(self, peer: _Peer, seq: int, msg: bytes, held: list | None) -> None:
        """Send a reply without ever blocking (any thread): a caller that does not read must
        not stall the loop that serves the others. What its socket has no room for waits in
        its outbox, in order, and the loop sends it when epoll says there is room."""
        with peer.send_lock:
            if peer.conn.closed:
                return
            if held:
                peer.held[seq] = held
            try:
                if peer.outbox:
                    peer.outbox.extend(peer.conn.frame(msg))
                    return
                rest = peer.conn.send_some(msg)
                if rest:
                    peer.outbox.extend(rest)
                    self.poller.modify(peer.conn.fileno(), select.EPOLLIN | select.EPOLLOUT)
            except OSError:
                peer.held.pop(seq, None)    # the caller is gone; the loop sees the EOF

    def _flush(self, fd: int, peer: _Peer) -> None:
        """The loop thread, once a caller's socket has room: send what waits for it."""
        with peer.send_lock:
            try:
                peer.conn.send_nowait(peer.outbox)
            except OSError:
                peer.outbox.clear()         # the caller is gone; the read side sees the EOF
            if not peer.outbox and not peer.conn.closed:
                self.poller.modify(fd, select.EPOLLIN)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def serve(payload: bytes, ctx: ChildContext) -> None:
    """Target of the supervisor for actor processes."""
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    _current.in_actor = True
    spec = pickle.loads(payload)
    _current.backend = Runtime(ctx.job, ctx.store)
    ActorServer(spec, ctx).serve_forever()
