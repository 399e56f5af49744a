"""torchactors: a Ray-style actor runtime for PyTorch workers on one machine (or a Ray cluster).

Tensors live once, in shared memory, keyed by an object ID; processes pass small refs; ``get``
rebuilds a view of the same memory. Actors are started and watched by a spawn supervisor.
The design, box by box, is in docs/design.md. This module only re-exports the public API.
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
actor.exit_actor = exit_actor

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "put", "get", "wait", "free", "stats", "actor", "kill", "get_actor",
    "remote", "method", "exit_actor", "RemoteTraceback", "actor_status", "ActorStatus",
    "ObjectRef", "ActorHandle", "ActorClass", "store", "exceptions", "Weights", "Queue", "ActorPool",
    "TorchActorsError", "ActorError", "ActorDiedError", "GetTimeoutError", "OwnerDiedError",
    "ObjectFreedError", "StoreFullError", "ConfigError",
]
