"""Every public exception of torchactors, shared by the store, the runtime and the actors.

Each error keeps its facts as attributes (so code can react without parsing text) and
defines ``__reduce__`` so it survives pickling: an error raised in an actor process is
re-raised in the caller with the same attributes.
"""

from __future__ import annotations

import importlib
import pickle
from typing import Any

import cloudpickle


class TorchActorsError(Exception):
    """Base class of every torchactors error."""

    _fields: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.args, {f: getattr(self, f, None) for f in self._fields}))


def _rebuild_error(cls: type[TorchActorsError], args: tuple, fields: dict) -> TorchActorsError:
    try:
        err = cls.__new__(cls)
    except TypeError:               # MemoryError's __new__ refuses subclasses that mix in others
        err = Exception.__new__(cls)
    Exception.__init__(err, *args)
    for name, value in fields.items():
        setattr(err, name, value)
    return err


class ActorError(TorchActorsError):
    """An actor method raised: carries the remote type, message and formatted traceback, and
    ``cause``, the user's exception itself (Ray's ``RayTaskError.cause``) where it could be
    pickled in the actor and rebuilt here (else None).

    Rebuilt in a caller that has the remote exception's class (it imports it, or the cause
    brought it), it is also an instance of that class (``except ValueError:`` catches a remote
    ValueError) whose missing attributes are the cause's (``err.code`` of a remote exception
    with a ``code``), and its ``__cause__`` is a ``RemoteTraceback`` holding the remote
    traceback, as ``concurrent.futures`` does."""

    _fields = ("remote_type", "remote_message", "remote_traceback", "actor", "method", "remote_module")

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str,
                 actor: str = "", method: str = "", remote_module: str = "",
                 cause: BaseException | None = None) -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.actor = actor
        self.method = method
        self.remote_module = remote_module
        self.cause = cause
        where = f" in {actor}.{method}()" if actor else ""
        super().__init__(f"{remote_type}: {remote_message}{where}\n\nRemote traceback:\n{remote_traceback}")

    def __str__(self) -> str:            # never the remote class's own __str__ (its fields are not here)
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_actor_error, (self.args, {f: getattr(self, f, None) for f in self._fields},
                                       _pack_cause(self.__dict__.get("cause"))))


class RemoteTraceback(TorchActorsError):
    """The ``__cause__`` of an ActorError (never raised itself): its str is the remote traceback."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_dual_classes: dict[type, type[ActorError]] = {}


def _can_be_dual(cls: Any) -> bool:
    """Whether an ActorError may also be an instance of ``cls``: a user's exception class (a
    torchactors error keeps its own kind, see ``actors.calls.remote_error``)."""
    return isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, TorchActorsError)


def _remote_class(module: str | None, qualname: str | None) -> type | None:
    """The remote exception's class, if this process can import it (else None)."""
    if not module or not qualname or "<locals>" in qualname:
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj if _can_be_dual(obj) else None


