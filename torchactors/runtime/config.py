"""YAML job files: load them, apply ``key=value`` overrides, validate, and say where a mistake is.

Box: the input of the top layer (``torchactors run``/``validate``). A job file is composed into
YAML nodes rather than loaded straight to dicts, so every mapping key keeps the line it was
written on; overrides are applied to the plain data and remember their own text. One
table-driven pass (``JOB_KEYS``, ``RUNTIME_KEYS``, ``ROLE_KEYS``, ``STOP_KEYS``) then checks
each section, fills defaults and imports every ``class`` and ``program``, so that a job that
validates only fails later for reasons of its own code. Every failure is a ``ConfigError``
whose message names the file, the line (or the override), the dotted key and what is allowed.

The result is a frozen ``JobConfig`` dataclass tree; ``JobConfig.to_dict()`` gives the plain,
defaults-filled dict that programs see as ``job.config``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torchactors.actors.options import MAX_ACTORS, OPTIONS, START_METHODS, Option, start_method
from torchactors.errors import ConfigError
from torchactors.store import parse_size

log = logging.getLogger(__name__)

_REQUIRED = object()  # sentinel default: the key must be given

Path_ = tuple[str, ...]


# --------------------------------------------------------------------------- value checks


class _Invalid(Exception):
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


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not _is_int(v) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise _Invalid()
        return v
    return check


def _float(positive: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if not (_is_int(v) or isinstance(v, float)):
            raise _Invalid()
        try:
            f = float(v)
        except OverflowError:
            raise _Invalid(f"{v} is too large for a number") from None
        if not math.isfinite(f) or (positive and f <= 0):
            raise _Invalid()
        return f
    return check


def _optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)
    return check


def _choice(*values: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in values:
            raise _Invalid()
        return v
    return check


def _name(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v):
        raise _Invalid()
    return v


def _size(v: Any) -> str | int:
    """A store capacity as ``ta.init`` reads it (the store's own parser), and positive."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _Invalid()
    try:
        n = parse_size(v)
    except (ValueError, OverflowError):
        raise _Invalid() from None
    if n <= 0:
        raise _Invalid()
    return v  # kept as written: ta.init takes "4GiB" as well as bytes


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Invalid()
    return v


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A check that raises ValueError (an actor option's, in actors/options.py), its reason kept."""
    def run(v: Any) -> Any:
        try:
            return check(v)
        except ValueError as e:
            raise _Invalid(str(e)) from None
    return run


def _option(option: Option) -> Callable[[Any], Any]:
    """An actor option as a role key: its own check; null means the role's default."""
    check = _checked(option.check)

    def run(v: Any) -> Any:
        value = check(v)
        return copy.deepcopy(option.role_default) if value is None else value
    return run


def _kwargs(v: Any) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) and k.isidentifier() for k in v):
        raise _Invalid()
    return copy.deepcopy(v)


def _import_ref(what: str) -> Callable[[Any], str]:
    """Check a ``module:attr`` string and import it now, so a typo fails at validate time."""
    def check(v: Any) -> str:
        if not isinstance(v, str) or not re.fullmatch(r"[\w.]+:[\w.]+", v):
            raise _Invalid()
        try:
            obj = import_string(v)
        except ImportError as e:
            raise _Invalid(str(e)) from None
        if what == "class" and not (inspect.isclass(obj) or _is_actor_class(obj)):
            raise _Invalid(f"{v} is a {type(obj).__name__}, not a class")
        if what == "function" and not callable(obj):
            raise _Invalid(f"{v} is a {type(obj).__name__}, not callable")
        return v
    return check


# --------------------------------------------------------------------------- the schema

MAX_PROCESSES = MAX_ACTORS     # actor processes one job can hold
START_TIMEOUT_S = 120.0     # default seconds a role's constructors may take

