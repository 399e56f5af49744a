"""Ray's exception names for torchactors' errors, so code ported from Ray (``ray.exceptions.X``
spelled ``ta.exceptions.X``) catches the same failures. Nothing is defined here: every error
lives in ``torchactors.errors``."""

from torchactors.errors import (
                                ActorDiedError,
                                ActorError,
                                GetTimeoutError,
                                ObjectFreedError,
                                OwnerDiedError,
                                StoreFullError,
                                TorchActorsError,
)

RayError = TorchActorsError             # base of every error
RayTaskError = ActorError               # a method raised (also an instance of the remote class)
RayActorError = ActorDiedError          # the actor is dead (Ray's ActorDiedError is its subclass)
ActorUnavailableError = ActorDiedError  # Ray: restarting; here ActorDiedError(restarting=True)
ObjectLostError = OwnerDiedError
ObjectStoreFullError = StoreFullError
ObjectFreedError = ObjectFreedError

__all__ = ["RayError", "RayTaskError", "RayActorError", "ActorDiedError", "ActorUnavailableError",
           "GetTimeoutError", "ObjectLostError", "OwnerDiedError", "ObjectStoreFullError", "ObjectFreedError"]