class _ByState:
    """Pickles an exception as its class, ``args`` and ``__dict__``, rebuilt without calling its
    ``__init__``: for the many classes whose own pickling does not rebuild them (an
    ``__init__`` that takes other parameters than the ``args`` it passes on)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_by_state, (type(self.exc), self.exc.args, dict(vars(self.exc))))


def _rebuild_by_state(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


def _pack_cause(cause: BaseException | None) -> bytes | None:
    """The user's exception as bytes the caller can rebuild (by value where its class is
    defined in a function), or None where it cannot be pickled at all (say, a lock in its
    ``__dict__``): the caller still has its type, message and traceback as text. Bytes that do
    not load here would not load in the caller either, so the second way is tried then."""
    if cause is None:
        return None
    for packed in (cause, _ByState(cause)):
        try:
            data = cloudpickle.dumps(packed, pickle.HIGHEST_PROTOCOL)
            pickle.loads(data)
        except Exception:
            continue
        return data
    return None


def _unpack_cause(data: bytes | None) -> BaseException | None:
    if data is None:
        return None
    try:
        cause = pickle.loads(data)
    except Exception:               # its class is not importable here, say: the text must do
        return None
    return cause if isinstance(cause, BaseException) else None


def _cause_attribute(self: ActorError, name: str) -> Any:
    """``__getattr__`` of a dual error: what the ActorError lacks, its cause has (Ray's rule)."""
    cause = self.__dict__.get("cause")
    if cause is None or name.startswith("__"):
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
    return getattr(cause, name)


def _dual_class(remote: type) -> type[ActorError]:
    """ActorError and ``remote`` in one class (ActorError alone where they cannot be mixed)."""
    dual = _dual_classes.get(remote)
    if dual is None:
        try:
            dual = type(f"ActorError[{remote.__qualname__}]", (ActorError, remote),
                        {"__module__": __name__, "__reduce__": ActorError.__reduce__,
                         "__getattr__": _cause_attribute})
        except TypeError:           # e.g. a base class whose layout cannot be mixed in
            dual = ActorError
        _dual_classes[remote] = dual
    return dual


def _rebuild_actor_error(args: tuple, fields: dict, cause_data: bytes | None = None) -> ActorError:
    cause = _unpack_cause(cause_data)
    remote = _remote_class(fields.get("remote_module"), fields.get("remote_type"))
    if remote is None and cause is not None and _can_be_dual(type(cause)):
        remote = type(cause)        # a class defined in a function, brought by value with its instance
    err = _rebuild_error(ActorError if remote is None else _dual_class(remote), args, fields)
    assert isinstance(err, ActorError)
    err.cause = cause
    if fields.get("remote_traceback"):
        err.__cause__ = RemoteTraceback(fields["remote_traceback"])
    return err


class ActorDiedError(TorchActorsError):
    """The actor's process is gone: pending and later calls fail with this until a restart.
    ``actor`` is its name (its id if unnamed), ``actor_id`` its id in the job."""

    _fields = ("actor", "exit_code", "signal_name", "restarts_left", "restarting", "actor_id")

    def __init__(self, actor: str, exit_code: int | None = None, signal_name: str | None = None,
                 restarts_left: int = 0, detail: str = "", restarting: bool = False,
                 actor_id: str | None = None, final: bool = False) -> None:
        self.actor = actor
        self.actor_id = actor_id or actor
        self.exit_code = exit_code
        self.signal_name = signal_name
        self.restarts_left = restarts_left
        self.restarting = restarting
        if signal_name:
            how = f"killed by {signal_name}"
        elif exit_code is not None:
            how = f"exited with code {exit_code}"
        else:
            how = "died"
        left = "unlimited restarts" if restarts_left < 0 else f"{restarts_left} restart(s)"
        if restarting:
            then = f"; it is being restarted ({left} left after this one): call again"
        elif final:
            then = "; it will not be restarted"
        else:
            then = "; it will not be restarted (no restarts left; see max_restarts)"
        super().__init__(f"actor {actor} {how}{then}" + (f". {detail}" if detail else ""))


class GetTimeoutError(TorchActorsError, TimeoutError):
    """``get``/``wait``/``put`` did not finish within its ``timeout``."""

    _fields = ("timeout",)

    def __init__(self, message: str, timeout: float | None = None) -> None:
        self.timeout = timeout
        super().__init__(message)


class OwnerDiedError(TorchActorsError):
    """The process that put the object died, and with it the object."""

    _fields = ("object_id", "owner")

    def __init__(self, object_id: str, owner: str) -> None:
        self.object_id = object_id
        self.owner = owner
        super().__init__(f"object {object_id} is lost: its owner {owner} died. Objects live in the "
                         f"process that put them; put long-lived data from a process that outlives its readers")


class ObjectFreedError(TorchActorsError):
    """The object was released (``free`` or reclaimed) before this ``get``."""

    _fields = ("object_id",)

    def __init__(self, object_id: str, detail: str = "") -> None:
        self.object_id = object_id
        super().__init__(f"object {object_id} was freed before this get" + (f" ({detail})" if detail else "")
                         + "; keep the ObjectRef alive and do not call free() while others still need it")


class StoreFullError(TorchActorsError, MemoryError):
    """A put does not fit in the store even after reclaiming unreferenced objects."""

    _fields = ("requested", "used", "capacity")

    def __init__(self, requested: int, used: int, capacity: int, detail: str = "") -> None:
        self.requested = requested
        self.used = used
        self.capacity = capacity
        super().__init__(
            f"object store is full: put of {_fmt(requested)} does not fit ({_fmt(used)} used of "
            f"{_fmt(capacity)} capacity){'; ' + detail if detail else ''}. Drop or free() refs you no longer "
            f"need, pass put(..., timeout=s) to wait for space, or raise ta.init(store_capacity=...)")


class ConfigError(TorchActorsError, ValueError):
    """A job file or override is invalid: names the file, line, key and what is allowed."""

    _fields = ("file", "line", "key", "allowed")

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 key: str | None = None, allowed: Any = None) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.allowed = allowed
        super().__init__(message)


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


__all__ = ["TorchActorsError", "ActorError", "RemoteTraceback", "ActorDiedError", "GetTimeoutError", "OwnerDiedError",
           "ObjectFreedError", "StoreFullError", "ConfigError"]


class UnsafeDirectoryError(TorchActorsError, PermissionError):
    """The directory for job files could be changed by another user: refused, not used."""

    _fields = ("path", "problem")

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(
            f"torchactors will not keep its job files in {path}: it {problem}, so another user could "
            f"replace or read them. Remove it if it is not yours (rm -rf {path}; as its owner or root), "
            f"or chmod 700 it if it is yours, or point XDG_RUNTIME_DIR (or TMPDIR) at a directory "
            f"only you can write")
        self.path = path
        self.problem = problem
