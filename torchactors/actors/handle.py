"""``@ta.actor``, actor classes, handles and methods: the caller-facing objects.

Box in the data flow: ``Cls.remote(...)`` asks the runtime to start a process and returns a
handle at once; ``handle.method.remote(...)`` pickles the arguments (tensors go into the
caller's store, only refs travel) and returns an ``ObjectRef`` at once.
"""

from __future__ import annotations

import inspect
import io
import itertools
import os
import pickle
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from torchactors.actors import lifetime, protocol
from torchactors.actors import options as actor_options
from torchactors.actors.protocol import EMPTY_ARGS as _EMPTY_ARGS
from torchactors.errors import ActorDiedError, ActorError, StoreFullError
from torchactors.store import serialize
from torchactors.store.refs import ObjectRef, SerializationContext

_actor_ids = itertools.count(1)


class ActorID(str):
    """An actor's id: a str, with Ray's ``.hex()`` spelling (``h._actor_id.hex()``)."""

    def hex(self) -> str:
        return str(self)


def new_actor_id(cls: type) -> str:
    """An id unique in the job: the class, the creating process and a counter."""
    return ActorID(f"{cls.__name__}-{os.getpid()}-{next(_actor_ids)}")


def public_methods(cls: type) -> list[str]:
    return sorted(n for n, v in inspect.getmembers(cls) if callable(v) and not n.startswith("_"))


def method_returns(cls: type) -> dict[str, int]:
    """The methods declared with ``@ta.method(num_returns=n)``, n != 1."""
    out = {}
    for n, v in inspect.getmembers(cls):
        returns = getattr(v, "__torchactors_num_returns__", 1)
        if returns != 1 and not n.startswith("_"):
            out[n] = returns
    return out


def is_async_class(cls: type) -> bool:
    """Ray's rule: an actor with any ``async def`` method is an async actor."""
    return any(inspect.iscoroutinefunction(v) or inspect.isasyncgenfunction(v)
               for _, v in inspect.getmembers(cls, callable))


def _check_num_returns(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"num_returns must be an int >= 0, not {n!r} (streaming and dynamic returns "
                         f"are not supported)")
    return n


def method(fn: Callable | None = None, *, num_returns: int = 1, **unsupported: Any) -> Any:
    """``@ta.method(num_returns=2)`` on an actor method: its ``.remote()`` returns one ref per value."""
    if unsupported:
        raise TypeError(f"@ta.method: unsupported option(s) {sorted(unsupported)}; supported: num_returns")
    n = _check_num_returns(num_returns)

    def mark(f: Callable) -> Callable:
        target = f.__func__ if isinstance(f, (staticmethod, classmethod)) else f
        target.__torchactors_num_returns__ = n
        return f

    return mark(fn) if fn is not None else mark


