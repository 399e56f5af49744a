"""The call protocol between a caller and an actor: fixed binary headers, pickled bodies.

Requests:  ``<B kind><Q seq><Q ack><H len(method)>method`` + args pickle (MessagePickler).
Replies:   ``<B kind><Q seq><B holds>`` + body pickle.

``ack`` tells the actor which replies the caller has read: the actor keeps holding the refs it
sent in a reply until then, so an object is never reclaimed while its ref is in flight.
"""

from __future__ import annotations

import pickle
import struct

from torchactors.runtime.transport import ProtocolError

REQ = struct.Struct("<BQQH")
REP = struct.Struct("<BQB")

CALL, ACK, KILL, PING = 1, 2, 3, 4             # request kinds
# A call whose top-level arguments include refs of unfinished calls: its body holds ``Dep``
# placeholders; one DEP request per placeholder follows (seq = the call's, method = the
# placeholder's index) with ``(ok, ref or error)``. STOP: exit once this caller's calls ran.
CALL_DEPS, DEP, STOP = 5, 6, 7
REQUEST_KINDS = frozenset((CALL, ACK, KILL, PING, CALL_DEPS, DEP, STOP))
OK_VALUE, OK_REF, ERROR = 1, 2, 3               # reply kinds

# Results of these types travel inside the reply; anything else is put into the actor's store.
INLINE_TYPES = (type(None), bool, int, float, str, bytes, complex)
INLINE_MAX = 1 << 20        # a str or bytes result longer than this goes through the store too


def request(kind: int, seq: int, ack: int, method: str = "", body: bytes = b"") -> bytes:
    name = method.encode()
    return REQ.pack(kind, seq, ack, len(name)) + name + body


def parse_request(msg: bytes) -> tuple[int, int, int, str, memoryview]:
    """The fields of a request; ProtocolError if ``msg`` is not one (the sender is broken)."""
    if len(msg) < REQ.size:
        raise ProtocolError(f"a request of {len(msg)} bytes is shorter than its {REQ.size}-byte header")
    kind, seq, ack, n = REQ.unpack_from(msg)
    if kind not in REQUEST_KINDS:
        raise ProtocolError(f"unknown request kind {kind}")
    start = REQ.size
    if len(msg) < start + n:
        raise ProtocolError(f"the method name ({n} bytes) runs past the end of a {len(msg)}-byte request")
    try:
        method = msg[start:start + n].decode()
    except UnicodeDecodeError:
        raise ProtocolError("the method name is not UTF-8") from None
    return kind, seq, ack, method, memoryview(msg)[start + n:]


def reply(kind: int, seq: int, holds: bool, body: bytes) -> bytes:
    return REP.pack(kind, seq, holds) + body


def parse_reply(msg: bytes | memoryview) -> tuple[int, int, bool, memoryview]:
    kind, seq, holds = REP.unpack_from(msg)
    return kind, seq, bool(holds), memoryview(msg)[REP.size:]



class Dep:
    """Stands in a call's body for a top-level argument whose value is still being computed."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple:
        return (Dep, (self.index,))


EMPTY_ARGS = pickle.dumps(((), {}), pickle.HIGHEST_PROTOCOL)     # the body of a call with no arguments
