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
import sys
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from torchactors.actors import _current, lifetime
from torchactors.actors import options as actor_options
from torchactors.actors.calls import RETRY_KWARG
from torchactors.actors.pending import split_returns
from torchactors.store.refs import ObjectRef

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


class _Default:
    """The default of every parameter in a checked signature: only that there is one matters."""

    def __repr__(self) -> str:
        return "..."

    def __reduce__(self) -> str:
        return "_DEFAULT"


_DEFAULT = _Default()
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# A method's check: its Signature, and the numbers of positional arguments that certainly bind
# (lo..hi), so a call without keywords is checked without Signature.bind (a tenth of a call's cost).
MethodCheck = tuple[inspect.Signature, int, int]


def method_signatures(cls: type) -> dict[str, MethodCheck]:
    """Per public method, the parameters a call must bind to, as the actor's process calls it
    (no ``self``), with defaults and annotations dropped: only whether a parameter has a
    default matters, and a default's value (a tensor, say) must not travel with every handle.
    A method whose signature cannot be read is left out (not checked)."""
    out = {}
    for n in public_methods(cls):
        fn = getattr(cls, n)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        params = list(sig.parameters.values())
        if inspect.isfunction(fn) and not isinstance(inspect.getattr_static(cls, n), staticmethod):
            params = params[1:]     # a plain method: its self is the instance
        elif not (inspect.isfunction(fn) or inspect.ismethod(fn)):
            continue                # a callable object, a builtin: how it binds is its own affair
        params = [p.replace(annotation=p.empty, default=p.empty if p.default is p.empty else _DEFAULT)
                  for p in params]
        positional = [p for p in params if p.kind in _POSITIONAL]
        hi = sys.maxsize if any(p.kind == p.VAR_POSITIONAL for p in params) else len(positional)
        lo = sum(p.default is p.empty for p in positional)
        if any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params):
            lo = sys.maxsize        # never binds without keywords: bind says why
        out[n] = (inspect.Signature(params), lo, hi)
    return out


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


