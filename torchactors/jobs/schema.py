"""The keys of a job file: for each section, each key's check, default and allowed values in words.

Box: the table that validation (``config``) walks and that docs/yaml.md documents. A role's keys
are its own (``class``, ``replicas``, ``args``, ``start_timeout``) plus the actor options that
``torchactors/actors/options.py`` marks for job files, checked by the options' own checks. A
check returns the value to keep or raises ``Invalid`` (its detail: why, when the allowed values
alone do not say).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torchactors as ta
from torchactors._util import import_string
from torchactors.actors.options import MAX_ACTORS, OPTIONS, START_METHODS, Option, start_method
from torchactors.jobs.imports import is_actor_class

logger = logging.getLogger(__name__)

REQUIRED = object()  # sentinel default: the key must be given


class Invalid(Exception):
    """A value failed its check; ``detail`` says why when the allowed set alone does not."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Key:
    """One key of a section: how to check it, its default, and the words for docs and errors."""

    check: Callable[[Any], Any]
    default: Any
    allowed: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not _is_int(v) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise Invalid()
        return v
    return check


def number(positive: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if not (_is_int(v) or isinstance(v, float)):
            raise Invalid()
        try:
            f = float(v)
        except OverflowError:
            raise Invalid(f"{v} is too large for a number") from None
        if not math.isfinite(f) or (positive and f <= 0):
            raise Invalid()
        return f
    return check


def optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)
    return check


def choice(*values: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in values:
            raise Invalid()
        return v
    return check


def _name(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v):
        raise Invalid()
    return v


def _size(v: Any) -> str | int:
    """A store capacity as ``ta.init`` reads it (the store's own parser), and positive."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise Invalid()
    try:
        n = ta.store.parse_size(v)
    except (ValueError, OverflowError):
        raise Invalid() from None
    if n <= 0:
        raise Invalid()
    return v  # kept as written: ta.init takes "4GiB" as well as bytes


def nonblank(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise Invalid()
    return v


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A check that raises ValueError (an actor option's, in actors/options.py), its reason kept."""
    def run(v: Any) -> Any:
        try:
            return check(v)
        except ValueError as e:
            raise Invalid(str(e)) from None
    return run


def _option(option: Option) -> Callable[[Any], Any]:
    """An actor option as a role key: its own check; null means the role's default."""
    check = _checked(option.check)

    def run(v: Any) -> Any:
        value = check(v)
        return copy.deepcopy(option.role_default) if value is None else value
    return run


def keyword_args(v: Any) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) and k.isidentifier() for k in v):
        raise Invalid()
    return copy.deepcopy(v)


def _import_ref(what: str) -> Callable[[Any], str]:
    """Check a ``module:attr`` string and import it now, so a typo fails at validate time."""
    def check(v: Any) -> str:
        if not isinstance(v, str) or not re.fullmatch(r"[\w.]+:[\w.]+", v):
            raise Invalid()
        try:
            obj = import_string(v)
        except ImportError as e:
            raise Invalid(str(e)) from None
        if what == "class" and not (inspect.isclass(obj) or is_actor_class(obj)):
            raise Invalid(f"{v} is a {type(obj).__name__}, not a class")
        if what == "function" and not callable(obj):
            raise Invalid(f"{v} is a {type(obj).__name__}, not callable")
        return v
    return check


START_TIMEOUT_S = 120.0     # default seconds a role's constructors may take

JOB_KEYS: dict[str, Key] = {
    "name": Key(_name, REQUIRED, "a name of letters, digits, '_', '-', '.'"),
    "seed": Key(integer(-(1 << 63), (1 << 64) - 1), 0, "int from -2**63 to 2**64 - 1"),
}
RUNTIME_KEYS: dict[str, Key] = {
    "backend": Key(choice("local", "ray"), "local", "local, ray"),
    "address": Key(optional(nonblank), None,
                   "null or a Ray address string (backend ray only)"),
    "num_threads": Key(optional(integer(1)), None, "null (runtime default) or int >= 1"),
    "store_capacity": Key(optional(_size), None,
                          "null (runtime default) or a size: bytes as int, or a string like 4GiB, 512MiB"),
    "start_method": Key(_checked(start_method), "zygote", ", ".join(START_METHODS)),
}
ROLE_KEYS: dict[str, Key] = {
    "class": Key(_import_ref("class"), REQUIRED, "'module:Class', importable"),
    "replicas": Key(integer(1, MAX_ACTORS), 1, f"int >= 1, at most {MAX_ACTORS} (actor processes in a job)"),
    "args": Key(keyword_args, {}, "a mapping of keyword arguments for the class"),
    # the options of the role's actors, as the decorator takes them
    **{o.name: Key(_option(o), o.role_default, o.allowed) for o in OPTIONS.values() if o.in_job_file},
    "start_timeout": Key(optional(number(positive=True)), START_TIMEOUT_S,
                         "seconds > 0 the constructors may take, or null (wait for ever)"),
}
ROLE_OPTIONS = tuple(o.name for o in OPTIONS.values() if o.in_job_file)
PROGRAM_KEY = Key(_import_ref("function"), REQUIRED, "'module:function', importable, taking the job context")
STOP_KEYS: dict[str, Key] = {
    "max_frames": Key(optional(integer(1)), None, "null or int >= 1"),
    "max_seconds": Key(optional(number(positive=True)), None, "null or a number > 0"),
    "target_return": Key(optional(number()), None, "null or a number"),
}
TOP_KEYS = ("job", "runtime", "roles", "program", "program_args", "stop")
ROLE_NAME = "a role name of letters, digits, '_', '-'"

# Top-level shorthands, as the README writes them: `torchactors run job.yaml backend=ray address=...`
OVERRIDE_ALIASES = {"backend": "runtime.backend", "address": "runtime.address"}


# A constructor parameter annotated with ``torchactors.rl.gym_env.EnvSpec`` (``RolloutActor``'s and
# ``Learner``'s ``env``) takes an ``env:`` mapping of these keys (config.py checks them like a
# section, then makes one env from the spec).


def _wrappers(v: Any) -> list:
    if not isinstance(v, list):
        raise Invalid()
    for i, w in enumerate(v):
        ok = isinstance(w, str) or (isinstance(w, dict) and len(w) == 1 and isinstance(next(iter(w)), str)
                                    and isinstance(next(iter(w.values())), (dict, type(None))))
        if not ok:
            raise Invalid(f"item {i} is {w!r}")
    return copy.deepcopy(v)


ENV_KEYS: dict[str, Key] = {
    "id": Key(nonblank, REQUIRED, "a registered gymnasium id, e.g. CartPole-v1, BreakoutNoFrameskip-v4 "
              "(or an envpool task with vectorization: envpool)"),
    "num_envs": Key(integer(1), 1, "int >= 1: copies of the env in each actor"),
    "vectorization": Key(choice("sync", "async", "envpool"), "sync", "sync, async, envpool"),
    "kwargs": Key(keyword_args, {}, "a mapping of keyword arguments for gymnasium.make (or envpool's config)"),
    "wrappers": Key(_wrappers, [], "a list of wrapper names (a class of gymnasium.wrappers, or 'module:Class'), "
                    "each alone or as {Name: {keyword: value}}"),
}


