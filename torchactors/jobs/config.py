"""Load a job file, apply ``key=value`` overrides and validate it into a ``JobConfig``.

Box: what ``torchactors run``/``validate`` call first. One table-driven pass over the schema
(``schema.JOB_KEYS``, ``RUNTIME_KEYS``, ``ROLE_KEYS``, ``STOP_KEYS``) checks each section, fills
defaults and imports every ``class`` and ``program``, binds ``args`` to the constructors and
makes one env of each gymnasium env spec, so that a job that validates only fails later for
reasons of its own code. Every failure is a ``ConfigError`` naming file, line (or override),
dotted key and what is allowed.

The result is a frozen ``JobConfig`` dataclass tree; ``JobConfig.to_dict()`` gives the plain,
defaults-filled dict that programs see as ``job.config``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchactors._util import import_string
from torchactors.errors import ConfigError
from torchactors.jobs.imports import RUNNER_ARGS, plain_class
from torchactors.jobs.schema import (
    ENV_KEYS,
    JOB_KEYS,
    MAX_ACTORS,
    OVERRIDE_ALIASES,
    PROGRAM_KEY,
    REQUIRED,
    ROLE_KEYS,
    ROLE_NAME,
    ROLE_OPTIONS,
    RUNTIME_KEYS,
    STOP_KEYS,
    TOP_KEYS,
    Invalid,
    Key,
    keyword_args,
)
from torchactors.jobs.yamldoc import Doc, KeyPath, compose, config_error, show_path

logger = logging.getLogger(__name__)


# The sections of a validated job: every key of the schema's table filled (defaults are there, not here).


@dataclass(frozen=True)
class JobSection:
    name: str
    seed: int


@dataclass(frozen=True)
class RuntimeSection:
    backend: str
    address: str | None
    num_threads: int | None
    store_capacity: str | int | None
    start_method: str


@dataclass(frozen=True)
class RoleConfig:
    name: str
    class_path: str  # the YAML key is `class`
    replicas: int
    args: dict
    num_threads: int | None
    device: str
    max_restarts: int
    max_task_retries: int
    max_concurrency: int
    start_method: str | None
    restart_backoff: dict | None
    env: dict
    ray_options: dict
    start_timeout: float | None

    def actor_options(self) -> dict[str, Any]:
        """The options its actors start with (``ta.actor(**options)``): the role keys that are actor options."""
        return {name: getattr(self, name) for name in ROLE_OPTIONS}


@dataclass(frozen=True)
class StopSection:
    max_frames: int | None
    max_seconds: float | None
    target_return: float | None


@dataclass(frozen=True)
class JobConfig:
    """A validated job: every key present, defaults filled, every import checked."""

    job: JobSection
    runtime: RuntimeSection
    roles: dict[str, RoleConfig]
    program: str
    stop: StopSection
    program_args: dict = field(default_factory=dict)
    file: str = "<string>"
    overrides: tuple[str, ...] = ()

    @property
    def num_processes(self) -> int:
        """Actor processes the job starts (the driver not counted)."""
        return sum(r.replicas for r in self.roles.values())

    def to_dict(self) -> dict:
        """The plain dict programs see as ``job.config`` (YAML spelling: roles have ``class``)."""
        roles = {}
        for name, role in self.roles.items():
            d = dataclasses.asdict(role)
            del d["name"]
            roles[name] = {"class": d.pop("class_path"), **d}
        return {"job": dataclasses.asdict(self.job), "runtime": dataclasses.asdict(self.runtime),
                "roles": roles, "program": self.program, "program_args": copy.deepcopy(self.program_args),
                "stop": dataclasses.asdict(self.stop)}


# --------------------------------------------------------------------------- overrides


def _apply_override(doc: Doc, text: str) -> None:
    """Set ``dotted.path=value`` in ``doc.data``; the value is parsed as YAML (``3`` is an int)."""
    def fail(message: str, allowed: Any = None, key: str | None = None) -> ConfigError:
        return config_error(doc.file, message, override=text, key=key, allowed=allowed)

    dotted, sep, raw = text.partition("=")
    dotted = OVERRIDE_ALIASES.get(dotted.strip(), dotted.strip())
    path = tuple(dotted.split("."))
    if not sep or not all(re.fullmatch(r"[\w-]+", p) for p in path):
        raise fail("not of the form dotted.key=value", allowed="e.g. roles.rollout.replicas=3, stop.max_seconds=30")
    value_doc = Doc("")
    try:
        if raw.strip():
            compose(value_doc, raw)
    except ConfigError as e:
        reason = str(e).split(": ", 1)[-1].split("; allowed: ")[0]
        reason = reason[len("not valid YAML: "):] if reason.startswith("not valid YAML: ") else reason
        raise fail(f"the value {raw!r} is not valid YAML ({reason})", key=dotted,
                   allowed="a YAML scalar such as 3, 0.5, true, null, text, or a flow list/mapping") from None
    value = value_doc.data

    node = doc.data
    for i, seg in enumerate(path[:-1]):
        here = path[:i]
        if here == ("roles",) and seg not in node:
            raise fail(f"unknown role '{seg}'", allowed=sorted(node) or "(no roles defined)", key=dotted)
        if node.get(seg) is None:
            node[seg] = {}
            doc.overridden[path[:i + 1]] = text  # created by this override: errors below it name it
        elif not isinstance(node[seg], dict):
            raise fail(f"{'.'.join(path[:i + 1])} is a {type(node[seg]).__name__}, not a mapping", key=dotted,
                       allowed="a path through mappings")
        node = node[seg]
    if path[:-1] == ("roles",) and path[-1] not in node and not isinstance(value, dict):
        raise fail(f"unknown role '{path[-1]}'", allowed=sorted(node), key=dotted)
    node[path[-1]] = value
    for p in [p for p in doc.lines if p[:len(path)] == path]:
        del doc.lines[p]  # the file's lines below this key no longer describe its value
    doc.overridden[path] = text


# --------------------------------------------------------------------------- validation


def _section(doc: Doc, path: KeyPath, value: Any, keys: dict[str, Key]) -> dict:
    """Check a mapping against ``keys``: unknown keys, missing required ones, each value; fill defaults."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise doc.error(path, f"{show_path(path)} must be a mapping, got {_show(value)}", allowed=sorted(keys))
    for k in value:
        if k not in keys:
            where = f"in {show_path(path)}" if path else "at the top level"
            raise doc.error(path + (k,), f"unknown key '{k}' {where}", allowed=sorted(keys))
    out = {}
    for k, spec in keys.items():
        if k not in value:
            if spec.default is REQUIRED:
                raise doc.error(path, f"missing required key '{k}' in {show_path(path)}", allowed=spec.allowed)
            out[k] = copy.deepcopy(spec.default)
            continue
        try:
            out[k] = spec.check(value[k])
        except Invalid as e:
            reason = e.detail or f"got {_show(value[k])}"
            raise doc.error(path + (k,), f"{'.'.join(path + (k,))}: {reason}", allowed=spec.allowed) from None
    return out