JOB_KEYS: dict[str, Key] = {
    "name": Key(_name, _REQUIRED, "a name of letters, digits, '_', '-', '.'"),
    "seed": Key(_int(-(1 << 63), (1 << 64) - 1), 0, "int from -2**63 to 2**64 - 1"),
}
RUNTIME_KEYS: dict[str, Key] = {
    "backend": Key(_choice("local", "ray"), "local", "local, ray"),
    "address": Key(_optional(_text), None,
                   "null or a Ray address string (backend ray only)"),
    "num_threads": Key(_optional(_int(1)), None, "null (runtime default) or int >= 1"),
    "store_capacity": Key(_optional(_size), None,
                          "null (runtime default) or a size: bytes as int, or a string like 4GiB, 512MiB"),
    "start_method": Key(_checked(start_method), "zygote", ", ".join(START_METHODS)),
}
ROLE_KEYS: dict[str, Key] = {
    "class": Key(_import_ref("class"), _REQUIRED, "'module:Class', importable"),
    "replicas": Key(_int(1, MAX_PROCESSES), 1, f"int >= 1, at most {MAX_PROCESSES} (actor processes in a job)"),
    "args": Key(_kwargs, {}, "a mapping of keyword arguments for the class"),
    # the options of the role's actors, as the decorator takes them
    **{o.name: Key(_option(o), o.role_default, o.allowed) for o in OPTIONS.values() if o.in_job_file},
    "start_timeout": Key(_optional(_float(positive=True)), START_TIMEOUT_S,
                         "seconds > 0 the constructors may take, or null (wait for ever)"),
}
ROLE_OPTIONS = tuple(o.name for o in OPTIONS.values() if o.in_job_file)
PROGRAM_KEY = Key(_import_ref("function"), _REQUIRED, "'module:function', importable, taking the job context")
STOP_KEYS: dict[str, Key] = {
    "max_frames": Key(_optional(_int(1)), None, "null or int >= 1"),
    "max_seconds": Key(_optional(_float(positive=True)), None, "null or a number > 0"),
    "target_return": Key(_optional(_float()), None, "null or a number"),
}
TOP_KEYS = ("job", "runtime", "roles", "program", "program_args", "stop")
_ROLE_NAME = "a role name of letters, digits, '_', '-'"

# Top-level shorthands, as the README writes them: `torchactors run job.yaml backend=ray address=...`
OVERRIDE_ALIASES = {"backend": "runtime.backend", "address": "runtime.address"}


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class JobSection:
    name: str
    seed: int = 0


@dataclass(frozen=True)
class RuntimeSection:
    backend: str = "local"
    address: str | None = None
    num_threads: int | None = None
    store_capacity: str | int | None = None
    start_method: str = "zygote"


@dataclass(frozen=True)
class RoleConfig:
    """A role, every key of ``ROLE_KEYS`` filled (their defaults are there, not here)."""

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
    max_frames: int | None = None
    max_seconds: float | None = None
    target_return: float | None = None


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


# --------------------------------------------------------------------------- imports


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


def _is_actor_class(obj: Any) -> bool:
    """An already ``@ta.actor``-decorated class: it has ``remote`` and ``options``."""
    return callable(getattr(obj, "remote", None)) and callable(getattr(obj, "options", None))


def plain_class(obj: Any) -> type | None:
    """The user's class behind ``obj`` (itself, or the class an ``@ta.actor`` wrapper holds)."""
    if not _is_actor_class(obj):
        return obj if inspect.isclass(obj) else None
    for attr in ("__wrapped__", "cls", "_cls", "_class", "user_class"):
        inner = getattr(obj, attr, None)
        if inspect.isclass(inner) and not _is_actor_class(inner):
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


# --------------------------------------------------------------------------- YAML with lines


def _config_error(file: str, message: str, *, line: int | None = None, override: str | None = None,
                  key: str | None = None, allowed: Any = None) -> ConfigError:
    """One message shape for every mistake: ``file:line: what; allowed: ...`` (or the override for a line)."""
    if isinstance(allowed, (list, tuple)):
        allowed = tuple(allowed)
    where = f"{file}: override '{override}'" if override is not None else (f"{file}:{line}" if line else file)
    allowed_text = ", ".join(allowed) if isinstance(allowed, tuple) else allowed
    return ConfigError(f"{where}: {message}" + (f"; allowed: {allowed_text}" if allowed_text else ""),
                       file=file, line=line, key=key, allowed=allowed)


