"""The embedded default corpus: CPython's documentation topics, standard-library docstrings and source.

Nothing is downloaded and nothing is imported: stdlib files are parsed with `ast`, in sorted order, so the
corpus is the same on every machine with the same Python version. Each document carries a `kind`,
'doc' (prose) or 'code' (source with its docstrings removed), for a later documentation-vs-code task.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Bump when the way documents are cut or formatted changes: it is part of every prepared-data fingerprint.
CORPUS_VERSION = 1
KINDS = ("doc", "code")

# Test suites, GUI demos, vendored wheels, generated codec tables and jokes: not representative text.
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
    "site-packages", "dist-packages", "pydoc_data", "__pycache__", "encodings", "__phello__",
})
_SKIP_FILES = frozenset({"this.py", "antigravity.py", "__hello__.py", "turtle.py"})
_MIN_CODE_LINES = 3


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    kind: str  # one of KINDS
    origin: str  # e.g. 'pydoc_data.topics:assert' or 'json/__init__.py:dumps'


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib `.py` files the corpus is made of, sorted by path relative to `root`."""
    root = root or stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in filenames:
            if name.endswith(".py") and name not in _SKIP_FILES:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def fingerprint() -> dict:
    """Identifies the corpus without building it: Python version and the names and sizes of the files."""
    root = stdlib_dir()
    h = hashlib.sha256()
    for path in stdlib_files(root):
        h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    import pydoc_data.topics  # large (Python's help texts): imported only when the corpus is built

    h.update(f"topics\0{Path(pydoc_data.topics.__file__).stat().st_size}\n".encode())
    return {
        "name": "llmjax default corpus (CPython docs topics + stdlib docstrings and source)",
        "corpus_version": CORPUS_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "stdlib_files_sha256": h.hexdigest(),
    }


def documents() -> Iterator[Document]:
    """All documents in a fixed order: the pydoc topics, then per stdlib module its docs and its code."""
    yield from topic_documents()
    root = stdlib_dir()
    for path in stdlib_files(root):
        yield from module_documents(path, path.relative_to(root).as_posix())


def topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics  # large: see fingerprint()

    for name in sorted(topics):
        text = topics[name].strip("\n")
        if text.strip():
            yield Document(text + "\n", "doc", f"pydoc_data.topics:{name}")


def module_documents(path: Path, relpath: str) -> Iterator[Document]:
    """One 'doc' document per module (its docstrings, each under the qualified name it documents) and one
    'code' document per top-level function or class (its source, comments kept, docstrings cut out)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return  # a few stdlib files are deliberately invalid or not UTF-8
    module = relpath[: -len(".py")].replace("/", ".").removesuffix(".__init__")
    sections = []
    for qualname, node in _documented(tree, module):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            sections.append(doc.strip() if node is tree else f"{qualname}\n\n{doc.strip()}")
    if sections:
        yield Document("\n\n".join(sections) + "\n", "doc", f"{relpath}:<docstrings>")
    lines = source.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            code = _source_without_docstrings(node, lines)
            if code.count("\n") >= _MIN_CODE_LINES:
                yield Document(code, "code", f"{relpath}:{node.name}")


def docstring_names() -> Iterator[tuple[str, str, str]]:
    """(module file, name, summary) for every public function and class of the stdlib with a docstring: the
    summary is the docstring's first paragraph on one line. The pairs of the docstring -> name task
    (llmjax.data.tasks.docstring_to_name)."""
    root = stdlib_dir()
    for path in stdlib_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # as in module_documents
        for _, node in _documented(tree, ""):
            if node is tree or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            summary = " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""
            if summary:
                yield path.relative_to(root).as_posix(), node.name, summary


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) for the module and every class/function in it, in source order."""
    yield module, tree

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}.{node.name}"
                yield qualname, node
                yield from walk(node.body, qualname)

    yield from walk(tree.body, module)


def _docstring_nodes(node: ast.AST) -> Iterator[ast.Expr]:
    """The docstring statements of `node` and of every class/function nested in it."""
    for child in ast.walk(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child.body:
            first = child.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                yield first


def _source_without_docstrings(node: ast.AST, lines: list[str]) -> str:
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    drop = set()
    for doc in _docstring_nodes(node):
        # Only docstrings that own their lines are cut; `def f(): "doc"` stays as it is.
        head = lines[doc.lineno - 1].encode()[: doc.col_offset]
        tail = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :]
        if not head.strip() and not tail.strip():
            drop.update(range(doc.lineno, doc.end_lineno + 1))
    kept = [lines[i - 1] for i in range(start, node.end_lineno + 1) if i not in drop]
    return "".join(kept).rstrip() + "\n"
