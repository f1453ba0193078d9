"""What `pip install -e .` brings is enough for the main job: every import is declared, and the quickstart's
stages run in a process where nothing beyond the core dependencies can be imported (issue 14: the int8 stage
needed `accelerate`, which only the dev extra brought, so every check made with the dev extra was green)."""

import ast
import functools
import importlib.metadata as md
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "lmcycle"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
CORE = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
EXTRAS = {extra: {canonicalize_name(Requirement(r).name) for r in reqs}
          for extra, reqs in PYPROJECT["optional-dependencies"].items()}
# Modules that exist to serve an extra and are imported only by the command that needs it (with a clear
# "pip install 'lmcycle[serve]'" error when it is missing).
EXTRA_ENTRY_MODULES = {"serve/app.py": "serve", "feedback/web.py": "label", "feedback/guards.py": "label"}


def _third_party_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """``(top-level module, line, at module level)`` for each absolute import of a non-stdlib module."""
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                root = name.split(".")[0]
                if root not in sys.stdlib_module_names and root != "lmcycle":
                    found.append((root, child.lineno, top))
            visit(child, top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, True)
    return found


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return md.packages_distributions()  # stats every installed file: once


def _distribution(module: str) -> str:
    dists = _packages_distributions().get(module)
    assert dists, f"'{module}' is imported but not installed here, so its distribution is unknown"
    return canonicalize_name(dists[0])


def test_every_import_is_declared_and_module_level_imports_are_core():
    declared = CORE.union(*EXTRAS.values())
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for module, line, top in _third_party_imports(ast.parse(path.read_text(encoding="utf-8"))):
            dist = _distribution(module)
            if dist not in declared:
                problems.append(f"{rel}:{line}: imports '{module}' ({dist}), declared in no dependency list")
            elif top and dist not in CORE and dist not in EXTRAS.get(EXTRA_ENTRY_MODULES.get(rel, ""), set()):
                problems.append(f"{rel}:{line}: imports '{module}' ({dist}) at module level, but it is not a core "
                                f"dependency: import it where it is used, with a clear error when missing")
    assert not problems, "\n".join(problems)


def _core_closure() -> set[str]:
    """The distributions `pip install -e .` installs: the core dependencies and theirs, recursively."""
    seen, todo = set(), list(CORE)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def _modules_beyond_core() -> list[str]:
    """Top-level modules installed here that a core-only install would not have (the dev extra's and theirs).
    pip/setuptools stay: a fresh venv has them too."""
    keep = _core_closure() | {"lmcycle", "pip", "setuptools"}
    blocked = []
    for module, dists in _packages_distributions().items():
        if module.isidentifier() and all(canonicalize_name(d) not in keep for d in dists):
            blocked.append(module)
    return sorted(blocked)


def test_the_dev_environment_really_has_more_than_core():
    # The check below means something only if this environment holds packages a core install lacks.
    blocked = _modules_beyond_core()
    assert {"accelerate", "peft", "pytest"} <= set(blocked), blocked
    assert not {"torch", "transformers", "torchao", "yaml"} & set(blocked)


def _shrunk_quickstart(out_dir: Path) -> Path:
    """recipes/quickstart.yaml with every stage kept, each made tiny: the main job's code paths in seconds."""
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    for name, n in (("train", 40), ("test", 3), ("prefs", 24), ("prefs_test", 6)):
        recipe["data"][name]["n"] = n
    for stage in recipe["stages"]:
        if "train" in stage and stage["type"] != "ppo":  # PPO counts rollouts, not steps
            stage["train"].update(max_steps=2, warmup_steps=0, log_every=1, batch_size=4)
            stage["train"].pop("eval_every", None)
        if stage["type"] == "pretrain":
            stage["seq_len"] = 64
        if stage["type"] == "eval":
            stage["decoding"] = {"max_new_tokens": 4}
        if stage["type"] == "ppo":
            stage.update(rollouts=1, ppo={**stage["ppo"], "rollout_size": 4, "ppo_epochs": 1})
            stage["generation"]["max_new_tokens"] = 4
            stage["train"]["batch_size"] = 4
        if stage["type"] == "prune":
            stage["n_calibration"] = 8
        if stage["type"] == "compare":
            stage.update(latency_runs=5, max_len=64)
    path = out_dir / "quickstart_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_quickstart_stages_run_with_core_dependencies_only(tmp_path):
    recipe = _shrunk_quickstart(tmp_path)
    # sys.modules[m] = None makes `import m` fail and importlib.util.find_spec(m) return None, which is how
    # transformers decides whether accelerate (and the rest) is installed: as in a venv without the extras.
    script = textwrap.dedent(f"""
        import sys
        for m in {json.dumps(_modules_beyond_core())}:
            sys.modules[m] = None
        from lmcycle.cli import main
        sys.exit(main(["run", {str(recipe)!r}, "--out", {str(tmp_path / "run")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "run" / "DONE").is_file()
    assert (tmp_path / "run" / "int8_quantized" / "eval.json").is_file()
    assert "## " in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
