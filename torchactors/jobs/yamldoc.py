"""A job file's YAML as plain data that remembers the line of every key, and the one error shape.

Box: the first step of loading a job. The text is composed into YAML nodes rather than loaded
straight to dicts, so every mapping key keeps the line it was written on; ``Builder`` turns
nodes into data in time linear in the file (duplicate keys, unknown tags, recursive aliases and
alias bombs refused). Overrides later record their own text in the same ``Doc``, so every
``ConfigError`` names the file and the line (or the override) of the key it is about.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import yaml

from torchactors.errors import ConfigError
from torchactors.jobs.schema import TOP_KEYS

logger = logging.getLogger(__name__)

KeyPath = tuple[str, ...]


def config_error(file: str, message: str, *, line: int | None = None, override: str | None = None,
                  key: str | None = None, allowed: Any = None) -> ConfigError:
    """One message shape for every mistake: ``file:line: what; allowed: ...`` (or the override for a line)."""
    if isinstance(allowed, (list, tuple)):
        allowed = tuple(allowed)
    where = f"{file}: override '{override}'" if override is not None else (f"{file}:{line}" if line else file)
    allowed_text = ", ".join(allowed) if isinstance(allowed, tuple) else allowed
    return ConfigError(f"{where}: {message}" + (f"; allowed: {allowed_text}" if allowed_text else ""),
                       file=file, line=line, key=key, allowed=allowed)


class Doc:
    """Plain data of a job file, plus where each key came from (a line, or an override)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.data: Any = None
        self.lines: dict[KeyPath, int] = {}
        self.overridden: dict[KeyPath, str] = {}

    def where(self, path: KeyPath) -> tuple[int | None, str | None]:
        """The line or override that set ``path`` or, failing that, its nearest ancestor."""
        for i in range(len(path), -1, -1):
            p = path[:i]
            if p in self.overridden:
                return None, self.overridden[p]
            if p in self.lines:
                return self.lines[p], None
        return 1, None

    def error(self, path: KeyPath, message: str, allowed: Any = None) -> ConfigError:
        line, override = self.where(path)
        return config_error(self.file, message, line=line, override=override, key=".".join(path) or None,
                             allowed=allowed)


MAX_DEPTH = 64                  # nesting of lists and mappings in a job file
MAX_ALIAS_NODES = 10_000        # nodes that aliases and merges may repeat, per file
_TAG = "tag:yaml.org,2002:"
# Tags a job file may write on a scalar (``!!str 5``); any other tag, and any tag on a list
# or mapping, is refused rather than ignored or turned into some other type.
SCALAR_TAGS = {_TAG + t: "!!" + t for t in ("str", "int", "float", "bool", "null")}


def compose(doc: Doc, text: str) -> None:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise config_error(doc.file, f"not valid YAML: {e.problem or e}", line=line,
                            allowed="YAML: key: value lines, indented by spaces") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, max(0, e.position)) + 1
        what = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise config_error(doc.file, f"not valid YAML: the character {what} cannot appear in YAML "
                            "(control characters other than tab and newline)", line=line,
                            allowed="printable text; write such characters as escapes in a double-quoted "
                                    "string, e.g. \"\\x01\"") from None
    except yaml.YAMLError as e:
        raise config_error(doc.file, f"not valid YAML: {e}", line=1, allowed="YAML text") from None
    except RecursionError:
        raise config_error(doc.file, "not valid YAML here: lists or mappings are nested too deeply", line=1,
                            allowed=f"at most {MAX_DEPTH} levels of nesting") from None
    if node is None:
        raise config_error(doc.file, "the job file is empty", line=1, allowed=TOP_KEYS)
    doc.lines[()] = node.start_mark.line + 1
    try:
        doc.data = _Builder(doc).build(node, ())
    except RecursionError:      # merges nested in merges: deep without a long path
        raise config_error(doc.file, "mappings merged into mappings (<<) are nested too deeply", line=1,
                            allowed=f"at most {MAX_DEPTH} levels of nesting") from None