def _check_retries(n: Any, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < -1:
        raise ValueError(f"{what} must be an int >= -1 (-1: retry without limit), not {n!r}")
    return n


def retry_policy(max_retries: int | None, max_task_retries: int | None,
                 retry_exceptions: Any) -> tuple[int, bool | tuple[type, ...]] | None:
    """Ray's method retry options, checked: ``(retries, True or the exception types)``, or
    None when a raised exception is not retried. ``max_retries`` is Ray's older name of
    ``max_task_retries``."""
    if max_retries is not None and max_task_retries is not None:
        raise TypeError("give max_task_retries or max_retries (its older name), not both")
    retries = max_task_retries if max_task_retries is not None else max_retries
    if retry_exceptions is False or retry_exceptions is None:
        if retries is not None:
            raise ValueError(f"max_task_retries={retries!r} on a method retries only the exceptions named by "
                             f"retry_exceptions (True: any); retries after the actor's death are the actor's "
                             f"max_task_retries option")
        return None
    if retry_exceptions is not True:
        if not isinstance(retry_exceptions, (list, tuple)) or not all(
                inspect.isclass(t) and issubclass(t, BaseException) for t in retry_exceptions):
            raise TypeError(f"retry_exceptions must be True, False or a list of exception classes, "
                            f"not {retry_exceptions!r}")
        retry_exceptions = tuple(retry_exceptions)
    if retries is None:
        raise ValueError("retry_exceptions needs max_task_retries (or max_retries) with it: how many times "
                         "to run the method again after it raised")
    return _check_retries(retries, "max_task_retries"), retry_exceptions


def method(fn: Callable | None = None, *, num_returns: int = 1, max_retries: int | None = None,
           max_task_retries: int | None = None, retry_exceptions: Any = False, **unsupported: Any) -> Any:
    """``@ta.method(num_returns=2)`` on an actor method: its ``.remote()`` returns one ref per
    value. ``@ta.method(max_task_retries=3, retry_exceptions=[ValueError])`` (or ``True``: any
    exception) runs the method again, in the actor, when it raises one of them (Ray's
    application-level retries)."""
    if unsupported:
        raise TypeError(f"@ta.method: unsupported option(s) {sorted(unsupported)}; supported: num_returns, "
                        f"max_task_retries (or max_retries), retry_exceptions")
    n = _check_num_returns(num_returns)
    policy = retry_policy(max_retries, max_task_retries, retry_exceptions)

    def mark(f: Callable) -> Callable:
        target: Any = f.__func__ if isinstance(f, (staticmethod, classmethod)) else f
        target.__torchactors_num_returns__ = n
        if policy is not None:
            target.__torchactors_retry__ = policy
        return f

    return mark(fn) if fn is not None else mark


def method_decorators(cls: type) -> dict[str, Callable]:
    """Ray's ``__ray_invocation_decorator__`` of the methods that have one: it wraps the
    method's ``.remote()`` in the caller (``decorator(invoke)(args, kwargs)``)."""
    out = {}
    for n, v in inspect.getmembers(cls, callable):
        decorator = getattr(v, "__ray_invocation_decorator__", None)
        if decorator is not None and not n.startswith("_"):
            out[n] = decorator
    return out


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
                cls: Any = self._cls        # its __init__, looked up as Python would
                self._signature = inspect.signature(cls.__init__)
            except (TypeError, ValueError):
                self._signature = False
        if self._signature:
            try:
                self._signature.bind(None, *args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{self.__name__}.remote(): {e} (the arguments do not match "
                                f"{self.__name__}.__init__{self._signature})") from None

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        self.check_arguments(args, kwargs)
        options = actor_options.resolve(self._options, is_async_class(self._cls))
        handle = _current.get().create_actor(self._cls, options, args, kwargs)
        handle._signatures = method_signatures(self._cls)
        return handle

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
                 returns: dict | None = None, lent: str | None = None, decorators: dict | None = None) -> None:
        self._actor_id = ActorID(actor_id)
        self._name = name
        self._methods = methods
        self._max_task_retries = max_task_retries
        self._returns = returns or {}
        self._decorators = decorators or {}     # method -> its __ray_invocation_decorator__
        if lent is not None and lifetime.receive(actor_id, lent) and on_borrow is not None:
            on_borrow()
        if actor_id in lifetime.counts:
            lifetime.counts[actor_id] += 1
        # method -> the Signature its calls are checked against at .remote(); set by
        # ActorClass.remote (a handle from get_actor has none: its calls are checked in the actor)
        self._signatures: dict[str, MethodCheck] = {}

    def __del__(self) -> None:
        counts = lifetime.counts
        actor_id = self.__dict__.get("_actor_id")
        n = None if actor_id is None else counts.get(actor_id)
        if actor_id is not None and n is not None:
            if n > 1:
                counts[actor_id] = n - 1
            elif counts.pop(actor_id, None) is not None and on_last_handle is not None:
                on_last_handle(actor_id)

    def __getattr__(self, item: str) -> Any:
        methods = self.__dict__.get("_methods")
        if methods is None:             # not initialised yet (unpickling)
            raise AttributeError(item)
        if item in methods and not item.startswith("__"):      # the user's own methods first
            return ActorMethod(self, item, self._returns.get(item, 1), self._decorators.get(item))
        if item in _SPECIAL:
            return _SPECIAL[item](self)
        raise AttributeError(f"actor {self._name} has no method {item!r}; it has: {', '.join(methods)}")

    def __reduce__(self) -> tuple:
        return (ActorHandle, (self._actor_id, self._name, self._methods, self._max_task_retries, self._returns,
                              lifetime.lend(self._actor_id), self._decorators or None))

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """``__reduce__`` (this class's or a backend's subclass's) with the method signatures
        as the pickle's state, so every handle class carries them the same way."""
        rebuild, args = self.__reduce__()[:2]
        return (rebuild, args, {"_signatures": self._signatures}) if self._signatures else (rebuild, args)

    def __dir__(self) -> list[str]:
        """The actor's methods (tab completion, Ray's ``dir(handle)``) and the handle's own names."""
        return sorted({*object.__dir__(self), *self._methods})

    def _check_call(self, method: str, args: tuple, kwargs: dict) -> None:
        """TypeError at the caller for arguments ``method`` cannot take (Ray checks at .remote())."""
        check = self._signatures.get(method)
        if check is None:
            return
        sig, lo, hi = check
        if not kwargs and lo <= len(args) <= hi:
            return
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self._name}.{method}.remote(): {e} (the arguments do not match "
                            f"{method}{sig})") from None

    def __repr__(self) -> str:
        return f"ActorHandle({self._name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