def _show(v: Any) -> str:
    return "null" if v is None else f"{v!r} ({type(v).__name__})"


def _keywords(params: Iterable[inspect.Parameter]) -> tuple[set[str], bool]:
    """The names a call may pass by keyword, and whether it takes any (``**kwargs``)."""
    params = list(params)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _check_args(doc: Doc, role: str, cls_ref: str, args: dict) -> None:
    """Bind ``args`` to the class's ``__init__`` now, so a misspelt argument fails before any spawn."""
    cls = plain_class(import_string(cls_ref))
    if cls is None:
        return
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return  # no signature to check against (e.g. a C extension type)
    path = ("roles", role, "args")
    allowed = f"the arguments of {cls_ref}: " + (", ".join(str(p) for p in params.values()) or "(none)")
    by_name, takes_any = _keywords(params.values())
    for k in args:
        if k == "replica_index" and "replica_index" in by_name:
            raise doc.error(path + (k,), f"roles.{role}.args.replica_index is set by the runner for each replica",
                            allowed=allowed)
        if k not in by_name and not takes_any:
            raise doc.error(path + (k,), f"{cls_ref} takes no argument '{k}' (roles.{role}.args)", allowed=allowed)
    given = set(args) | (set(RUNNER_ARGS) & by_name)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in given
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise doc.error(path, f"{cls_ref} needs argument(s) {', '.join(missing)} in roles.{role}.args", allowed=allowed)