class _Doc:
    """Plain data of a job file, plus where each key came from (a line, or an override)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.data: Any = None
        self.lines: dict[Path_, int] = {}
        self.overridden: dict[Path_, str] = {}

    def where(self, path: Path_) -> tuple[int | None, str | None]:
        """The line or override that set ``path`` or, failing that, its nearest ancestor."""
        for i in range(len(path), -1, -1):
            p = path[:i]
            if p in self.overridden:
                return None, self.overridden[p]
            if p in self.lines:
                return self.lines[p], None
        return 1, None

    def error(self, path: Path_, message: str, allowed: Any = None) -> ConfigError:
        line, override = self.where(path)
        return _config_error(self.file, message, line=line, override=override, key=".".join(path) or None,
                             allowed=allowed)


MAX_DEPTH = 64                  # nesting of lists and mappings in a job file
MAX_ALIAS_NODES = 10_000        # nodes that aliases and merges may repeat, per file
_TAG = "tag:yaml.org,2002:"
# Tags a job file may write on a scalar (``!!str 5``); any other tag, and any tag on a list
# or mapping, is refused rather than ignored or turned into some other type.
SCALAR_TAGS = {_TAG + t: "!!" + t for t in ("str", "int", "float", "bool", "null")}


def _compose(doc: _Doc, text: str) -> None:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise _config_error(doc.file, f"not valid YAML: {e.problem or e}", line=line,
                            allowed="YAML: key: value lines, indented by spaces") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, max(0, e.position)) + 1
        what = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise _config_error(doc.file, f"not valid YAML: the character {what} cannot appear in YAML "
                            "(control characters other than tab and newline)", line=line,
                            allowed="printable text; write such characters as escapes in a double-quoted "
                                    "string, e.g. \"\\x01\"") from None
    except yaml.YAMLError as e:
        raise _config_error(doc.file, f"not valid YAML: {e}", line=1, allowed="YAML text") from None
    except RecursionError:
        raise _config_error(doc.file, "not valid YAML here: lists or mappings are nested too deeply", line=1,
                            allowed=f"at most {MAX_DEPTH} levels of nesting") from None
    if node is None:
        raise _config_error(doc.file, "the job file is empty", line=1, allowed=TOP_KEYS)
    doc.lines[()] = node.start_mark.line + 1
    try:
        doc.data = _Builder(doc).build(node, ())
    except RecursionError:      # merges nested in merges: deep without a long path
        raise _config_error(doc.file, "mappings merged into mappings (<<) are nested too deeply", line=1,
                            allowed=f"at most {MAX_DEPTH} levels of nesting") from None


class _Builder:
    """Plain data from composed YAML nodes, recording the line of each mapping key and
    refusing duplicates, tags other than plain scalar ones, recursive aliases and alias
    bombs. Time is linear in the file plus the nodes that aliases repeat, which are counted
    against ``MAX_ALIAS_NODES`` (a 1 KB file can otherwise expand to 10^9 nodes)."""

    def __init__(self, doc: _Doc) -> None:
        self.doc = doc
        self.ctor = yaml.constructor.SafeConstructor()
        self.resolver = yaml.resolver.Resolver()
        self.seen: set[int] = set()
        self.open: set[int] = set()     # nodes being built: meeting one again is a cycle
        self.repeats = 0

    def fail(self, node: yaml.Node | None, path: Path_, message: str, allowed: Any) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else self.doc.where(path)[0]
        return _config_error(self.doc.file, message, line=line, key=".".join(path) or None, allowed=allowed)

    def build(self, node: yaml.Node, path: Path_) -> Any:
        key = id(node)
        if key in self.open:
            raise self.fail(None, path, f"{_dotted(path)} is an alias of a node that contains it (a recursive "
                            "alias)", allowed="aliases (*name) of anchors (&name) defined outside them")
        if len(self.open) >= MAX_DEPTH:   # lists and mappings being built, merged ones too
            raise self.fail(node, path, f"{_dotted(path)} is nested more than {MAX_DEPTH} levels deep",
                            allowed=f"at most {MAX_DEPTH} levels of lists and mappings")
        if key in self.seen:
            self.repeats += 1
            if self.repeats > MAX_ALIAS_NODES:
                raise self.fail(None, path, f"aliases repeat more than {MAX_ALIAS_NODES} nodes (at "
                                f"{_dotted(path)}): an alias bomb?", allowed=f"aliases and merges that "
                                f"repeat at most {MAX_ALIAS_NODES} nodes in all")
        else:
            self.seen.add(key)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        self.open.add(key)
        try:
            if isinstance(node, yaml.SequenceNode):
                self.untagged(node, path, _TAG + "seq", "list")
                return [self.build(item, path + (str(i),)) for i, item in enumerate(node.value)]
            self.untagged(node, path, _TAG + "map", "mapping")
            return self.mapping(node, path)
        finally:
            self.open.discard(key)

    def untagged(self, node: yaml.Node, path: Path_, plain: str, what: str) -> None:
        if node.tag != plain:
            raise self.fail(node, path, f"{_dotted(path)}: the tag {_short(node.tag)} on a {what} is not used in "
                            "job files", allowed=f"a plain {what}, without a tag")

    def scalar(self, node: yaml.ScalarNode, path: Path_) -> Any:
        implicit = self.resolver.resolve(yaml.ScalarNode, node.value, (node.style is None, node.style is not None))
        if node.tag != implicit and node.tag not in SCALAR_TAGS:
            raise self.fail(node, path, f"{_dotted(path)}: the tag {_short(node.tag)} is not used in job files",
                            allowed="no tag, or one of " + ", ".join(SCALAR_TAGS.values()))
        if node.tag in (_TAG + "merge", _TAG + "value"):
            return node.value       # `<<` or `=` written as a value is just text
        try:
            return self.ctor.construct_object(node, deep=True)
        except Exception as e:      # e.g. `!!int abc`, `!!bool maybe`, a timestamp with month 13
            reason = getattr(e, "problem", None) or e
            raise self.fail(node, path, f"{_dotted(path)}: {node.value!r} is not a valid "
                            f"{SCALAR_TAGS.get(node.tag, _short(node.tag))} ({reason})",
                            allowed=f"a value that {_short(node.tag)} can read") from None

    def mapping(self, node: yaml.MappingNode, path: Path_) -> dict:
        seen: dict[Any, int] = {}
        merges: list[yaml.Node] = []
        pairs = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "merge":
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _with_line(self.doc, path, "?", line, f"keys must be plain strings in {_dotted(path)}")
            key = self.scalar(key_node, path)
            if not isinstance(key, str):
                raise _with_line(self.doc, path, str(key), line,
                                 f"key {key!r} in {_dotted(path)} is a {type(key).__name__}; keys must be strings")
            if key in seen:
                raise _with_line(self.doc, path, key, line, f"duplicate key '{key}' in {_dotted(path)} "
                                 f"(first at line {seen[key]})")
            seen[key] = line
            pairs.append((key, line, value_node))
        out: dict = {}
        for merged in merges:       # `<<: *a` or `<<: [*a, *b]`: keys of earlier mappings win
            for source in (merged.value if isinstance(merged, yaml.SequenceNode) else [merged]):
                if not isinstance(source, yaml.MappingNode):
                    raise self.fail(source, path, f"{_dotted(path)}: `<<` merges mappings, not "
                                    f"{'a list' if isinstance(source, yaml.SequenceNode) else repr(source.value)}",
                                    allowed="<<: *anchor, or <<: [*anchor1, *anchor2], of mappings")
                for k, v in self.build(source, path).items():
                    out.setdefault(k, v)
        for key, line, value_node in pairs:    # this mapping's own keys win over merged ones
            self.doc.lines[path + (key,)] = line
            out[key] = self.build(value_node, path + (key,))
        return out


def _short(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


def _with_line(doc: _Doc, path: Path_, key: Any, line: int, message: str) -> ConfigError:
    """An error at an explicit line (duplicate and non-string keys have no entry in ``doc.lines``)."""
    return _config_error(doc.file, message, line=line, key=".".join(path + (str(key),)),
                         allowed="each key once, as a string")


def _dotted(path: Path_) -> str:
    return ".".join(path) if path else "the top level"


# --------------------------------------------------------------------------- overrides


def _apply_override(doc: _Doc, text: str) -> None:
    """Set ``dotted.path=value`` in ``doc.data``; the value is parsed as YAML (``3`` is an int)."""
    def fail(message: str, allowed: Any = None, key: str | None = None) -> ConfigError:
        return _config_error(doc.file, message, override=text, key=key, allowed=allowed)

    dotted, sep, raw = text.partition("=")
    dotted = OVERRIDE_ALIASES.get(dotted.strip(), dotted.strip())
    path = tuple(dotted.split("."))
    if not sep or not all(re.fullmatch(r"[\w-]+", p) for p in path):
        raise fail("not of the form dotted.key=value", allowed="e.g. roles.rollout.replicas=3, stop.max_seconds=30")
    value_doc = _Doc("")
    try:
        if raw.strip():
            _compose(value_doc, raw)
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


def _section(doc: _Doc, path: Path_, value: Any, keys: dict[str, Key]) -> dict:
    """Check a mapping against ``keys``: unknown keys, missing required ones, each value; fill defaults."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise doc.error(path, f"{_dotted(path)} must be a mapping, got {_show(value)}", allowed=sorted(keys))
    for k in value:
        if k not in keys:
            where = f"in {_dotted(path)}" if path else "at the top level"
            raise doc.error(path + (k,), f"unknown key '{k}' {where}", allowed=sorted(keys))
    out = {}
    for k, spec in keys.items():
        if k not in value:
            if spec.default is _REQUIRED:
                raise doc.error(path, f"missing required key '{k}' in {_dotted(path)}", allowed=spec.allowed)
            out[k] = copy.deepcopy(spec.default)
            continue
        try:
            out[k] = spec.check(value[k])
        except _Invalid as e:
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