class ActorClass:
    """What ``@ta.actor`` turns a class into: start instances with ``.remote()``. Class
    attributes, static and class methods of the wrapped class are reachable through it."""

    def __init__(self, cls: type, options: dict) -> None:
        self._cls = cls
        self._options = {**actor_options.DEFAULTS, **actor_options.check(options)}
        self._signature: Any = None
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") or item in ("_cls", "_options", "_signature"):
            raise AttributeError(item)
        return getattr(self._cls, item)

    def __instancecheck__(self, obj: Any) -> bool:
        """``isinstance(self, Cls)`` inside the actor, where ``Cls`` names this ActorClass (as in
        Ray) and the instance's class may be a by-value copy of the module's class."""
        return isinstance(obj, self._cls) or any(
            c.__qualname__ == self._cls.__qualname__ and c.__module__ == self._cls.__module__
            for c in type(obj).__mro__)

    def __mro_entries__(self, bases: tuple) -> tuple:
        raise TypeError(f"Inheriting from actor classes is not currently supported: {self.__name__} is an "
                        f"actor class. Inherit from the plain class instead and decorate the subclass with "
                        f"@ta.actor (or @ta.remote)")

    def options(self, **options: Any) -> ActorClass:
        """The same class with some options overridden for the next ``.remote()``."""
        return ActorClass(self._cls, {**self._options, **actor_options.check(options)})

    def check_arguments(self, args: tuple, kwargs: dict) -> None:
        """TypeError at the caller for arguments the constructor cannot take."""
        if self._signature is None:
            try:
                self._signature = inspect.signature(self._cls.__init__)
            except (TypeError, ValueError):
                self._signature = False
        if self._signature:
            try:
                self._signature.bind(None, *args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{self.__name__}.remote(): {e} (the arguments do not match "
                                f"{self.__name__}.__init__{self._signature})") from None

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        from torchactors.actors import api

        self.check_arguments(args, kwargs)
        options = actor_options.resolve(self._options, is_async_class(self._cls))
        return api.runtime().create_actor(self._cls, options, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Actors cannot be instantiated directly. Instead of '{self._cls.__name__}()', "
                        f"use '{self._cls.__name__}.remote()'")

    def __repr__(self) -> str:
        return f"ActorClass({self._cls.__module__}.{self._cls.__qualname__})"


def _decorate(target: Any, options: dict, how: str) -> ActorClass:
    if not inspect.isclass(target):
        raise TypeError(f"{how} decorates a class, not {type(target).__name__}; torchactors has actors only "
                        f"(no remote functions): put the function in an actor's method")
    return ActorClass(target, options)


def actor(cls: type | None = None, **options: Any) -> Any:
    """``@ta.actor`` or ``@ta.actor(num_threads=1, device="cpu", max_restarts=0, max_concurrency=1)``."""
    if cls is None:
        actor_options.check(options)
        return lambda c: _decorate(c, options, "@ta.actor")
    return _decorate(cls, options, "@ta.actor")


def remote(*args: Any, **options: Any) -> Any:
    """Ray's spelling of ``@ta.actor``: ``@ta.remote`` or ``@ta.remote(max_restarts=1, ...)``."""
    if len(args) == 1 and not options:
        return _decorate(args[0], {}, "@ta.remote")
    if args:
        raise TypeError("@ta.remote takes a class, or only keyword options: @ta.remote(max_restarts=1)")
    if not options:
        raise TypeError("@ta.remote() needs options; without options write @ta.remote (no parentheses)")
    actor_options.check(options)
    return lambda c: _decorate(c, options, "@ta.remote")


class _KeepFileNames(cloudpickle.Pickler):
    """cloudpickle, except that code pickled by value keeps its file name (cloudpickle writes
    ``<dynamic-code>``), so an actor's tracebacks show the file and source lines of a class
    defined in a script, a notebook's file or a test function."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            rebuild, args = cloudpickle.cloudpickle._code_reduce(obj)
            return rebuild, tuple(obj.co_filename if a == "<dynamic-code>" else a for a in args)
        return super().reducer_override(obj)


def dumps_class(cls: type) -> bytes:
    """The actor class, pickled for the actor's process."""
    buf = io.BytesIO()
    _KeepFileNames(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(cls)
    return buf.getvalue()


# Handle-scoped lifetime (see lifetime.py): what to call when this process drops its last
# handle of a counted actor, and how to make sure this process watches for that.
on_last_handle: Callable[[str], None] | None = None
on_borrow: Callable[[], None] | None = None


class ActorHandle:
    """A picklable reference to a running actor; pass it to other actors to let them call it.
    It carries the actor's ``max_task_retries``: every caller retries the same way."""

    def __init__(self, actor_id: str, name: str, methods: list[str], max_task_retries: int = 0,
                 returns: dict | None = None, lent: str | None = None) -> None:
        self._actor_id = ActorID(actor_id)
        self._name = name
        self._methods = methods
        self._max_task_retries = max_task_retries
        self._returns = returns or {}
        if lent is not None and lifetime.receive(actor_id, lent) and on_borrow is not None:
            on_borrow()
        if actor_id in lifetime.counts:
            lifetime.counts[actor_id] += 1

    def __del__(self) -> None:
        counts = lifetime.counts
        actor_id = self.__dict__.get("_actor_id")
        n = counts.get(actor_id)
        if n is not None:
            if n > 1:
                counts[actor_id] = n - 1
            elif counts.pop(actor_id, None) is not None and on_last_handle is not None:
                on_last_handle(actor_id)

    def __getattr__(self, item: str) -> Any:
        methods = self.__dict__.get("_methods")
        if methods is None:             # not initialised yet (unpickling)
            raise AttributeError(item)
        if item in methods and not item.startswith("__"):      # the user's own methods first
            return ActorMethod(self, item, self._returns.get(item, 1))
        if item in _SPECIAL:
            return _SPECIAL[item](self)
        raise AttributeError(f"actor {self._name} has no method {item!r}; it has: {', '.join(methods)}")

    def __reduce__(self) -> tuple:
        return (ActorHandle, (self._actor_id, self._name, self._methods, self._max_task_retries, self._returns,
                              lifetime.lend(self._actor_id)))

    def __repr__(self) -> str:
        return f"ActorHandle({self._name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


class _Builtin:
    """``h.__ray_ready__`` / ``h.__ray_terminate__``: Ray's built-in actor methods."""

    __slots__ = ("handle", "kind")

    def __init__(self, handle: ActorHandle, kind: str) -> None:
        self.handle = handle
        self.kind = kind

    def remote(self) -> ObjectRef | None:
        from torchactors.actors import api

        rt = api.runtime()
        if self.kind == "ready":
            return rt.ping(self.handle)
        rt.terminate(self.handle)
        return None

    def __call__(self) -> ObjectRef | None:        # h.ready()
        return self.remote()


_SPECIAL: dict[str, Callable[[ActorHandle], Any]] = {
    "__ray_ready__": lambda h: _Builtin(h, "ready"),
    "ready": lambda h: _Builtin(h, "ready"),
    "__ray_terminate__": lambda h: _Builtin(h, "terminate"),
}


class ActorMethod:
    __slots__ = ("handle", "name", "num_returns")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int = 1) -> None:
        self.handle = handle
        self.name = name
        self.num_returns = num_returns

    def options(self, num_returns: int = 1, **unsupported: Any) -> ActorMethod:
        """``h.m.options(num_returns=2).remote(...)``."""
        if unsupported:
            raise TypeError(f"{self.name}.options(): unsupported option(s) {sorted(unsupported)}; "
                            f"supported: num_returns")
        return ActorMethod(self.handle, self.name, _check_num_returns(num_returns))

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        from torchactors.actors import api

        ref = api.runtime().call(self.handle, self.name, args, kwargs)
        if self.num_returns == 1:
            return ref
        from torchactors.actors.channel import split_returns

        return split_returns(ref, self.num_returns, f"{self.handle._name}.{self.name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"call actor methods with .remote(): {self.handle._name}.{self.name}.remote(...)")


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
        return _EMPTY_ARGS, []
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
