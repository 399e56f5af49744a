"""The process's one actor backend: the leaf every module of the actors layer reads it from.

One place holds it (as trio's ``_core/_run_context.py`` holds its run, and Ray's
``global_worker`` its worker), so no module of the layer imports another upward to reach it.
``actors.api`` sets it (``ta.init``, or the first use through ``start_default``); an actor
process sets its own when it starts serving. See docs/design.md, "Layers and the current
objects".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchactors.actors.backend import Backend

backend: Backend | None = None      # the local Runtime or the RayRuntime of this process
in_actor = False                    # this process serves an actor (local or Ray backend)
# How the first use without ``ta.init()`` starts the default backend: ``actors.api.init``,
# registered when the public API is imported (it sits above every module that calls it).
start_default: Callable[[], Backend] | None = None


def get() -> Backend:
    """The process's backend, started with the defaults if there is none yet."""
    if backend is not None:
        return backend
    if start_default is None:
        raise RuntimeError("torchactors is not initialised: import torchactors and call ta.init() first")
    return start_default()
