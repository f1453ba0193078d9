"""The import graph of ``src/lmcycle`` and the layer rules it must keep (``test_layers.py``).

Run as a script to print the figures the layout is judged by::

    python tests/layers.py [SRC_DIR]

Every ``import`` statement counts, at module level or inside a function: a function-local import still ties
the two files together (grimp sees both kinds; the AST walk here tells them apart).
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Technique libraries: they may import each other and the ground floor, never the layers above them.
LIBRARIES = ("data", "models", "train", "adapt", "align", "optimize", "evals", "apps", "serve", "feedback")
UPPER = ("stages", "report", "cli")
# Old flat modules of the upper layers, before issue 15 moved them into stages/, report/ and cli/.
OLD_UPPER = ("recipe", "runs", "report", "report_alignment", "report_optimize", "report_apps", "cli")
# Why a function may import lazily: these cost a second or more at start-up, and `lmcycle --help` imports none.
HEAVY = ("torch", "transformers", "matplotlib", "peft", "safetensors", "numpy", "datasets", "sentence_transformers",
         "fastapi", "uvicorn", "starlette", "torchao", "sklearn", "scipy", "rouge_score", "sacrebleu", "tqdm")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module that holds the statement
    imported: str  # dotted lmcycle module it names
    line: int
    local: bool  # inside a function (or method) rather than at module level


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(src: Path) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / "lmcycle").rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attribute``) names."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(src: Path) -> list[Import]:
    """Every import of one lmcycle module by another, with whether it sits inside a function."""
    known = modules(src)
    found: list[Import] = []
    for mod, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node, local in _walk(tree, False):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                hit = _resolve(t, known)
                if hit and hit != mod and hit != "lmcycle" and Import(mod, hit, node.lineno, local) not in found:
                    found.append(Import(mod, hit, node.lineno, local))
    return found


def _walk(node: ast.AST, local: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, local
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            continue  # annotations only: never executed, so no dependency at run time
        else:
            yield from _walk(child, local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected groups of more than one file (Tarjan), each sorted; every such group is a cycle."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~150)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward(edges: list[Import]) -> list[Import]:
    """Imports from a technique library into the layers above it (stages, report, cli, or their old modules)."""
    above = set(UPPER) | set(OLD_UPPER)
    return [e for e in edges if folder(e.importer) in LIBRARIES and folder(e.imported) in above]


def local_imports_of_lmcycle(edges: list[Import]) -> list[Import]:
    return [e for e in edges if e.local]


def local_imports_without_reason(src: Path) -> list[tuple[str, int, str]]:
    """Function-local imports of lmcycle modules whose function has no comment saying why it imports late.

    The allowed reason is start-up time: the line (or the one above it) says ``lazy`` and names what it
    delays; every other local import is a cycle being dodged."""
    out = []
    for e in local_imports_of_lmcycle(imports(src)):
        lines = modules(src)[e.importer].read_text(encoding="utf-8").splitlines()
        here = lines[e.line - 1]
        above = lines[e.line - 2] if e.line > 1 else ""
        if "lazy" not in here.lower() and "lazy" not in above.lower():
            out.append((e.importer, e.line, here.strip()))
    return out


def lines_per_folder(src: Path) -> Counter:
    counts: Counter = Counter()
    for mod, path in modules(src).items():
        name = folder(mod)
        counts[name if name and (src / "lmcycle" / name).is_dir() else "(root)"] += len(
            path.read_text(encoding="utf-8").splitlines())
    return counts


def summary(src: Path) -> str:
    edges = imports(src)
    groups = cycles(edges)
    up = upward(edges)
    local = local_imports_of_lmcycle(edges)
    lines = [f"modules: {len(modules(src))}; internal imports: {len(edges)} "
             f"({len(local)} inside functions)",
             f"import cycles (groups of files): {len(groups)}"]
    lines += [f"  {len(g)} files: {', '.join(m.removeprefix('lmcycle.') for m in g)}" for g in groups]
    lines.append(f"imports from a library folder up into recipe/stages/report/cli: {len(up)}")
    lines += [f"  {e.importer} -> {e.imported} (line {e.line})" for e in up]
    lines.append("lines per folder: " + ", ".join(f"{k} {v}" for k, v in sorted(lines_per_folder(src).items())))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src"))
