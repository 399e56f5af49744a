"""The class a role names: the user's plain class behind an actor class, and the arguments the runner fills in.

Box: used by validation (``args`` are bound to the constructor at validate time) and by the
runner (it decorates the plain class with the role's options and passes ``replica_index`` and
``seed``). The ``module:attr`` strings themselves resolve with ``torchactors._util.import_string``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

logger = logging.getLogger(__name__)


def is_actor_class(obj: Any) -> bool:
    """An already ``@ta.actor``-decorated class: it has ``remote`` and ``options``."""
    return callable(getattr(obj, "remote", None)) and callable(getattr(obj, "options", None))


def plain_class(obj: Any) -> type | None:
    """The user's class behind ``obj`` (itself, or the class an ``@ta.actor`` wrapper holds)."""
    if not is_actor_class(obj):
        return obj if inspect.isclass(obj) else None
    for attr in ("__wrapped__", "cls", "_cls", "_class", "user_class"):
        inner = getattr(obj, attr, None)
        if inspect.isclass(inner) and not is_actor_class(inner):
            return inner
    return None


RUNNER_ARGS = ("replica_index", "seed")


def runner_args(cls: type) -> frozenset[str]:
    """The constructor parameters the runner fills in, of ``RUNNER_ARGS``: ``replica_index``
    (each replica's index; never in ``args``) and ``seed`` (``job.seed`` unless ``args`` sets it)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(name for name in RUNNER_ARGS if name in params)