def _check_program(doc: Doc, ref: str, args: dict) -> None:
    """The program takes the job context, then ``program_args`` as keyword arguments."""
    fn = import_string(ref)
    try:
        signature = inspect.signature(fn)
    except ValueError:
        return  # builtins without a signature: let the call decide
    try:
        signature.bind(object())
    except TypeError:
        raise doc.error(("program",), f"program {ref} must take one argument, the job context",
                        allowed="def main(job, **options): ...") from None
    rest = list(signature.parameters.values())[1:]
    names, takes_any = _keywords(rest)
    allowed = f"the keyword arguments of {ref} after the job: " + (", ".join(str(p) for p in rest) or "(none)")
    for k in args:
        if k not in names and not takes_any:
            raise doc.error(("program_args", k), f"{ref} takes no argument '{k}' (program_args)", allowed=allowed)


# --------------------------------------------------------------------------- gymnasium env specs
# An ``env:`` argument (schema.ENV_KEYS) is checked like a section; then ``gym_env.check_spec``
# makes one env from it, so that a wrong id, bad kwargs, an unknown wrapper, an unsupported
# space or a missing optional package fails at validate time, at its line.


def _env_params(cls_ref: str) -> list[str]:
    """The constructor parameters of the role's class that take an env spec."""
    cls = plain_class(import_string(cls_ref))
    try:
        params = inspect.signature(cls).parameters if cls is not None else {}
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if re.search(r"\bEnvSpec\b", p.annotation if isinstance(p.annotation, str)
                                                     else repr(p.annotation))]


def _check_env_args(doc: Doc, role: str, cls_ref: str, args: dict, seen: dict) -> None:
    """Check each env spec in ``args`` (defaults filled in place) by making one env from it; its
    spaces must be those of the specs ``seen`` in earlier roles (the learner's model is the actors')."""
    for name in _env_params(cls_ref):
        if args.get(name) is None:
            continue
        path = ("roles", role, "args", name)
        args[name] = spec = _section(doc, path, args[name], ENV_KEYS)
        from torchactors.rl.gym_env import EnvSpecError, check_spec  # imports gymnasium only if installed

        try:
            spaces = check_spec(spec)
        except EnvSpecError as e:
            raise doc.error(path + e.path, f"{show_path(path)}: {e.message}", allowed=e.allowed) from None
        for other, other_spaces in seen.items():
            if other_spaces != spaces:
                raise doc.error(path, f"{show_path(path)} gives observations {spaces.obs_shape} {spaces.obs_dtype} and "
                                f"{spaces.num_actions} actions, but {show_path(other)} gives {other_spaces.obs_shape} "
                                f"{other_spaces.obs_dtype} and {other_spaces.num_actions}: their models would differ",
                                allowed="the same env in every role (write it once: env: &env {...}, then env: *env)")
        seen[path] = spaces


