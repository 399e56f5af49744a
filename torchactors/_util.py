"""Small helpers every layer may use (a leaf, like ``errors``): nothing of torchactors is imported.

``import_string`` resolves the ``"module:attr"`` strings that job files write (a role's
``class``, the ``program``, an env wrapper ``module:Class``).
"""

from __future__ import annotations

import importlib
from typing import Any


def import_string(ref: str) -> Any:
    """The object named by ``"package.module:Attr.path"``; ImportError (with the reason) if absent."""
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise ImportError(f"{ref!r} is not of the form 'module:attribute'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # a module that fails while importing is as unusable as a missing one
        raise ImportError(f"cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj
