"""Actor options: the one schema of what ``@ta.actor(...)``, ``.options(...)`` and a job file's role take.

Box: read by the decorator and ``.options()`` (``check``), by the backends when an actor starts
(``resolve``, ``default_num_threads``) and by the job files (``OPTIONS`` entries with ``allowed``
words are the option keys of a role, docs/yaml.md lists them). Each option is one ``Option``
row: its name, its default, its check (a ``ValueError`` saying what is wrong) and, for the ones a
job file may set, the allowed values in words. A leaf of the actors layer: it imports only the
runtime's restart and start-method rules and the store's process limit, below it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchactors.runtime.supervisor import START_METHODS, Backoff, check_start_method
from torchactors.store.registry import MAX_PROCS

logger = logging.getLogger(__name__)

DEVICE = re.compile(r"cpu|cuda(:\d+)?")     # an actor's device, as options and job files spell it
ASYNC_DEFAULT_CONCURRENCY = 1000    # Ray's default max_concurrency for an actor with async methods
MAX_ACTORS = MAX_PROCS - 1          # actor processes one job can hold: the driver takes one index
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def default_num_threads(started: int) -> int:
    """Intra-op threads of a process whose ``num_threads`` is None: this machine's cores divided
    among the driver, the ``started`` actors its runtime started before and this one (the driver
    itself, with ``started=0``, gets half). Oversubscribed threads cost 30x on a 2-core machine."""
    return max(1, (os.cpu_count() or 1) // (started + 2))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(name: str) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not _is_int(v) or v < -1:
            raise ValueError(f"{name} must be an int >= 0, or -1 for unlimited, not {v!r}")
        return v
    return check


def _num_threads(v: Any) -> int | None:
    if v is not None and (not _is_int(v) or v < 1):
        raise ValueError(f"num_threads must be a positive int or None, not {v!r}")
    return v


def _max_concurrency(v: Any) -> int | None:
    if v is not None and (not _is_int(v) or v < 1):
        raise ValueError(f"max_concurrency must be an int >= 1, not {v!r}")
    return v


def _device(v: Any) -> str:
    if not isinstance(v, str) or not DEVICE.fullmatch(v):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {v!r}")
    return v


def start_method(v: Any) -> str:
    """A start method the supervisor has; fork and forkserver are refused with the reason."""
    if v in ("fork", "forkserver"):
        raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, not {v!r}: fork copies the "
                         "parent mid-flight, with any CUDA context and the locks of running threads (torch's "
                         "intra-op pool, the runtime's transport threads), and the child can deadlock or crash; "
                         "forkserver forks a server that may have run torch code too. Use zygote (forks from a "
                         "fresh interpreter that has imported torch, never initialized CUDA and runs one thread) "
                         "or spawn")
    return check_start_method(v)


def _start_method(v: Any) -> str | None:
    return None if v is None else start_method(v)


def _restart_backoff(v: Any) -> Any:
    Backoff.parse(v)
    return None if v is None else dict(v) if isinstance(v, dict) else v


def _name(v: Any) -> str | None:
    """Ray's check and messages: a non-str is a TypeError, an empty name a ValueError."""
    if v is not None and not isinstance(v, str):
        raise TypeError(f"name must be None or a string, got: '{type(v)}'")
    if v == "":
        raise ValueError("Actor name cannot be an empty string; pass a non-empty name, or None for no name")
    return v


def _namespace(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise TypeError(f"namespace must be None or a string, got: '{type(v)}'")
    if v == "":
        raise ValueError('"" is not a valid namespace. Pass None to not specify a namespace')
    return v


def _lifetime(v: Any) -> str | None:
    if v not in (None, "detached", "non_detached"):
        raise ValueError(f"lifetime must be None, 'detached' or 'non_detached', not {v!r}")
    return v


def _env(v: Any) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"env must be a dict of environment variable names to str values, not {v!r}")
    for k, val in v.items():
        if not isinstance(k, str) or not _ENV_NAME.fullmatch(k):
            raise ValueError(f"env: {k!r} is not an environment variable name")
        if not isinstance(val, str):
            raise ValueError(f"env: {k} is {val!r} ({type(val).__name__}); values are strings (in a job file, "
                             f"quote the value: {k}: \"...\")")
    return dict(v)


def _ray_options(v: Any) -> dict | None:
    if v is not None and (not isinstance(v, dict) or not all(isinstance(k, str) and k.isidentifier() for k in v)):
        raise ValueError(f"ray_options must be a dict of Ray actor options (keyword names), not {v!r}")
    return None if v is None else dict(v)