def _validate(doc: Doc, overrides: Sequence[str]) -> JobConfig:
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error((), f"the job file must be a mapping, got {_show(data)}", allowed=TOP_KEYS)
    for k in data:
        if k not in TOP_KEYS:
            raise doc.error((k,), f"unknown key '{k}' at the top level", allowed=sorted(TOP_KEYS))
    for k in ("job", "roles", "program"):
        if k not in data:
            raise doc.error((), f"missing required key '{k}' at the top level",
                            allowed={"job": "a mapping with name (and seed)", "roles": "a mapping of roles",
                                     "program": PROGRAM_KEY.allowed}[k])
    job = _section(doc, ("job",), data["job"], JOB_KEYS)
    runtime = _section(doc, ("runtime",), data.get("runtime"), RUNTIME_KEYS)
    if runtime["address"] is not None and runtime["backend"] != "ray":
        raise doc.error(("runtime", "address"), "runtime.address is only used with backend: ray",
                        allowed="null with backend local")
    if runtime["backend"] == "ray" and importlib.util.find_spec("ray") is None:
        raise doc.error(("runtime", "backend"), "backend: ray needs Ray, which is not installed here "
                        "(pip install 'torchactors[ray]')", allowed="local, or ray once Ray is installed")
    stop = _section(doc, ("stop",), data.get("stop"), STOP_KEYS)

    roles_raw = data["roles"]
    if not isinstance(roles_raw, dict) or not roles_raw:
        raise doc.error(("roles",), f"roles must be a non-empty mapping of role name to role, got {_show(roles_raw)}",
                        allowed="role_name: {class: 'module:Class', ...}")
    roles = {}
    env_spaces: dict = {}  # env spec path -> its spaces, so that the roles' models agree
    for name, body in roles_raw.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            raise doc.error(("roles", name), f"role name '{name}' cannot name actors", allowed=ROLE_NAME)
        if not isinstance(body, dict):
            raise doc.error(("roles", name), f"roles.{name} must be a mapping, got {_show(body)}",
                            allowed=sorted(ROLE_KEYS))
        role = _section(doc, ("roles", name), body, ROLE_KEYS)
        _check_args(doc, name, role["class"], role["args"])
        _check_env_args(doc, name, role["class"], role["args"], env_spaces)
        roles[name] = RoleConfig(name=name, class_path=role.pop("class"), **role)
        total = sum(r.replicas for r in roles.values())
        if total > MAX_ACTORS:
            raise doc.error(("roles", name, "replicas"), f"roles up to {name} add up to {total} actor processes, "
                            f"more than a job can hold", allowed=f"at most {MAX_ACTORS} replicas over all roles")

    try:
        program = PROGRAM_KEY.check(data["program"])
    except Invalid as e:
        raise doc.error(("program",), f"program: {e.detail or 'got ' + _show(data['program'])}",
                        allowed=PROGRAM_KEY.allowed) from None
    raw_args = data.get("program_args")
    try:
        program_args = keyword_args({} if raw_args is None else raw_args)
    except Invalid:
        raise doc.error(("program_args",), "program_args must be a mapping of keyword arguments, "
                        f"got {_show(raw_args)}", allowed="{name: value, ...}") from None
    _check_program(doc, program, program_args)
    return JobConfig(job=JobSection(**job), runtime=RuntimeSection(**runtime), roles=roles, program=program,
                     stop=StopSection(**stop), program_args=program_args, file=doc.file, overrides=tuple(overrides))


def parse_config(text: str, file: str = "<string>", overrides: Iterable[str] = ()) -> JobConfig:
    """Validate job YAML given as text (``file`` only names it in messages)."""
    overrides = list(overrides)
    doc = Doc(file)
    compose(doc, text)
    if isinstance(doc.data, dict):
        for text_ in overrides:
            _apply_override(doc, text_)
    return _validate(doc, overrides)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Load, override and validate a job file; ``ConfigError`` names file, line, key and what is allowed."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise config_error(file, f"cannot read the job file: {e.strerror or e}",
                            allowed="a readable YAML file") from None
    except UnicodeDecodeError as e:
        raise config_error(file, f"not UTF-8 text ({e.reason})", allowed="a UTF-8 YAML file") from None
    cfg = parse_config(text, file, overrides)
    logger.debug("loaded %s: %d roles, %d processes", file, len(cfg.roles), cfg.num_processes)
    return cfg
