"""Small helpers every layer may use (a leaf, like ``errors``): nothing of torchactors is imported.

``parse_size`` reads the byte counts users write (``store_capacity="4GiB"`` in ``ta.init`` and
in job files). Units are binary whichever spelling is used: ``K``, ``KB`` and ``KiB`` all mean
1024, as "4KB" means 4096 bytes in the benchmarks, and as memory sizes are read in
Docker's ``--shm-size 64m`` or ``ulimit``. One meaning per letter, so a job file and ``ta.init``
never disagree on how big a store is.

``import_string`` resolves the ``"module:attr"`` strings that job files write (a role's
``class``, the ``program``, an env wrapper ``module:Class``).
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any

_UNITS = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgt", start=1):
    for _spelling in (_letter, _letter + "b", _letter + "ib"):
        _UNITS[_spelling] = 1 << (10 * _i)

_SIZE = re.compile(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string like ``"4GiB"``, ``"512MB"``, ``"1.5G"``, ``"100k"``
    (binary units: K = KB = KiB = 1024). Raises ``ValueError`` for anything else: a negative
    size, a bool, an unknown unit, ``"inf"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"cannot read {value!r} as a size: write bytes as an int or a string like '4GiB'")
    number: int | float = value if not isinstance(value, str) else 0
    unit = ""
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip().lower())
        if m is None or m.group(2) not in _UNITS:
            raise ValueError(f"cannot read {value!r} as a size; write bytes as an int or a string like '4GiB', "
                             f"'512MiB', '100MB' (binary units: K, KB and KiB all mean 1024)")
        number, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"a size must be a finite number of bytes, 0 or more, not {value!r}")
    return int(number * _UNITS[unit])


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
