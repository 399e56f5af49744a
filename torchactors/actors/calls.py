"""The call codec: a call's arguments and its result as bytes and back, for every backend.

Box in the data flow: caller ``encode_args`` -> request -> actor ``decode_args`` /
``fill_deps`` / ``resolve_top_level`` -> ``run_method`` -> ``encode_result`` (or
``error_reply``) -> reply -> caller ``decode_reply``. The local backend's channel and actor
server and the Ray backend's host all call these, so a call means the same on both: tensors
travel as refs into the sender's store, top-level refs arrive as values (Ray's rule), small
plain results travel inline, an exception comes back as ``ActorError`` with its traceback.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import pickle
import threading
import traceback
from collections.abc import Callable
from typing import Any

from torchactors.actors import _current, protocol
from torchactors.errors import ActorDiedError, ActorError, StoreFullError
from torchactors.runtime.transport import ProtocolError
from torchactors.store import core as store_core
from torchactors.store import serialize
from torchactors.store.refs import ObjectRef, SerializationContext

NONE = pickle.dumps(None, pickle.HIGHEST_PROTOCOL)      # the body of a None result
READY = pickle.dumps(True, pickle.HIGHEST_PROTOCOL)     # what ``__ray_ready__`` resolves to (Ray's)
# What pickle.loads raises for bytes that are not a pickle at all (a broken sender), as
# opposed to a whole pickle whose class cannot be imported here (the caller's error).
_NOT_A_PICKLE = (pickle.UnpicklingError, EOFError)

logger = logging.getLogger(__name__)


# -- the caller's side: arguments ------------------------------------------------------------

class DependencyFailed(Exception):
    """A top-level argument is the ref of a call that failed: the call is not sent, and its
    ref raises ``error`` (Ray's rule)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _defer_pending(args: tuple, kwargs: dict, deps: list) -> tuple[tuple, dict]:
    """Top-level refs of unfinished calls replaced by ``Dep`` placeholders (appended to ``deps``);
    refs of finished calls stay (their value is in a store). A failed one raises DependencyFailed."""
    def swap(a: Any) -> Any:
        if type(a) is not ObjectRef or a._pending is None:
            return a
        if a._pending.done():
            if a._pending.kind == protocol.ERROR:
                raise DependencyFailed(a._pending.value)
            return a
        deps.append(a)
        return protocol.Dep(len(deps) - 1)

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def encode_args(args: tuple, kwargs: dict, put: Callable[[Any], ObjectRef],
                deps: list | None = None) -> tuple[bytes, list]:
    """Pickle call arguments: tensors at any depth are put into the store and travel as
    refs. Returns the body and the refs it carries (the caller holds them until the actor
    has read the call). An argument that cannot be pickled is named in the error. With
    ``deps``, top-level refs of unfinished calls are not waited for: see _defer_pending."""
    if not args and not kwargs:
        return protocol.EMPTY_ARGS, []
    if all(type(a) in protocol.INLINE_TYPES for a in args) and all(
            type(v) in protocol.INLINE_TYPES for v in kwargs.values()):
        return pickle.dumps((args, kwargs), pickle.HIGHEST_PROTOCOL), []
    if deps is not None:
        args, kwargs = _defer_pending(args, kwargs, deps)
    with SerializationContext() as ctx:
        try:
            body = serialize.dumps_message((args, kwargs), put)
        except StoreFullError:
            raise                           # the store is full, not the argument bad
        except (ActorError, ActorDiedError) as e:      # a nested ref of a call that failed
            raise DependencyFailed(e) from None
        except Exception as e:
            raise _name_bad_argument(args, kwargs, put, e) from e
    return body, ctx.refs


def _name_bad_argument(args: tuple, kwargs: dict, put: Callable, error: Exception) -> TypeError:
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"keyword argument {k!r}", v)
                                                               for k, v in kwargs.items()]
    for label, value in named:
        try:
            with SerializationContext():
                serialize.dumps_message(value, put)
        except Exception as e:
            return TypeError(f"{label} ({type(value).__name__}) cannot be sent to an actor: {e}. "
                             f"Arguments must be picklable (tensors, refs, handles and picklable objects)")
    return TypeError(f"the arguments cannot be sent to an actor: {error}")


# -- the actor's side: arguments, the run, the result ----------------------------------------

