"""``@ta.actor``, actor classes, handles and methods: the caller-facing objects.

Box in the data flow: ``Cls.remote(...)`` asks the runtime to start a process and returns a
handle at once; ``handle.method.remote(...)`` pickles the arguments (tensors go into the
caller's store, only refs travel) and returns an ``ObjectRef`` at once.
"""

from __future__ import annotations

import inspect
import itertools
import os
import pickle
from typing import Any, Callable, Optional

from torchactors.actors import protocol
from torchactors.actors.protocol import EMPTY_ARGS as _EMPTY_ARGS
from torchactors.errors import StoreFullError
from torchactors.runtime.child import DEVICE
from torchactors.runtime.supervisor import Backoff, check_start_method
from torchactors.store import serialize
from torchactors.store.refs import ObjectRef, SerializationContext

OPTION_DEFAULTS: dict[str, Any] = {
    "num_threads": None, "device": "cpu", "max_restarts": 0, "max_task_retries": 0, "max_concurrency": 1,
    "name": None, "env": None, "ray_options": None,
    "start_method": None, "restart_backoff": None,     # None: the job's start method, Backoff's defaults
}


def check_options(options: dict) -> dict:
    unknown = set(options) - set(OPTION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown actor option(s) {sorted(unknown)}; allowed: {sorted(OPTION_DEFAULTS)}")
    o = dict(options)
    if o.get("num_threads") is not None and (not isinstance(o["num_threads"], int) or o["num_threads"] < 1):
        raise ValueError(f"num_threads must be a positive int or None, not {o['num_threads']!r}")
    if not isinstance(o.get("max_restarts", 0), int) or o.get("max_restarts", 0) < 0:
        raise ValueError(f"max_restarts must be an int >= 0, not {o['max_restarts']!r}")
    if not isinstance(o.get("max_task_retries", 0), int) or o.get("max_task_retries", 0) < 0:
        raise ValueError(f"max_task_retries must be an int >= 0, not {o['max_task_retries']!r}")
    if not isinstance(o.get("max_concurrency", 1), int) or o.get("max_concurrency", 1) < 1:
        raise ValueError(f"max_concurrency must be an int >= 1, not {o['max_concurrency']!r}")
    if o.get("ray_options") is not None and not isinstance(o["ray_options"], dict):
        raise ValueError(f"ray_options must be a dict of Ray actor options, not {o['ray_options']!r}")
    if o.get("start_method") is not None:
        check_start_method(o["start_method"])
    Backoff.parse(o.get("restart_backoff"))
    device = o.get("device", "cpu")
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    return o


_actor_ids = itertools.count(1)


def new_actor_id(cls: type) -> str:
    """An id unique in the job: the class, the creating process and a counter."""
    return f"{cls.__name__}-{os.getpid()}-{next(_actor_ids)}"


def public_methods(cls: type) -> list[str]:
    return sorted(n for n, v in inspect.getmembers(cls) if callable(v) and not n.startswith("_"))


class ActorClass:
    """What ``@ta.actor`` turns a class into: start instances with ``.remote()``."""

    def __init__(self, cls: type, options: dict) -> None:
        self._cls = cls
        self._options = {**OPTION_DEFAULTS, **check_options(options)}
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__

    def options(self, **options: Any) -> "ActorClass":
        """The same class with some options overridden for the next ``.remote()``."""
        return ActorClass(self._cls, {**self._options, **check_options(options)})

    def remote(self, *args: Any, **kwargs: Any) -> "ActorHandle":
        from torchactors.actors import api

        return api.runtime().create_actor(self._cls, self._options, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self._cls.__name__} cannot be instantiated directly; "
                        f"use {self._cls.__name__}.remote(...)")

    def __repr__(self) -> str:
        return f"ActorClass({self._cls.__module__}.{self._cls.__qualname__})"


def actor(cls: Optional[type] = None, **options: Any) -> Any:
    """``@ta.actor`` or ``@ta.actor(num_threads=1, device="cpu", max_restarts=0, max_concurrency=1)``."""
    if cls is None:
        return lambda c: ActorClass(c, options)
    if not inspect.isclass(cls):
        raise TypeError(f"@ta.actor decorates a class, not {type(cls).__name__}")
    return ActorClass(cls, options)


class ActorHandle:
    """A picklable reference to a running actor; pass it to other actors to let them call it.
    It carries the actor's ``max_task_retries``: every caller retries the same way."""

    def __init__(self, actor_id: str, name: str, methods: list[str], max_task_retries: int = 0) -> None:
        self._actor_id = actor_id
        self._name = name
        self._methods = methods
        self._max_task_retries = max_task_retries

    def __getattr__(self, item: str) -> "ActorMethod":
        if item.startswith("_") or item not in self._methods:
            raise AttributeError(f"actor {self._name} has no method {item!r}; it has: {', '.join(self._methods)}")
        return ActorMethod(self, item)

    def __reduce__(self) -> tuple:
        return (ActorHandle, (self._actor_id, self._name, self._methods, self._max_task_retries))

    def __repr__(self) -> str:
        return f"ActorHandle({self._name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


class ActorMethod:
    __slots__ = ("handle", "name")

    def __init__(self, handle: ActorHandle, name: str) -> None:
        self.handle = handle
        self.name = name

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        from torchactors.actors import api

        return api.runtime().call(self.handle, self.name, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"call actor methods with .remote(): {self.handle._name}.{self.name}.remote(...)")




def encode_args(args: tuple, kwargs: dict, put: Callable[[Any], ObjectRef]) -> tuple[bytes, list]:
    """Pickle call arguments: tensors at any depth are put into the store and travel as
    refs. Returns the body and the refs it carries (the caller holds them until the actor
    has read the call). An argument that cannot be pickled is named in the error."""
    if not args and not kwargs:
        return _EMPTY_ARGS, []
    if all(type(a) in protocol.INLINE_TYPES for a in args) and all(
            type(v) in protocol.INLINE_TYPES for v in kwargs.values()):
        return pickle.dumps((args, kwargs), pickle.HIGHEST_PROTOCOL), []
    with SerializationContext() as ctx:
        try:
            body = serialize.dumps_message((args, kwargs), put)
        except StoreFullError:
            raise                           # the store is full, not the argument bad
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