def _check_args(doc: _Doc, role: str, cls_ref: str, args: dict) -> None:
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


def _check_program(doc: _Doc, ref: str, args: dict) -> None:
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
# A constructor parameter annotated with ``torchactors.rl.gym_env.EnvSpec`` (``RolloutActor``'s and
# ``Learner``'s ``env``) takes an ``env:`` mapping. Its keys are checked here like any section;
# then ``gym_env.check_spec`` makes one env from it, so that a wrong id, bad kwargs, an unknown
# wrapper, an unsupported space or a missing optional package fails at validate time, at its line.


def _wrappers(v: Any) -> list:
    if not isinstance(v, list):
        raise _Invalid()
    for i, w in enumerate(v):
        ok = isinstance(w, str) or (isinstance(w, dict) and len(w) == 1 and isinstance(next(iter(w)), str)
                                    and isinstance(next(iter(w.values())), (dict, type(None))))
        if not ok:
            raise _Invalid(f"item {i} is {w!r}")
    return copy.deepcopy(v)


ENV_KEYS: dict[str, Key] = {
    "id": Key(_text, _REQUIRED, "a registered gymnasium id, e.g. CartPole-v1, BreakoutNoFrameskip-v4 "
              "(or an envpool task with vectorization: envpool)"),
    "num_envs": Key(_int(1), 1, "int >= 1: copies of the env in each actor"),
    "vectorization": Key(_choice("sync", "async", "envpool"), "sync", "sync, async, envpool"),
    "kwargs": Key(_kwargs, {}, "a mapping of keyword arguments for gymnasium.make (or envpool's config)"),
    "wrappers": Key(_wrappers, [], "a list of wrapper names (a class of gymnasium.wrappers, or 'module:Class'), "
                    "each alone or as {Name: {keyword: value}}"),
}