class _Builtin:
    """``h.__ray_ready__`` / ``h.__ray_terminate__``: Ray's built-in actor methods."""

    __slots__ = ("handle", "kind", "name")

    def __init__(self, handle: ActorHandle, kind: str, name: str) -> None:
        self.handle = handle
        self.kind = kind
        self.name = name

    def remote(self) -> ObjectRef:
        rt = _current.get()
        if self.kind == "ready":
            return rt.ping(self.handle)
        return rt.terminate(self.handle)

    def __call__(self) -> ObjectRef:        # h.ready(); Ray's own names must be called with .remote()
        if self.name != "ready":
            raise TypeError(f"call actor methods with .remote(): {self.handle._name}.{self.name}.remote()")
        return self.remote()


_SPECIAL: dict[str, Callable[[ActorHandle], Any]] = {
    "__ray_ready__": lambda h: _Builtin(h, "ready", "__ray_ready__"),
    "ready": lambda h: _Builtin(h, "ready", "ready"),
    "__ray_terminate__": lambda h: _Builtin(h, "terminate", "__ray_terminate__"),
}


class ActorMethod:
    __slots__ = ("handle", "name", "num_returns", "decorator", "retry")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int = 1,
                 decorator: Callable | None = None, retry: tuple | None = None) -> None:
        self.handle = handle
        self.name = name
        self.num_returns = num_returns
        self.decorator = decorator      # the method's __ray_invocation_decorator__, if any
        self.retry = retry              # this call's own retry policy (see retry_policy)

    def options(self, num_returns: int | None = None, max_retries: int | None = None,
                max_task_retries: int | None = None, retry_exceptions: Any = None,
                **unsupported: Any) -> ActorMethod:
        """``h.m.options(num_returns=2).remote(...)``; ``max_task_retries`` (or ``max_retries``)
        and ``retry_exceptions`` as in ``@ta.method``, for these calls (``retry_exceptions=False``
        turns the method's retries off)."""
        if unsupported:
            raise TypeError(f"{self.name}.options(): unsupported option(s) {sorted(unsupported)}; "
                            f"supported: num_returns, max_task_retries (or max_retries), retry_exceptions")
        retry = self.retry
        if retry_exceptions is not None or max_retries is not None or max_task_retries is not None:
            retry = retry_policy(max_retries, max_task_retries, retry_exceptions) or (0, True)
        returns = self.num_returns if num_returns is None else _check_num_returns(num_returns)
        return ActorMethod(self.handle, self.name, returns, self.decorator, retry)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if self.decorator is not None:
            return self.decorator(self._invoke)(args, kwargs)
        return self._invoke(args, kwargs)

    def _invoke(self, args: Any, kwargs: Any) -> Any:
        args = tuple(args)          # a decorator may hand back a list
        self.handle._check_call(self.name, args, kwargs)
        kwargs = dict(kwargs) if self.retry is None else {**kwargs, RETRY_KWARG: self.retry}
        ref = _current.get().call(self.handle, self.name, args, kwargs)
        if self.num_returns == 1:
            return ref
        return split_returns(ref, self.num_returns)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"call actor methods with .remote(): {self.handle._name}.{self.name}.remote(...)")

    def __dir__(self) -> list[str]:
        """``options`` and ``remote`` (and the dunders), not the slots that say which method it is."""
        return sorted(set(object.__dir__(self)) - set(ActorMethod.__slots__))
