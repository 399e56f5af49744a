"""What an actor backend offers: the ``Backend`` protocol the local and Ray backends implement.

Box in the data flow: the public API (``actors.api``) and the caller-facing objects
(``actors.handle``) talk to the process's backend (``actors._current``) only through these
methods; ``actors.local.Runtime`` runs actors as processes of this machine under our
supervisor, ``actors.ray_backend.RayRuntime`` as Ray actors (docs/design.md, "Layers and
the current objects"; "On Ray, Ray carries the calls and torchactors the tensors").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torchactors.actors.handle import ActorHandle
    from torchactors.runtime.job import Job
    from torchactors.runtime.status import ActorStatus
    from torchactors.store.core import Store
    from torchactors.store.refs import ObjectRef


class Backend(Protocol):
    """One process's way of starting, calling and stopping actors."""

    job: Job            # the job this process belongs to (its directory, secret, names)
    store: Store        # this process's store: arguments are put here, results read from it

    def create_actor(self, cls: type, options: dict, args: tuple, kwargs: dict) -> ActorHandle:
        """Start an actor of ``cls`` (options resolved and checked); its handle at once."""
        ...

    def call(self, handle: ActorHandle, method: str, args: tuple, kwargs: dict) -> ObjectRef:
        """Send a method call; the ref of its result at once (``.remote()`` never raises
        for a dead actor: the ref does)."""
        ...

    def ping(self, handle: ActorHandle) -> ObjectRef:
        """A ref that resolves once the actor has run its constructor and answers calls."""
        ...

    def terminate(self, handle: ActorHandle) -> ObjectRef:
        """Stop the actor once the calls sent to it so far have run (``__ray_terminate__``);
        the ref raises ActorDiedError once it has ended."""
        ...

    def kill(self, handle: ActorHandle, no_restart: bool = True) -> None:
        """Stop it now: for good, or (``no_restart=False``) letting its restart policy apply."""
        ...

    def get_actor(self, name: str, namespace: str | None = None) -> ActorHandle:
        """The handle of the actor started with that name; ValueError if there is none."""
        ...

    def status(self, handle: ActorHandle) -> ActorStatus | None:
        """What the actor's supervisor last said of it; None where the backend cannot say."""
        ...

    def shutdown(self) -> None:
        """Stop every actor this process started; in the driver, remove the job too."""
        ...