def _env_params(cls_ref: str) -> list[str]:
    """The constructor parameters of the role's class that take an env spec."""
    cls = plain_class(import_string(cls_ref))
    try:
        params = inspect.signature(cls).parameters if cls is not None else {}
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if re.search(r"\bEnvSpec\b", p.annotation if isinstance(p.annotation, str)
                                                     else repr(p.annotation))]


def _check_env_args(doc: _Doc, role: str, cls_ref: str, args: dict, seen: dict) -> None:
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
            raise doc.error(path + e.path, f"{_dotted(path)}: {e.message}", allowed=e.allowed) from None
        for other, other_spaces in seen.items():
            if other_spaces != spaces:
                raise doc.error(path, f"{_dotted(path)} gives observations {spaces.obs_shape} {spaces.obs_dtype} and "
                                f"{spaces.num_actions} actions, but {_dotted(other)} gives {other_spaces.obs_shape} "
                                f"{other_spaces.obs_dtype} and {other_spaces.num_actions}: their models would differ",
                                allowed="the same env in every role (write it once: env: &env {...}, then env: *env)")
        seen[path] = spaces


def _validate(doc: _Doc, overrides: Sequence[str]) -> JobConfig:
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
            raise doc.error(("roles", name), f"role name '{name}' cannot name actors", allowed=_ROLE_NAME)
        if not isinstance(body, dict):
            raise doc.error(("roles", name), f"roles.{name} must be a mapping, got {_show(body)}",
                            allowed=sorted(ROLE_KEYS))
        role = _section(doc, ("roles", name), body, ROLE_KEYS)
        _check_args(doc, name, role["class"], role["args"])
        _check_env_args(doc, name, role["class"], role["args"], env_spaces)
        roles[name] = RoleConfig(name=name, class_path=role.pop("class"), **role)
        total = sum(r.replicas for r in roles.values())
        if total > MAX_PROCESSES:
            raise doc.error(("roles", name, "replicas"), f"roles up to {name} add up to {total} actor processes, "
                            f"more than a job can hold", allowed=f"at most {MAX_PROCESSES} replicas over all roles")

    try:
        program = PROGRAM_KEY.check(data["program"])
    except _Invalid as e:
        raise doc.error(("program",), f"program: {e.detail or 'got ' + _show(data['program'])}",
                        allowed=PROGRAM_KEY.allowed) from None
    raw_args = data.get("program_args")
    try:
        program_args = _kwargs({} if raw_args is None else raw_args)
    except _Invalid:
        raise doc.error(("program_args",), "program_args must be a mapping of keyword arguments, "
                        f"got {_show(raw_args)}", allowed="{name: value, ...}") from None
    _check_program(doc, program, program_args)
    return JobConfig(job=JobSection(**job), runtime=RuntimeSection(**runtime), roles=roles, program=program,
                     stop=StopSection(**stop), program_args=program_args, file=doc.file, overrides=tuple(overrides))


def parse_config(text: str, file: str = "<string>", overrides: Iterable[str] = ()) -> JobConfig:
    """Validate job YAML given as text (``file`` only names it in messages)."""
    overrides = list(overrides)
    doc = _Doc(file)
    _compose(doc, text)
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
        raise _config_error(file, f"cannot read the job file: {e.strerror or e}",
                            allowed="a readable YAML file") from None
    except UnicodeDecodeError as e:
        raise _config_error(file, f"not UTF-8 text ({e.reason})", allowed="a UTF-8 YAML file") from None
    cfg = parse_config(text, file, overrides)
    log.debug("loaded %s: %d roles, %d processes", file, len(cfg.roles), cfg.num_processes)
    return cfg
