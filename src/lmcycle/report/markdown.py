"""Formatting for report.md: table cells and numbers, Markdown escaping, durations, and saving plots.

Every cell helper turns a missing or non-numeric value into ``—``, so a half-finished run still renders.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcycle.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXAMPLE_CHARS = 300  # an example prediction or reference is cut to this many characters


# -- numbers -----------------------------------------------------------------------------------------------

def is_number(value: Any) -> bool:
    """A real int or float, not a bool and not NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def number(value: Any) -> str:
    """Two decimals (scores × 100)."""
    return f"{value:.2f}" if is_number(value) else "—"


def fraction(value: Any) -> str:
    """Three decimals (scores between 0 and 1)."""
    return f"{value:.3f}" if is_number(value) else "—"


def fixed(value: Any, digits: int) -> str:
    """``digits`` decimals with thousands separators."""
    return f"{value:,.{digits}f}" if is_number(value) else "—"


def millions(value: Any) -> str:
    return f"{value / 1e6:.2f}M" if is_number(value) else "—"


def share(part: Any, whole: Any) -> str:
    """``part`` as a percentage of ``whole``."""
    return f"{100 * part / whole:.1f}%" if is_number(part) and is_number(whole) and whole else "—"


def duration(seconds: float) -> str:
    """``12.3 s``, ``4m 05s`` or ``1h 02m 03s``."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"


# -- text --------------------------------------------------------------------------------------------------

def md(text: str) -> str:
    """Text safe inside a Markdown table cell or paragraph (``_`` inside words is not emphasis in GFM)."""
    return re.sub(r"([\\`*|<>\[\]])", r"\\\1", text)


def plain(value: Any) -> str:
    """A string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def inline(value: Any) -> str:
    """A value for an inline code span (backticks cannot be escaped there, so they are replaced)."""
    return plain(value).replace("`", "'").replace("\n", "\\n")


def excerpt(text: str) -> str:
    """Whitespace folded, cut to ``EXAMPLE_CHARS``, escaped; ``*(empty)*`` for nothing."""
    text = " ".join(str(text).split())
    if len(text) > EXAMPLE_CHARS:
        text = text[:EXAMPLE_CHARS].rstrip() + " …"
    return md(text) if text else "*(empty)*"


def row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def filename(stage: str) -> str:
    """A stage name as a safe file name (for its plots)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage)


# -- plots -------------------------------------------------------------------------------------------------

def figure(width: float, height: float) -> Figure:
    """A matplotlib figure of that size in inches, without pyplot's global state."""
    from matplotlib.figure import Figure  # lazy: matplotlib costs a second, and only a report draws

    return Figure(figsize=(width, height))


def save_png(fig: Figure, path: Path) -> None:
    """Write the figure as a PNG whose bytes depend on the plot alone (no software or date metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
