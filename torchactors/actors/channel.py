"""The caller's side of an actor: one connection per (process, actor) and its pending calls.

Box in the data flow: caller -> socket -> ... -> reply -> pending call -> ``get``. No reader
thread: whichever thread waits (``get``/``wait``) reads the socket and hands every reply it
finds to its pending call, so a small call costs one round trip and no thread hop.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import threading
import time
from collections import deque
from typing import Any

from torchactors.actors import protocol
from torchactors.actors.calls import decode_reply
from torchactors.actors.pending import PendingResult, failed_ref
from torchactors.errors import ActorDiedError, ActorError, GetTimeoutError
from torchactors.runtime.job import Job
from torchactors.runtime.status import ActorStatus
from torchactors.runtime.transport import (
    MAX_MESSAGE,
    AuthenticationError,
    Connection,
    ConnectionClosed,
    ProtocolError,
    connect,
)
from torchactors.store.refs import ObjectRef, SerializationContext

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 120.0     # a new actor's process imports torch before it listens
DEATH_DETAIL_WAIT = 0.5     # how long to wait for the supervisor's word on how it died
SPIN_S = 100e-6             # a get polls this long before it sleeps (docs/design.md "Poll before sleeping, yielding the core")
RECHECK_S = 0.002           # how often wait() re-checks calls whose socket another thread reads
WRITER_POLL_S = 0.05        # how often the writer of a full socket looks again (and reads replies)


class PendingCall(PendingResult):
    """A call on the local backend: its reply arrives on the channel's socket."""

    __slots__ = ("channel", "seq", "held", "msg", "retries", "extra")

    def __init__(self, channel: Channel, seq: int, held: list, msg: bytes | None = None,
                 retries: int = 0) -> None:
        self.channel = channel
        self.seq = seq
        self.held: list | None = held       # refs in the request, kept until the actor has read it
        self.kind = 0
        self.value: Any = None
        self.msg = msg              # the request, kept while it may be sent again (retries != 0)
        self.retries = retries      # -1: unlimited
        self.extra: list | None = None   # its DEP requests, sent again after it on a retry

    @property
    def id(self) -> str:
        """The call's name in errors (made only when one needs it: not per call)."""
        return f"{self.channel.actor_id}.call{self.seq}"

    def done(self) -> bool:
        return self.kind != 0

    def settle(self, kind: int, value: Any) -> None:
        self.kind, self.value, self.held, self.msg, self.extra = kind, value, None, None, None

    def _wait(self, timeout: float | None) -> None:
        self.channel.pump_until(self, timeout)

    @staticmethod
    def wait_any(pendings: list[PendingCall], timeout: float | None) -> None:
        """Block until at least one of ``pendings`` settles, or ``timeout``.

        Reads only sockets whose read lock it holds: a socket another thread is reading may
        have had our reply taken off it already, and a select on it would never wake. Those
        channels are re-checked every few milliseconds instead."""
        channels = {p.channel for p in pendings}
        for ch in channels:
            if ch.pump_nowait():
                return
        starting = [ch for ch in channels if ch.connecting]
        live = [ch for ch in channels if ch.conn is not None and not ch.conn.closed]
        if not live and not starting:
            for ch in channels:
                ch.pump_nowait(force_read=True)     # settles calls of channels that died
            return
        owned = [ch for ch in live if ch.read_lock.acquire(blocking=False)]
        try:
            if any(p.done() for p in pendings):
                return
            if len(owned) < len(live) or starting:
                timeout = RECHECK_S if timeout is None else min(timeout, RECHECK_S)
            if not owned:
                if starting:
                    starting[0].wait_connected(timeout)
                else:
                    time.sleep(RECHECK_S if timeout is None else timeout)
                return
            try:
                ready = _spin_select(owned, SPIN_S)
                if not ready:
                    ready, _, _ = select.select(owned, [], [], timeout)
            except (OSError, ValueError):
                ready = owned
            for ch in ready:
                ch._read(0.0)
        finally:
            for ch in owned:
                ch.read_lock.release()


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs (not gone, not a zombie); True when unknown (None)."""
    if not pid:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _orphaned(status: ActorStatus) -> bool:
    """Whether the actor is gone with its owner (the process whose supervisor started it and
    would write its status): a detached actor outlives its owner, so then its own process counts."""
    if _alive(status.owner):
        return False
    return not status.detached or not _alive(status.pid)


def _spin_select(conns: list, seconds: float) -> list:
    """The connections readable now, polling up to ``seconds`` without sleeping (see
    Connection.read_spinning for why)."""
    deadline = time.perf_counter() + seconds
    while True:
        ready = select.select(conns, [], [], 0)[0]
        if ready or time.perf_counter() >= deadline:
            return ready
        os.sched_yield()


class Channel:
    """This process's connection to one actor, and the calls on it that wait for replies.

    It owns the socket (opened on the first call, again after a restart), the pending calls
    by sequence number, the backlog of calls made while the actor starts and the outbox of
    bytes its socket had no room for. The backend's ``Runtime.channel`` makes one per actor;
    ``PendingCall`` (a ``get`` or ``wait``) reads its replies on the waiting thread. Its
    status reads (``Job.read_status``) decide between reconnecting, waiting for a restart and
    ``ActorDiedError``. See docs/design.md, "Calls before an actor is up", "Poll before
    sleeping, yielding the core", "wait() only selects on sockets it reads" and "Retried calls
    are re-sent by the caller, not replayed by the supervisor".
    """

    def __init__(self, job: Job, actor_id: str, name: str, max_task_retries: int = 0) -> None:
        self.job = job
        self.actor_id = actor_id
        self.name = name
        # > 0: a call pending when the actor dies is sent again to its next incarnation (at
        # most this many times), and calls made while it restarts wait for it (Ray's rule).
        self.max_task_retries = max_task_retries
        self.conn: Connection | None = None
        self.incarnation = -1
        self.seq = 0
        self.read_upto = 0          # highest reply seq read (acknowledged with the next request)
        self.pendings: dict[int, PendingCall] = {}
        self.send_lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.dead: ActorDiedError | None = None
        self.ack_due = False
        self.connecting = False
        self.connected = threading.Event()
        self.backlog: list[bytes] = []          # calls made while the actor's process starts
        # Bytes of requests the socket had no room for (the actor is busy, stopped or slow),
        # in order; a writer thread delivers them, so that ``.remote()`` never waits for the actor.
        self.outbox: deque[memoryview] = deque()

    def fileno(self) -> int:
        """The socket's fd, for ``select`` over channels (ValueError when not connected)."""
        if self.conn is None:
            raise ValueError(f"the channel to {self.name} is not connected")
        return self.conn.fileno()

    # -- sending --------------------------------------------------------------------------

    def call(self, method: str, body: bytes, held: list, kind: int = protocol.CALL) -> ObjectRef:
        """Send a call and return its pending ref at once. While the actor's process is still
        starting, the call waits in a backlog that the connecting thread flushes. To a dead
        actor: a ref whose get raises ActorDiedError (Ray's rule: ``.remote()`` does not raise)."""
        if len(body) > MAX_MESSAGE - protocol.REQ.size - len(method):
            raise ValueError(f"the arguments of {self.name}.{method}() pickle to {len(body)} bytes, more than a "
                             f"message holds ({MAX_MESSAGE}); pass big data as tensors (they travel through the "
                             f"store) or split it")
        with self.send_lock:
            if self.dead is not None or (self.conn is None and not self.connecting) or (
                    self.conn is not None and self.conn.closed):
                try:
                    self._start_connect()
                except ActorDiedError as death:
                    return failed_ref(death, f"{self.name}.{method or 'call'}")
            self.seq += 1
            msg = protocol.request(kind, self.seq, self.read_upto, method, body)
            retries = self.max_task_retries if kind == protocol.CALL else 0
            pending = PendingCall(self, self.seq, held, msg if retries else None, retries)
            self.pendings[self.seq] = pending
            if self.conn is None:
                self.backlog.append(msg)
            else:
                self._send(msg)
        return ObjectRef.pending(pending)

    def call_with_deps(self, method: str, body: bytes, held: list, deps: list) -> ObjectRef:
        """Send a call whose top-level arguments include refs of unfinished calls (``Dep``
        placeholders in ``body``) at once; a thread of its own waits for each of ``deps`` and
        sends its value, or its error, after the call. The actor runs it once all arrived."""
        ref = self.call(method, body, held, kind=protocol.CALL_DEPS)
        threading.Thread(target=self._send_deps, args=(ref._pending, deps), daemon=True,
                         name=f"torchactors-deps-{self.name}").start()
        return ref

    def _send_deps(self, pending: PendingCall, deps: list) -> None:
        for index, dep in enumerate(deps):
            try:
                ok, value = True, dep._pending.materialize()
            except BaseException as e:
                ok, value = False, e
            with SerializationContext() as ctx:
                try:
                    body = pickle.dumps((ok, value), pickle.HIGHEST_PROTOCOL)
                except Exception as e:      # an error that does not pickle: say what it was
                    ok = False
                    body = pickle.dumps((False, ActorError(type(value).__qualname__, str(value), repr(e))))
            with self.send_lock:
                if pending.held is None:        # settled meanwhile (settle drops the holds)
                    return
                pending.held.extend(ctx.refs)
                msg = protocol.request(protocol.DEP, pending.seq, self.read_upto, str(index), body)
                if pending.retries:
                    pending.extra = (pending.extra or []) + [msg]
                if self.conn is None:
                    self.backlog.append(msg)
                else:
                    self._send(msg)
            if not ok:
                return      # the actor fails the call with this error; later deps do not matter

    def _send(self, msg: bytes) -> None:
        """Under send_lock: send ``msg`` as far as the socket has room now, never waiting for
        the actor; what does not fit joins the outbox, in order, and a writer thread (one
        while the outbox is not empty) delivers it."""
        self.ack_due = False
        conn = self.conn
        assert conn is not None, "sent only on a connection"
        if self.outbox:
            self.outbox.extend(conn.frame(msg))
        else:
            try:
                rest = conn.send_some(msg)
            except OSError:
                return      # the read side sees the EOF and fails the call with the death details
            if rest:
                self.outbox.extend(rest)
                threading.Thread(target=self._write_out, args=(conn,), daemon=True,
                                 name=f"torchactors-writer-{self.name}").start()
        if self.ack_due:
            self._send_ack()

    def _write_out(self, conn: Connection) -> None:
        """The writer thread: deliver the outbox as the actor makes room, reading its replies
        meanwhile (an actor blocked writing to us would never read); ends once it is empty or
        the connection is gone."""
        while True:
            with self.send_lock:
                if self.conn is not conn or conn.closed:
                    if self.conn is conn:
                        self.outbox.clear()
                    return
                try:
                    conn.send_nowait(self.outbox)
                except OSError:
                    self.outbox.clear()
                if not self.outbox:
                    if self.ack_due:
                        self._send_ack()
                    return
            self._drain()
            try:
                select.select([], [conn], [], WRITER_POLL_S)
            except (OSError, ValueError):
                pass

    def _drain(self) -> None:
        """While requests wait for room: read the actor's replies, which are what fill it."""
        if self.read_lock.acquire(blocking=False):
            try:
                self._read(0.0)
            finally:
                self.read_lock.release()

    def _send_ack(self) -> None:
        """Acknowledge the replies read so far, without ever blocking: the reader may hold the
        read lock, and an actor blocked writing replies to us would never read a blocked ACK.
        If the socket is full (or requests wait in the outbox: an ACK must not cut into one),
        the ACK rides on the next request instead."""
        if self.conn is not None and not self.conn.closed and not self.outbox:
            try:
                if self.conn.try_send(protocol.request(protocol.ACK, 0, self.read_upto)):
                    self.ack_due = False
            except OSError:
                pass

    # -- connecting -----------------------------------------------------------------------

    def _start_connect(self) -> None:
        """Under send_lock: begin connecting to the actor's current process, or raise
        ActorDiedError if it is down (dead; or waiting to be restarted, unless calls are retried:
        then connect to its next incarnation once it is up)."""
        status = self.job.read_status(self.actor_id) or ActorStatus()
        incarnation = status.incarnation
        state = status.state
        down = state == "restarting" or (self.dead is not None and incarnation <= self.incarnation)
        if state == "dead" or (down and not self.max_task_retries) or _orphaned(status):
            self.incarnation = max(self.incarnation, incarnation)
            raise self._death(status)
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.outbox.clear()         # bytes for the old connection; retried calls are sent again whole
        self.dead = None
        self.connecting = True
        self.connected = threading.Event()
        first = max(incarnation, self.incarnation + 1) if down else incarnation
        threading.Thread(target=self._connect, args=(first, down, self.connected), daemon=True,
                         name=f"torchactors-connect-{self.name}").start()

    def _connect(self, incarnation: int, restart: bool, done: threading.Event) -> None:
        try:
            conn, incarnation = self._open(incarnation, restart)
        except ActorDiedError as death:
            with self.send_lock:
                self.connecting = False
                self.dead = death
                self.incarnation = max(self.incarnation, incarnation)
                self.backlog.clear()
            with self.read_lock:
                self._fail_all()
            done.set()
            return
        with self.send_lock:
            self.conn = conn
            self.incarnation = incarnation
            backlog, self.backlog = self.backlog, []
            for msg in backlog:
                self._send(msg)
            self.connecting = False
        done.set()
        logger.debug("connected to %s incarnation %d", self.name, incarnation)

    def _open(self, incarnation: int, restart: bool) -> tuple[Connection, int]:
        """Connect to ``incarnation`` of the actor; with ``restart``, to the first one from
        ``incarnation`` on that comes up (waiting through restarts). Returns the connection
        and the incarnation it reached."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            status = self.job.read_status(self.actor_id) or ActorStatus()
            state, current = status.state, status.incarnation
            if state == "dead" or (not restart and (state == "restarting" or current != incarnation)) or (
                    _orphaned(status)):
                raise self._death(status)
            path = self.job.socket_path(self.actor_id, current)
            if current >= incarnation and state != "restarting" and os.path.exists(path):
                try:
                    # No timeout: the actor answers once its constructor has returned, and a
                    # death during the handshake shows up as a reset, checked next round.
                    return connect(path, self.job.secret, timeout=None), current
                except (OSError, AuthenticationError):
                    pass
            if time.monotonic() > deadline:
                raise ActorDiedError(self.name, detail=f"it did not start listening within {CONNECT_TIMEOUT:.0f}s")
            time.sleep(0.005)

    def wait_connected(self, timeout: float | None) -> None:
        if self.connecting:
            self.connected.wait(timeout)

    def _death(self, status: ActorStatus) -> ActorDiedError:
        """The error for the actor's death as ``status`` tells it: why (constructor error,
        kill, exit_actor, dropped handles, its owner's death) and whether a restart comes."""
        error = self.job.read_error(self.actor_id)
        detail = f"its constructor raised:\n{error}" if error else ""
        state, owner = status.state, status.owner
        reason = self.job.killed_reason(self.actor_id) or (
            "it was stopped when its owner shut down" if status.killed else "")
        if not reason and state != "dead" and _orphaned(status):
            reason = (f"it died after its owner (pid {owner}, the process that created it), so nobody restarts it"
                      if status.detached else
                      f"its owner (pid {owner}, the process that created it) died, and an actor dies with its owner")
        if reason:
            detail = reason + (f"; {detail}" if detail else "")
        # A newer incarnation than the one we talked to is up or coming: the actor was restarted.
        restarted = state in ("alive", "starting") and status.incarnation > self.incarnation
        restarting = not reason and (state == "restarting" or restarted)
        if restarting and restarted:
            detail = f"it is up again as incarnation {status.incarnation}" + (f"; {detail}" if detail else "")
        return ActorDiedError(self.name, status.exit_code, status.signal,
                              0 if reason else status.restarts_left, detail,
                              restarting=restarting, actor_id=self.actor_id, final=bool(reason))

    # -- receiving ------------------------------------------------------------------------

    def pump_until(self, pending: PendingCall, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not pending.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise GetTimeoutError(f"get timed out after {timeout}s waiting for {self.name} "
                                      f"(call {pending.id}); the call is still running", timeout)
            if self.connecting:
                self.wait_connected(left)
                continue
            if self.read_lock.acquire(timeout=-1 if left is None else left):
                try:
                    if pending.done():
                        return
                    self._read(left)
                finally:
                    self.read_lock.release()

    def pump_nowait(self, force_read: bool = False) -> bool:
        """Hand out replies already buffered (or readable now); True if any call settled."""
        if not self.read_lock.acquire(blocking=False):
            return False
        try:
            return self._read(0.0 if force_read else None, only_buffered=not force_read) > 0
        finally:
            self.read_lock.release()

    def _read(self, timeout: float | None, only_buffered: bool = False) -> int:
        conn = self.conn
        if conn is None and self.connecting:
            return 0
        if conn is None or conn.closed:
            n = len(self.pendings)
            self._fail_all()
            return n
        messages = conn.buffered()
        if not messages and not only_buffered:
            try:
                if timeout is None or timeout > 0:
                    messages = conn.read_spinning(SPIN_S)
                if not messages:
                    if timeout is not None and not select.select([conn], [], [], timeout)[0]:
                        return 0
                    messages = conn.read_available()
            except (ConnectionClosed, ProtocolError):   # a broken actor is as good as a dead one
                n = len(self.pendings)
                self._fail_all()
                return n
        for msg in messages:
            self._settle(msg)
        return len(messages)

    def _settle(self, msg: bytes) -> None:
        kind, seq, holds, value = decode_reply(msg)
        pending = self.pendings.pop(seq, None)
        self.read_upto = max(self.read_upto, seq)
        if holds:
            # The actor may now drop its hold on the result. If a send is under way (we are
            # draining inside it), the sender acknowledges when its message is out.
            self.ack_due = True
            if self.send_lock.acquire(blocking=False):
                try:
                    if self.ack_due:
                        self._send_ack()
                finally:
                    self.send_lock.release()
        if pending is not None:
            pending.settle(kind, value)

    def _fail_all(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.close()
        if self.dead is None:
            deadline = time.monotonic() + DEATH_DETAIL_WAIT
            status = self.job.read_status(self.actor_id) or ActorStatus()
            while (status.state == "alive" and status.incarnation == self.incarnation
                   and time.monotonic() < deadline and not _orphaned(status)):
                time.sleep(0.01)
                status = self.job.read_status(self.actor_id) or ActorStatus()
            self.dead = self._death(status)
        pendings, self.pendings = self.pendings, {}
        # A restart is coming if the supervisor says so, or has not said anything yet.
        restart = self.dead.restarting or self.dead.restarts_left != 0
        again = []
        for p in pendings.values():
            if restart and p.retries != 0:
                again.append(p)
            else:
                p.settle(protocol.ERROR, self.dead)
        if again:
            self._retry(sorted(again, key=lambda p: p.seq))

    def _retry(self, calls: list[PendingCall]) -> None:
        """Send ``calls`` again, first, to the actor's next incarnation (under read_lock; a
        sender never waits for read_lock while it holds send_lock, so taking it here is safe)."""
        logger.warning("%s; retrying %d pending call(s) on its next incarnation", self.dead, len(calls))
        with self.send_lock:
            for p in calls:
                p.retries -= p.retries > 0      # -1: unlimited
                self.pendings[p.seq] = p
            msgs = [m for p in calls for m in (p.msg, *(p.extra or ()))]
            if not self.connecting and self.conn is not None and not self.conn.closed:
                for m in msgs:          # a new call reconnected meanwhile
                    self._send(m)
                return
            self.backlog[:0] = msgs
            if self.connecting:
                return
            try:
                self._start_connect()
            except ActorDiedError as death:
                self.backlog.clear()
                for p in calls:
                    del self.pendings[p.seq]
                    p.settle(protocol.ERROR, death)

    def close(self) -> None:
        with self.send_lock:
            if self.conn is not None:
                self.conn.close()
