"""The layout of the code: llmjax's import graph, built from the source (imports inside functions included), has
no cycle; library modules never import the command line (llmjax.cli); llmjax modules import each other at the
top of the file, so that the graph a reader sees is the whole graph; importing llmjax changes no process state."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "llmjax"
# Function-level imports of llmjax modules that must stay function-level, with why. Empty today.
LATE_LLMJAX_IMPORTS: dict[tuple[str, str], str] = {}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported llmjax module, inside a function?, line) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def resolve(target: str) -> str | None:
        while target and target not in known:  # `from llmjax.x import f`: the module is llmjax.x
            target = target.rpartition(".")[0]
        return target or None

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "llmjax" and resolve(alias.name):
                        out.append((resolve(alias.name), in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "llmjax":
                    continue
                for alias in child.names:  # `from llmjax import cli` imports the module llmjax.cli
                    full = f"{base}.{alias.name}"
                    target = full if full in known else resolve(base)
                    if target:
                        out.append((target, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return [(t, f, line) for t, f, line in out if t != name]


def graph() -> dict[str, list[tuple[str, bool, int]]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def package_parents(name: str) -> set[str]:
    """Importing llmjax.a.b runs llmjax/__init__ and llmjax/a/__init__ first: edges of their own."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_import_graph_has_no_cycle():
    g = graph()
    edges = {m: {t for t, _, _ in imps} for m, imps in g.items()}
    assert len(edges) > 40 and sum(map(len, edges.values())) > 100  # the graph was really read
    found = cycles(edges)
    assert not found, "import cycles among llmjax modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_library_modules_never_import_the_command_line():
    bad = [f"{m} imports {t} (line {line})" for m, imps in graph().items() if not m.startswith("llmjax.cli")
           for t, _, line in imps if t == "llmjax.cli" or t.startswith("llmjax.cli.")]
    assert not bad, "\n".join(bad)


def test_llmjax_modules_import_each_other_at_the_top():
    late = [f"{m}:{line} imports {t} inside a function" for m, imps in graph().items()
            for t, inside, line in imps if inside and (m, t) not in LATE_LLMJAX_IMPORTS]
    assert not late, "\n".join(late)


def test_every_command_has_one_module_with_main():
    from llmjax.cli import COMMANDS

    for name, (module, about, _) in COMMANDS.items():
        path = PACKAGE / "cli" / f"{module}.py"
        assert path.is_file(), name
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name
        assert about and "\n" not in about


def test_importing_llmjax_changes_no_process_state():
    code = ("import os, sys; before = dict(os.environ); import llmjax, llmjax.train, llmjax.finetune, llmjax.compare; "
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)); "
            "print(changed)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_imports_inside_functions_say_why():
    """An import inside a function keeps an optional or heavy dependency out of start-up, and says so."""
    silent = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and "#" not in lines[inner.lineno - 1]:
                        silent.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(set(silent)))
