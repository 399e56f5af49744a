"""Transport: authenticated, length-prefixed messages over local Unix sockets.

Box in the data flow: caller -> socket -> actor loop -> socket -> caller. One connection per
(caller process, actor); a message is a 4-byte little-endian length and a pickle. Before
anything is unpickled, both ends prove they hold the job's secret (HMAC-SHA256 over a fresh
nonce each way), so a pickle from outside the job is never loaded.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import secrets
import socket
import struct
import time
from collections import deque

logger = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_NONCE = 32
_DIGEST = 32
AUTH_TIMEOUT = 10.0
MAX_MESSAGE = 1 << 30       # bytes a message may declare; a larger length prefix is a broken peer
_CHUNK = 256 << 10
_IOV = 64                   # pieces per sendmsg (the kernel takes up to IOV_MAX, 1024)


class ConnectionClosed(EOFError):
    """The peer closed the connection (or died)."""


class AuthenticationError(ConnectionError):
    """The peer did not prove it holds the job secret."""


class ProtocolError(ConnectionError):
    """An authenticated peer sent bytes that are not a valid message: close its connection."""


class Connection:
    """A framed message stream over a connected socket. ``recv`` buffers what it reads so
    that small messages cost one syscall."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        # One reusable receive buffer: recv(n) would allocate (and for large n, mmap) n bytes
        # on every call, which cost more than the round trip itself.
        self._chunk = bytearray(_CHUNK)
        self._view = memoryview(self._chunk)
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: bytes) -> None:
        """Send one message, blocking until the socket has taken all of it."""
        if len(payload) < 65536:
            self.sock.sendall(_LEN.pack(len(payload)) + payload)
        else:
            self.sock.sendall(_LEN.pack(len(payload)))
            self.sock.sendall(payload)

    def send_some(self, payload: bytes) -> list[memoryview]:
        """Send one message as far as the socket takes it now, without blocking; the pieces
        left to send (none if it all went). Raises OSError if the connection is broken."""
        if len(payload) < 65536:
            data = _LEN.pack(len(payload)) + payload
            try:
                n = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                n = 0
            return [] if n == len(data) else [memoryview(data)[n:]]
        parts = deque(self.frame(payload))
        self.send_nowait(parts)
        return list(parts)

    @staticmethod
    def frame(payload: bytes) -> list[memoryview]:
        """One message as the pieces ``send_nowait`` takes: its length prefix and its bytes."""
        return [memoryview(_LEN.pack(len(payload))), memoryview(payload)]

    def send_nowait(self, parts: deque[memoryview]) -> None:
        """Send as much of ``parts`` (framed messages, in order) as the socket takes now,
        without blocking; what is sent is removed from ``parts``, a piece sent in part is
        replaced by its tail. Raises OSError if the connection is broken."""
        sendmsg = self.sock.sendmsg
        while parts:
            try:
                n = sendmsg(list(itertools.islice(parts, _IOV)), (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            while n:
                head = parts[0]
                if n >= len(head):
                    n -= len(head)
                    parts.popleft()
                else:
                    parts[0] = head[n:]
                    n = 0

    def read_available(self) -> list[bytes]:
        """One ``recv`` of what the socket has, then every whole message buffered so far.
        Call when the socket is readable. Raises ConnectionClosed on EOF."""
        try:
            n = self.sock.recv_into(self._chunk)
        except BlockingIOError:
            return self.buffered()
        except OSError as e:
            raise ConnectionClosed(str(e)) from None
        if n == 0:
            raise ConnectionClosed("peer closed the connection")
        self._buf += self._view[:n]
        return self.buffered()

    def try_send(self, payload: bytes) -> bool:
        """Send a small message only if the socket has room now (all or nothing: a message
        this small is one chunk for a Unix stream socket). Never blocks."""
        try:
            self.sock.send(_LEN.pack(len(payload)) + payload, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        return True

    def read_spinning(self, seconds: float) -> list[bytes]:
        """Poll the socket without blocking for up to ``seconds``; the whole messages read.
        A reply that arrives while we spin costs no sleep and wake-up of this process, which
        on a virtual machine costs more than the round trip itself."""
        deadline = time.perf_counter() + seconds
        while True:
            try:
                n = self.sock.recv_into(self._chunk, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() < deadline:
                    os.sched_yield()    # spin only while nobody else wants this core
                    continue
                return []
            except OSError as e:
                raise ConnectionClosed(str(e)) from None
            if n == 0:
                raise ConnectionClosed("peer closed the connection")
            self._buf += self._view[:n]
            messages = self.buffered()
            if messages:
                return messages

    def buffered(self) -> list[bytes]:
        """Every whole message already buffered, without a syscall."""
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            n = _LEN.unpack_from(buf, pos)[0]
            if n > MAX_MESSAGE:
                raise ProtocolError(f"the peer declared a message of {n} bytes (at most {MAX_MESSAGE})")
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AuthenticationError("peer closed the connection during authentication")
        data += chunk
    return data


def _mac(secret: bytes, nonce: bytes, role: bytes) -> bytes:
    return hmac.new(secret, role + nonce, "sha256").digest()


def connect(path: str, secret: bytes, timeout: float | None = AUTH_TIMEOUT) -> Connection:
    """Connect to a listener at ``path`` and authenticate both ways (``timeout=None``: wait
    as long as the listener takes to accept)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        server_nonce = _recv_exact(sock, _NONCE)
        my_nonce = secrets.token_bytes(_NONCE)
        sock.sendall(_mac(secret, server_nonce, b"client") + my_nonce)
        if not hmac.compare_digest(_recv_exact(sock, _DIGEST), _mac(secret, my_nonce, b"server")):
            raise AuthenticationError(f"the listener at {path} does not hold this job's secret")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return Connection(sock)


class Handshake:
    """An accepted peer proving it holds the job secret, advanced by the listener's event loop
    without blocking it: a peer that goes silent mid-handshake stalls nobody else."""

    def __init__(self, sock: socket.socket, secret: bytes, path: str) -> None:
        self.sock = sock
        self.path = path
        self.deadline = time.monotonic() + AUTH_TIMEOUT
        self._secret = secret
        self._nonce = secrets.token_bytes(_NONCE)
        self._answer = bytearray()
        sock.setblocking(False)
        sock.send(self._nonce)      # 32 bytes into a fresh socket's empty buffer: never blocks

    def fileno(self) -> int:
        return self.sock.fileno()

    def advance(self) -> Connection | None:
        """Read what the peer has sent. The authenticated Connection once its answer is whole,
        None while more is due; AuthenticationError if it fails (then ``close`` it)."""
        try:
            chunk = self.sock.recv(_DIGEST + _NONCE - len(self._answer))
            if not chunk:
                raise AuthenticationError("peer closed the connection during authentication")
            self._answer += chunk
            if len(self._answer) < _DIGEST + _NONCE:
                return None
            if not hmac.compare_digest(bytes(self._answer[:_DIGEST]), _mac(self._secret, self._nonce, b"client")):
                raise AuthenticationError("bad authentication")
            self.sock.send(_mac(self._secret, bytes(self._answer[_DIGEST:]), b"server"))  # 32 bytes: fits
        except BlockingIOError:
            return None
        except OSError as e:
            raise AuthenticationError(str(e)) from None
        self.sock.setblocking(True)
        return Connection(self.sock)

    def close(self) -> None:
        self.sock.close()


class Listener:
    """A Unix socket (mode 0600 inside the job directory) accepting authenticated peers.
    ``accept`` never blocks: the owner's event loop polls the listener and each handshake."""

    def __init__(self, path: str, secret: bytes) -> None:
        self.path = path
        self.secret = secret
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(128)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Handshake | None:
        """The next peer's handshake, started; None if no peer is waiting after all. Other
        failures of ``accept`` (EMFILE: out of fds) are the owner's to handle."""
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        try:
            return Handshake(sock, self.secret, self.path)
        except OSError as e:        # the peer left already
            logger.debug("a peer left %s before its handshake: %s", self.path, e)
            sock.close()
            return None

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
