"""The layer rule of torchactors/__init__.py, read from the source: imports point one way only.

store -> (nothing above it); runtime -> store; actors -> runtime, store; rl and jobs on top.
``errors`` and ``_util`` are leaves every layer may use. Imports inside functions count (they
are how a cycle used to be dodged); imports under ``if TYPE_CHECKING:`` never run and count
for neither rule. The second test keeps the module graph acyclic, which is what makes start-up
order readable: a module's imports are finished before any of its code runs.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torchactors"

# layer of a module -> the layers (first dotted part below torchactors) it may import
ALLOWED = {
    "errors": {"errors"},
    "_util": {"_util", "errors"},
    "exceptions": {"errors"},
    "store": {"store", "errors", "_util"},
    "runtime": {"runtime", "store", "errors", "_util"},
    "actors": {"actors", "runtime", "store", "errors", "_util"},
    # rl: actor classes and learning code, written against the public API
    "rl": {"rl", "", "errors", "_util"},
    # jobs: the job files and the CLI, on the public API (plus the one options schema)
    "jobs": {"jobs", "", "rl", "errors", "_util", "actors.options"},
    # the package itself re-exports the public API of every layer
    "": {"", "store", "actors", "errors", "exceptions", "_util"},
    "__main__": {"jobs"},
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module) of every torchactors import that runs: ``from a import b`` names
    module ``a.b`` when ``b`` is a module of the package, else ``a``."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.split(".")[0] == root.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] != root.name:
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                        root.parent / Path(*sub.split(".")) / "__init__.py").exists()
                    found.append((child.lineno, sub if is_module else base))
            visit(child)

    visit(tree)
    return found


def layer(module: str, root_name: str = "torchactors") -> str:
    rest = module[len(root_name):].lstrip(".")
    if rest == "actors.options":
        return rest
    return rest.split(".")[0]


def upward_imports(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = layer(me, root.name)
        mine = "actors" if mine == "actors.options" else mine
        allowed = ALLOWED.get(mine)
        if allowed is None:
            problems.append(f"{path.relative_to(root.parent)}: no layer for {me!r}: add it to ALLOWED")
            continue
        for line, target in imports(path, root):
            theirs = layer(target, root.name)
            if theirs not in allowed and theirs.split(".")[0] not in allowed:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {me} ({mine or 'top'}) imports "
                                f"{target} ({theirs or 'top'}), a layer it may not use")
    return problems


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    graph = {module_name(p, root): sorted({t for _, t in imports(p, root)}) for p in root.rglob("*.py")}
    found, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            # a package's __init__ importing its own submodules is how re-exports work
            if nxt.startswith(node + ".") or nxt == node:
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    return found


def test_no_module_imports_a_layer_above_it():
    assert upward_imports() == []


def test_the_import_graph_has_no_cycle():
    assert cycles() == []


@pytest.mark.parametrize("source, expected", [
    ("from torchactors.actors import api\n", "imports torchactors.actors.api (actors)"),
    ("def f():\n    import torchactors.runtime.job\n", "imports torchactors.runtime.job (runtime)"),
])
def test_the_rule_fails_on_an_upward_import(tmp_path, source, expected):
    """The check itself can fail: a store module importing upward, at top level or in a function."""
    pkg = tmp_path / "torchactors"
    for sub in ("store", "runtime", "actors"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "job.py").write_text("")
    (pkg / "actors" / "api.py").write_text("")
    (pkg / "store" / "core.py").write_text(textwrap.dedent(source))
    problems = upward_imports(pkg)
    assert len(problems) == 1 and expected in problems[0] and "store/core.py" in problems[0], problems


def test_a_type_checking_import_is_not_a_cycle(tmp_path):
    pkg = tmp_path / "torchactors"
    (pkg / "store").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "store" / "__init__.py").write_text("")
    (pkg / "store" / "a.py").write_text("from torchactors.store import b\n")
    (pkg / "store" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from torchactors.store import a\n")
    assert cycles(pkg) == []
    (pkg / "store" / "b.py").write_text("def f():\n    from torchactors.store import a\n")
    assert cycles(pkg) == [["torchactors.store.a", "torchactors.store.b", "torchactors.store.a"]]

