"""Draw docs/architecture.png: the layers of src/lmcycle, each importing only the ones below it.

    python docs/layers.py

The numbers on the arrows are counted from the code (tests/layers.py), so the picture says how many imports
cross each boundary today; an import that went upwards would show as a red arrow.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from layers import LIBRARIES, imports  # noqa: E402

# Top to bottom. Each layer: (name, the folders or root modules in it, what it holds).
LAYERS = [
    ("cli", ["cli"], "lmcycle run | <stage> | report | adapters | plan | serve | rag | agent | pal | harness | label"),
    ("stages", ["stages"], "registry · recipe.py · context.py · common.py · peft.py · one file per stage kind:\n"
                           "<Kind>Stage, run_<kind>, section()"),
    ("report", ["report"], "page.py: the page, its sections handed in; markdown.py, rundir.py"),
    ("libraries", [*LIBRARIES, "artifacts"], "techniques: " + " · ".join(LIBRARIES) + "\n"
                                            "artifacts.py: load_model(any folder a stage writes)"),
    ("ground floor", ["errors", "atomic", "config", "terminal"], "errors.py · atomic.py · config.py · terminal.py"),
]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else ""
    for i, (_, members, _) in enumerate(LAYERS):
        if key in members:
            return i
    return None


def crossings(src: Path) -> Counter:
    """(from layer, to layer) -> number of import statements crossing that boundary."""
    counts: Counter = Counter()
    for e in imports(src):
        a, b = layer_of(e.importer), layer_of(e.imported)
        if a is not None and b is not None and a != b:
            counts[(a, b)] += 1
    return counts


def draw(out: Path, src: Path) -> None:
    counts = crossings(src)
    fig = Figure(figsize=(11.5, 7.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 12.7)
    ax.set_ylim(0, len(LAYERS) * 1.2 + 0.2)
    ax.axis("off")
    colours = ["#dbe9f6", "#fde6cf", "#dbe9f6", "#def2de", "#eeeeee"]
    centres = []
    for i, (name, _, text) in enumerate(LAYERS):
        y = (len(LAYERS) - 1 - i) * 1.2 + 0.3
        ax.add_patch(FancyBboxPatch((0.4, y), 7.6, 0.8, boxstyle="round,pad=0.02", fc=colours[i], ec="#555555"))
        ax.text(0.6, y + 0.58, name, fontsize=12, fontweight="bold", va="center")
        ax.text(0.6, y + 0.25, text, fontsize=8.5, va="center", family="monospace")
        centres.append(y)
    for k, ((a, b), n) in enumerate(sorted(counts.items())):
        down = a < b
        ya, yb = centres[a], centres[b]
        x = 8.35 + 0.32 * k
        start, end = (ya - 0.15, yb + 0.8) if down else (ya + 0.95, yb)
        ax.add_patch(FancyArrowPatch((x, start), (x, end), arrowstyle="-|>", mutation_scale=10,
                                     color="#333333" if down else "#cc0000", lw=1))
        ax.text(x + 0.04, start - 0.02 if down else start, str(n), fontsize=7, ha="left",
                va="top" if down else "bottom", color="#333333" if down else "#cc0000")
    ax.text(8.25, len(LAYERS) * 1.2 + 0.05, "imports between layers\n(arrow: importer → imported)", fontsize=8,
            va="top")
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    draw(ROOT / "docs" / "architecture.png", ROOT / "src")
    print(ROOT / "docs" / "architecture.png")
