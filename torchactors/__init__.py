"""torchactors: a Ray-style actor runtime for PyTorch workers on one machine (or a Ray cluster).

Tensors live once, in shared memory, keyed by an object ID; processes pass small refs; ``get``
rebuilds a view of the same memory. Actors are forked from a zygote, watched and restarted by a
supervisor. This module only re-exports the public API.

The layers, bottom to top; a module imports only from its own layer or below, never upward
(``tests/test_layers.py`` holds the rule, with no import cycle either)::

    jobs/     job files and the CLI: schema, YAML with line numbers, runner, summary, plot
    rl/       actor classes and learning code (IMPALA, V-trace, gymnasium envs, models)
      |         both written against this module's public API only
    actors/   @actor, handles, options, the call codec, backends (local, Ray), Weights, Queue, ActorPool
    runtime/  processes: job directory, supervisor, zygote, child start-up, authenticated transport
    store/    objects: segments, refs, reducers, hold tables, put/get/free
    errors.py, _util.py: leaves every layer may use

Each layer keeps its one process-wide current object in a leaf module of its own
(``store/_current.py``: the Store; ``actors/_current.py``: the backend), so no module reaches
upward for it. The data flow, box by box, is drawn at the top of ``docs/design.md``.
"""

from torchactors import exceptions, store
from torchactors.actors.api import (
                                ActorStatus,
                                actor_status,
                                exit_actor,
                                get_actor,
                                init,
                                is_initialized,
                                kill,
                                shutdown,
                                wait,
)
from torchactors.actors.handle import ActorClass, ActorHandle, actor, method, remote
from torchactors.actors.pool import ActorPool
from torchactors.actors.queue import Queue
from torchactors.actors.weights import Weights
from torchactors.errors import (
                                ActorDiedError,
                                ActorError,
                                ConfigError,
                                GetTimeoutError,
                                ObjectFreedError,
                                OwnerDiedError,
                                RemoteTraceback,
                                StoreFullError,
                                TorchActorsError,
)
from torchactors.store import ObjectRef, free, get, put, stats

# Ray spells it ray.actor.exit_actor(): the same function under ta.actor, for ported code.
setattr(actor, "exit_actor", exit_actor)  # noqa: B010 (a function attribute mypy cannot see)

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "put", "get", "wait", "free", "stats", "actor", "kill", "get_actor",
    "remote", "method", "exit_actor", "RemoteTraceback", "actor_status", "ActorStatus",
    "ObjectRef", "ActorHandle", "ActorClass", "store", "exceptions", "Weights", "Queue", "ActorPool",
    "TorchActorsError", "ActorError", "ActorDiedError", "GetTimeoutError", "OwnerDiedError",
    "ObjectFreedError", "StoreFullError", "ConfigError",
]
