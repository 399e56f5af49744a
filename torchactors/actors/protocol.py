"""The call protocol between a caller and an actor: fixed binary headers, pickled bodies.

Requests:  ``<B kind><Q seq><Q ack><H len(method)>method`` + args pickle (MessagePickler).
Replies:   ``<B kind><Q seq><B holds>`` + body pickle.

``ack`` tells the actor which replies the caller has read: the actor keeps holding the refs it
sent in a reply until then, so an object is never reclaimed while its ref is in flight.
"""

from __future__ import annotations

import pickle
import struct

REQ = struct.Struct("<BQQH")
REP = struct.Struct("<BQB")

CALL, ACK, KILL, PING = 1, 2, 3, 4             # request kinds
# A call whose top-level arguments include refs of unfinished calls: its body holds ``Dep``
# placeholders; one DEP request per placeholder follows (seq = the call's, method = the
# placeholder's index) with ``(ok, ref or error)``. STOP: exit once this caller's calls ran.
CALL_DEPS, DEP, STOP = 5, 6, 7
OK_VALUE, OK_REF, ERROR = 1, 2, 3               # reply kinds

# Results of these types travel inside the reply; anything else is put into the actor's store.
INLINE_TYPES = (type(None), bool, int, float, str, bytes, complex)


def request(kind: int, seq: int, ack: int, method: str = "", body: bytes = b"") -> bytes:
    name = method.encode()
    return REQ.pack(kind, seq, ack, len(name)) + name + body


def parse_request(msg: bytes) -> tuple[int, int, int, str, memoryview]:
    kind, seq, ack, n = REQ.unpack_from(msg)
    start = REQ.size
    return kind, seq, ack, msg[start:start + n].decode(), memoryview(msg)[start + n:]


def reply(kind: int, seq: int, holds: bool, body: bytes) -> bytes:
    return REP.pack(kind, seq, holds) + body


def parse_reply(msg: bytes) -> tuple[int, int, bool, memoryview]:
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
