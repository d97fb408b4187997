"""The built-in corpus: the Python documentation that ships with every interpreter.

pydoc topics (the language reference sections behind `help()`) and the docstrings of the
standard library, read from source with `ast` (nothing is imported, so no module's side effects
run). Each docstring carries its top-level module as a label, which the built-in downstream task
(`stdlib-module`: which module is this docstring from?) uses.
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

from warehouse.sources import RawDoc

# Test suites, GUI demos and vendored packages are not documentation.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "__pycache__", "ensurepip"}
MIN_DOCSTRING = 40


def _docstrings(path: Path) -> Iterator[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return
    nodes = [(tree, "")]
    while nodes:
        node, prefix = nodes.pop()
        doc = ast.get_docstring(node)
        if doc and len(doc) >= MIN_DOCSTRING:
            yield prefix or "<module>", doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                nodes.append((child, f"{prefix}.{child.name}" if prefix else child.name))


def python_docs(source: str) -> Iterator[RawDoc]:
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield RawDoc(source, f"pydoc_data.topics:{name}", topics.topics[name])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for qualname, doc in _docstrings(path):
            yield RawDoc(source, f"stdlib:{module}:{qualname}", doc, label=rel.parts[0].removesuffix(".py"))


BUILTINS = {"python-docs": python_docs}