def _runtime_env(v: Any) -> dict | None:
    if v is not None and (not isinstance(v, dict) or set(v) - {"env_vars"}):
        raise ValueError(f"runtime_env: only {{'env_vars': {{...}}}} is supported on one machine, not {v!r}")
    if v is not None:
        _env(v.get("env_vars"))
    return v


def _any(v: Any) -> Any:
    return v


_SAME = object()    # job_default: the option's default


@dataclass(frozen=True)
class Option:
    """One actor option. ``allowed`` (its values in words) is set for the options a job file's
    role may write; ``job_default`` is the value a job file shows when the role leaves it out,
    where that is spelled differently from the Python default."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    allowed: str = ""
    job_default: Any = _SAME

    @property
    def in_job_file(self) -> bool:
        return bool(self.allowed)

    @property
    def role_default(self) -> Any:
        return self.default if self.job_default is _SAME else self.job_default


_COUNT = "int >= 0, or -1 for unlimited"
OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("num_threads", None, _num_threads, "null (runtime default) or int >= 1"),
    Option("device", "cpu", _device, "cpu, cuda, cuda:N"),
    Option("max_restarts", 0, _count("max_restarts"), _COUNT),
    Option("max_task_retries", 0, _count("max_task_retries"), _COUNT),
    # None: 1, or ASYNC_DEFAULT_CONCURRENCY for a class with async methods; a job file says 1
    Option("max_concurrency", None, _max_concurrency, "int >= 1", job_default=1),
    Option("start_method", None, _start_method, "null (runtime.start_method) or " + ", ".join(START_METHODS)),
    Option("restart_backoff", None, _restart_backoff,
           "null (the defaults) or a mapping with some of fast, initial, max, reset_after"),
    Option("env", None, _env, "a mapping of environment variable names to strings", job_default={}),
    Option("ray_options", None, _ray_options, "a mapping of Ray actor options (backend: ray only)", job_default={}),
    Option("name", None, _name),
    Option("namespace", None, _namespace),
    Option("lifetime", None, _lifetime),
    Option("get_if_exists", False, _any),
    Option("runtime_env", None, _runtime_env),
    # Ray's placement hints: accepted so that Ray code runs; on the local backend one machine has
    # no scheduler, so they are not enforced (num_gpus >= 1 selects device "cuda", see README).
    *(Option(hint, None, _any) for hint in ("num_cpus", "num_gpus", "resources", "memory", "object_store_memory",
                                            "accelerator_type", "scheduling_strategy")),
)}
DEFAULTS: dict[str, Any] = {name: o.default for name, o in OPTIONS.items()}
REFUSED = {
    "concurrency_groups": "concurrency groups are not supported; use max_concurrency (one pool for all "
                          "methods) or separate actors",
    "max_pending_calls": "max_pending_calls is not supported; callers are not throttled",
}


def check(options: dict) -> dict:
    """The given options, checked (and mappings copied); TypeError for an unknown one (and, as
    in Ray, for a name or namespace that is not a str), ValueError naming the option and what it
    takes for a bad value."""
    for key, why in REFUSED.items():
        if key in options:
            raise ValueError(f"actor option {key!r}: {why}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown actor option(s) {sorted(unknown)}; allowed: {sorted(OPTIONS)}")
    out = {key: OPTIONS[key].check(value) for key, value in options.items()}
    if out.get("get_if_exists") and out.get("name") is None and "name" in options:
        raise ValueError("get_if_exists=True needs a name: .options(name='x', get_if_exists=True)")
    return out


def resolve(options: dict, is_async: bool) -> dict:
    """The options an actor starts with (all of them, checked): Ray's spellings mapped onto ours
    and the class-dependent default of ``max_concurrency`` filled in. ``num_threads`` stays None
    for the backend to fill with ``default_num_threads``."""
    o = {**DEFAULTS, **options}
    if o["max_concurrency"] is None:
        o["max_concurrency"] = ASYNC_DEFAULT_CONCURRENCY if is_async else 1
    if o["num_gpus"] and o["device"] == "cpu":
        o["device"] = "cuda"
    if o["runtime_env"]:
        o["env"] = {**o["runtime_env"].get("env_vars", {}), **(o["env"] or {})}
    if o["lifetime"] == "non_detached":
        o["lifetime"] = None
    return o