class _Builder:
    """Plain data from composed YAML nodes, recording the line of each mapping key and
    refusing duplicates, tags other than plain scalar ones, recursive aliases and alias
    bombs. Time is linear in the file plus the nodes that aliases repeat, which are counted
    against ``MAX_ALIAS_NODES`` (a 1 KB file can otherwise expand to 10^9 nodes)."""

    def __init__(self, doc: Doc) -> None:
        self.doc = doc
        self.ctor = yaml.constructor.SafeConstructor()
        self.resolver = yaml.resolver.Resolver()
        self.seen: set[int] = set()
        self.open: set[int] = set()     # nodes being built: meeting one again is a cycle
        self.repeats = 0

    def fail(self, node: yaml.Node | None, path: KeyPath, message: str, allowed: Any) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else self.doc.where(path)[0]
        return config_error(self.doc.file, message, line=line, key=".".join(path) or None, allowed=allowed)

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        key = id(node)
        if key in self.open:
            raise self.fail(None, path, f"{show_path(path)} is an alias of a node that contains it (a recursive "
                            "alias)", allowed="aliases (*name) of anchors (&name) defined outside them")
        if len(self.open) >= MAX_DEPTH:   # lists and mappings being built, merged ones too
            raise self.fail(node, path, f"{show_path(path)} is nested more than {MAX_DEPTH} levels deep",
                            allowed=f"at most {MAX_DEPTH} levels of lists and mappings")
        if key in self.seen:
            self.repeats += 1
            if self.repeats > MAX_ALIAS_NODES:
                raise self.fail(None, path, f"aliases repeat more than {MAX_ALIAS_NODES} nodes (at "
                                f"{show_path(path)}): an alias bomb?", allowed=f"aliases and merges that "
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
            return self.mapping(cast(yaml.MappingNode, node), path)    # the one kind left
        finally:
            self.open.discard(key)

    def untagged(self, node: yaml.Node, path: KeyPath, plain: str, what: str) -> None:
        if node.tag != plain:
            raise self.fail(node, path, f"{show_path(path)}: the tag {_short(node.tag)} on a {what} is not used in "
                            "job files", allowed=f"a plain {what}, without a tag")

    def scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        implicit = self.resolver.resolve(yaml.ScalarNode, node.value, (node.style is None, node.style is not None))
        if node.tag != implicit and node.tag not in SCALAR_TAGS:
            raise self.fail(node, path, f"{show_path(path)}: the tag {_short(node.tag)} is not used in job files",
                            allowed="no tag, or one of " + ", ".join(SCALAR_TAGS.values()))
        if node.tag in (_TAG + "merge", _TAG + "value"):
            return node.value       # `<<` or `=` written as a value is just text
        try:
            return self.ctor.construct_object(node, deep=True)
        except Exception as e:      # e.g. `!!int abc`, `!!bool maybe`, a timestamp with month 13
            reason = getattr(e, "problem", None) or e
            raise self.fail(node, path, f"{show_path(path)}: {node.value!r} is not a valid "
                            f"{SCALAR_TAGS.get(node.tag, _short(node.tag))} ({reason})",
                            allowed=f"a value that {_short(node.tag)} can read") from None

    def mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict:
        seen: dict[Any, int] = {}
        merges: list[yaml.Node] = []
        pairs = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "merge":
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _with_line(self.doc, path, "?", line, f"keys must be plain strings in {show_path(path)}")
            key = self.scalar(key_node, path)
            if not isinstance(key, str):
                raise _with_line(self.doc, path, str(key), line,
                                 f"key {key!r} in {show_path(path)} is a {type(key).__name__}; keys must be strings")
            if key in seen:
                raise _with_line(self.doc, path, key, line, f"duplicate key '{key}' in {show_path(path)} "
                                 f"(first at line {seen[key]})")
            seen[key] = line
            pairs.append((key, line, value_node))
        out: dict = {}
        for merged in merges:       # `<<: *a` or `<<: [*a, *b]`: keys of earlier mappings win
            for source in (merged.value if isinstance(merged, yaml.SequenceNode) else [merged]):
                if not isinstance(source, yaml.MappingNode):
                    raise self.fail(source, path, f"{show_path(path)}: `<<` merges mappings, not "
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


def _with_line(doc: Doc, path: KeyPath, key: Any, line: int, message: str) -> ConfigError:
    """An error at an explicit line (duplicate and non-string keys have no entry in ``doc.lines``)."""
    return config_error(doc.file, message, line=line, key=".".join(path + (str(key),)),
                         allowed="each key once, as a string")


def show_path(path: KeyPath) -> str:
    return ".".join(path) if path else "the top level"


