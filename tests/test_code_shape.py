"""The shape the code keeps (docs/DEVELOPING.md): short functions, shallow nesting, no import circles.

Cheap checks on the source itself, so a change that grows the training loop back into one long
function fails here, not in a review."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "train"
MAX_FUNCTION_LINES = 60
MAX_NESTING = 4
_BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith, ast.Match)


def _nesting(node: ast.AST, depth: int = 0) -> int:
    """Deepest block nesting inside a function; an ``elif`` counts as its ``if``'s level, and nested
    functions and classes are measured on their own."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        is_elif = isinstance(node, ast.If) and isinstance(child, ast.If) and node.orelse == [child]
        deeper = depth + 1 if isinstance(child, _BLOCKS) and not is_elif else depth
        deepest = max(deepest, _nesting(child, deeper))
    return deepest


def _functions():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.name}:{node.name}", node


def test_no_function_is_longer_than_the_limit():
    lengths = {name: n.end_lineno - n.lineno + 1 for name, n in _functions()}
    too_long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert not too_long, too_long


def test_train_reads_in_one_sitting():
    train = next(n for name, n in _functions() if name == "loop.py:train")
    assert train.end_lineno - train.lineno + 1 <= 60


def test_nesting_is_shallow():
    deep = {name: d for name, n in _functions() if (d := _nesting(n)) > MAX_NESTING}
    assert not deep, deep


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at any level (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("train."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "train":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("train."))
    return found - {path.stem}


def test_no_import_circle():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, f"modules on an import circle: {circles}"


def test_the_nesting_measure_counts_what_it_should():
    src = ("def f(x):\n    for a in x:\n        if a:\n            pass\n"
           "        elif x:\n            with x:\n                pass\n")
    assert _nesting(ast.parse(src).body[0]) == 3
