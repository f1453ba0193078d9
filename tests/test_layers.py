"""The layers of src/lmcycle hold: no import cycle between files, no technique library reaching up into the
recipe layers, and function-local imports only where they keep `lmcycle --help` fast (see tests/layers.py)."""

from __future__ import annotations

from pathlib import Path

from layers import LIBRARIES, UPPER, cycles, folder, imports, local_imports_without_reason, upward

SRC = Path(__file__).resolve().parents[1] / "src"


def test_no_import_cycle_between_files():
    groups = cycles(imports(SRC))
    assert groups == [], "import cycles: " + "; ".join(" <-> ".join(g) for g in groups)


def test_no_library_imports_stages_cli_or_report():
    up = [f"{e.importer} -> {e.imported} (line {e.line})" for e in upward(imports(SRC))]
    assert up == [], f"library folders ({', '.join(LIBRARIES)}) import {', '.join(UPPER)}: " + "; ".join(up)


def test_report_never_imports_stages_or_cli():
    # The page takes its sections from the caller (the registry hands them in), so report/ stays below stages/.
    bad = [f"{e.importer} -> {e.imported}" for e in imports(SRC)
           if folder(e.importer) == "report" and folder(e.imported) in ("stages", "cli")]
    assert bad == []


def test_function_local_imports_say_why():
    """A function-local import of an lmcycle module is there only to delay torch/transformers/matplotlib for a
    fast start-up, and its line (or the one above) says so with the word 'lazy'; any other one hides a cycle."""
    unexplained = [f"{m}:{line}: {text}" for m, line, text in local_imports_without_reason(SRC)]
    assert unexplained == [], "\n".join(unexplained)


def test_the_graph_sees_imports_the_rules_forbid(tmp_path):
    """The checks above could pass by seeing nothing: a tiny package with a cycle, an upward import and an
    unexplained local import must be caught."""
    pkg = tmp_path / "lmcycle"
    for d in ("models", "stages"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("from lmcycle.models import b\nfrom lmcycle.stages.s import X\n")
    (pkg / "models" / "b.py").write_text("def f():\n    from lmcycle.models import a\n")
    (pkg / "stages" / "s.py").write_text("X = 1\n")
    edges = imports(tmp_path)
    assert cycles(edges) == [["lmcycle.models.a", "lmcycle.models.b"]]
    assert [(e.importer, e.imported) for e in upward(edges)] == [("lmcycle.models.a", "lmcycle.stages.s")]
    assert [m for m, _, _ in local_imports_without_reason(tmp_path)] == ["lmcycle.models.b"]