def decode_args(body: bytes | memoryview) -> tuple[tuple, dict]:
    """A call's ``(args, kwargs)``; ProtocolError for bytes that are no such pickle. Other
    errors (a class that cannot be imported here, a ``__setstate__`` that raises) come from a
    well-formed request and are the caller's, answered with an error reply."""
    if body == protocol.EMPTY_ARGS:
        return (), {}
    try:
        obj = pickle.loads(body)
    except _NOT_A_PICKLE as e:
        raise ProtocolError(f"the arguments are not a pickle: {type(e).__name__}: {e}") from None
    if not (type(obj) is tuple and len(obj) == 2 and type(obj[0]) is tuple and type(obj[1]) is dict):
        raise ProtocolError(f"the arguments are a pickle of {type(obj).__name__}, not an (args, kwargs) pair")
    return obj


def fill_deps(args: tuple, kwargs: dict, values: Any) -> tuple[tuple, dict]:
    """The arguments with each ``Dep`` placeholder replaced by ``values[its index]``."""
    return (tuple(values[a.index] if type(a) is protocol.Dep else a for a in args),
            {k: values[v.index] if type(v) is protocol.Dep else v for k, v in kwargs.items()})


def resolve_top_level(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Ray's rule: refs passed as top-level arguments arrive as their values; nested refs stay refs."""
    if not any(isinstance(a, ObjectRef) for a in args) and not any(
            isinstance(v, ObjectRef) for v in kwargs.values()):
        return args, kwargs
    st = store_core.current()
    args = tuple(st.get(a) if isinstance(a, ObjectRef) else a for a in args)
    kwargs = {k: st.get(v) if isinstance(v, ObjectRef) else v for k, v in kwargs.items()}
    return args, kwargs


# The keyword argument that carries a call's own retry policy (``h.m.options(max_task_retries=n,
# retry_exceptions=...)``) to the actor, where run_method takes it out before the method runs.
RETRY_KWARG = "__torchactors_retry__"


def _policy(fn: Callable, kwargs: dict) -> Any:
    """The call's retry policy: its own (``h.m.options``), else its method's (``@ta.method``)."""
    if kwargs and RETRY_KWARG in kwargs:
        return kwargs.pop(RETRY_KWARG)
    return getattr(fn, "__torchactors_retry__", None)


def _retry(fn: Callable, policy: Any, error: BaseException, attempt: int) -> bool:
    """Whether ``fn`` runs again after raising ``error`` in run ``attempt`` (0: the first), as
    ``policy`` ``(retries, True or exception types)`` says (Ray's application-level retries;
    ``ta.exit_actor()`` and other non-``Exception`` errors are never retried)."""
    if policy is None or not isinstance(error, Exception):
        return False
    retries, exceptions = policy
    if retries != -1 and attempt >= retries:
        return False
    if exceptions is not True and not isinstance(error, exceptions):
        return False
    logger.info("%s raised %r; retrying it (retry %d of %s)", getattr(fn, "__qualname__", fn), error,
                attempt + 1, "unlimited" if retries == -1 else retries)
    return True


def run_method(fn: Callable, call: list) -> tuple[bool, Any]:
    """``(True, fn(*args, **kwargs))`` or ``(False, the exception)``, for ``call`` =
    ``[args, kwargs]``, which is emptied first: once the method returns, nothing holds the
    arguments, so the caller's next put may reuse their memory as soon as it has the reply.
    A method declared with ``retry_exceptions`` runs again while it raises one of them."""
    args, kwargs = call
    call.clear()
    policy = _policy(fn, kwargs)
    for attempt in itertools.count():
        try:
            return True, fn(*args, **kwargs)
        except BaseException as e:      # ExitActor too: the server decides what it means
            if not _retry(fn, policy, e, attempt):
                return False, e
    raise AssertionError("unreachable")


async def run_coroutine(fn: Callable, call: list) -> tuple[bool, Any]:
    """``run_method`` for an async actor: a coroutine's result is awaited (a sync method
    runs as it is, on the event loop, as in Ray)."""
    args, kwargs = call
    call.clear()
    policy = _policy(fn, kwargs)
    for attempt in itertools.count():
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return True, result
        except BaseException as e:      # ExitActor and CancelledError too: never out of the task
            if not _retry(fn, policy, e, attempt):
                return False, e
    raise AssertionError("unreachable")


def start_event_loop(on_exit: Callable[[SystemExit], None] | None = None) -> asyncio.AbstractEventLoop:
    """An event loop running on a thread of its own, for an actor's ``async def`` methods.
    ``on_exit``: what a SystemExit out of the loop means (``ta.exit_actor()`` in an asyncio
    task a method created: asyncio lets it escape the loop, which would end only the thread)."""
    loop = asyncio.new_event_loop()

    def run() -> None:
        try:
            loop.run_forever()
        except SystemExit as e:
            if on_exit is None:
                raise
            on_exit(e)

    threading.Thread(target=run, name="actor-asyncio", daemon=True).start()
    return loop


def encode_result(result: Any) -> tuple[int, bytes, list | None]:
    """A method's result as a reply: small plain values inline; anything else put into this
    process's store and sent as a ref, with the refs the sender must hold until the caller
    acknowledges the reply."""
    if result is None:
        return protocol.OK_VALUE, NONE, None
    if type(result) in protocol.INLINE_TYPES and not (
            isinstance(result, (str, bytes)) and len(result) > protocol.INLINE_MAX):
        return protocol.OK_VALUE, pickle.dumps(result, pickle.HIGHEST_PROTOCOL), None
    ref = store_core.current().put(result)
    with SerializationContext() as ctx:
        body = pickle.dumps(ref, pickle.HIGHEST_PROTOCOL)
    return protocol.OK_REF, body, ctx.refs


def remote_error(exc: BaseException, actor: str, method: str) -> ActorError:
    """What the caller's get raises for an exception in a method: type, message, traceback and
    the exception itself as its ``cause``. An ActorError the method let through (from a call
    it made) keeps the first remote exception's class, message and cause (Ray's chain rule)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, ActorError):
        return ActorError(exc.remote_type, exc.remote_message, tb, actor, method, exc.remote_module,
                          exc.__dict__.get("cause"))
    return ActorError(type(exc).__qualname__, str(exc), tb, actor, method, type(exc).__module__, exc)


def error_reply(seq: int, err: BaseException, actor: str, method: str) -> bytes:
    """The reply that fails call ``seq`` with ``err`` as it is (a method's exception goes
    through ``remote_error`` first; a failed dependency's error or an exit on purpose does
    not). An error that does not pickle is replaced by one that says why."""
    try:
        body = pickle.dumps(err, pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        body = pickle.dumps(remote_error(e, actor, method), pickle.HIGHEST_PROTOCOL)
    return protocol.reply(protocol.ERROR, seq, False, body)


# -- the caller's side: the reply ------------------------------------------------------------

def decode_reply(msg: bytes | memoryview) -> tuple[int, int, bool, Any]:
    """``(kind, seq, holds, value)`` of a reply; a result that cannot be unpickled here (its
    class is not importable, say) becomes an ERROR carrying that exception."""
    kind, seq, holds, body = protocol.parse_reply(msg)
    try:
        value = pickle.loads(body)
    except BaseException as e:
        kind, value = protocol.ERROR, e
    return kind, seq, holds, value


# -- ta.exit_actor() -------------------------------------------------------------------------

# Set by ``ta.exit_actor()`` in the call (thread or asyncio task) that called it: other calls
# of a threaded actor still running do not see it, and deliver their results first.
exit_requested: contextvars.ContextVar[bool] = contextvars.ContextVar("exit_requested", default=False)


class ExitActor(SystemExit):
    """Raised by ``ta.exit_actor()``: unwinds the method (``except Exception`` does not catch
    it); the actor then ends."""


def exit_actor() -> None:
    if not _current.in_actor:
        raise TypeError("ta.exit_actor() was called outside an actor; call it inside an actor's method")
    exit_requested.set(True)        # the actor ends after this call even if the method catches it
    raise ExitActor(0)


def exit_reason(method: str, exc: BaseException | None = None) -> str:
    """Why an actor that ran ``ta.exit_actor()`` in ``method`` is gone (its callers' error says
    it); ``exc``: the SystemExit that ended it, if not ``ta.exit_actor()``'s (``sys.exit()``)."""
    if exc is None or isinstance(exc, ExitActor):
        return f"it exited on purpose: ta.exit_actor() was called in its method {method}()"
    code = exc.code if isinstance(exc, SystemExit) else None
    return f"it exited on purpose: its method {method}() raised SystemExit({code!r}) (exit() or sys.exit())"


def exited(actor: str, actor_id: str, method: str, reason: str | None = None) -> ActorDiedError:
    """The error of the call that ran ``ta.exit_actor()`` (or ``reason``: another exit on
    purpose) and of the calls queued behind it."""
    return ActorDiedError(actor, exit_code=0, detail=reason or exit_reason(method), final=True, actor_id=actor_id)
