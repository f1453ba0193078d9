"""Untrusted text (documents, model output, file names) on a terminal.

A document can carry ANSI escape sequences (colours, cursor moves that overwrite what was printed before, OSC
titles and hyperlinks), carriage returns, and bidirectional controls that make a line display as something it is
not. :func:`printable` writes each such character as a visible ``\\uXXXX`` escape, so the text shows what it holds
and the terminal acts on none of it; newline and tab stay where they are the text's own layout. The escapes are JSON's,
so a JSON document passed through stays valid and decodes to the very same strings.
"""

from __future__ import annotations

import re

# C0 except tab and newline, DEL, C1 (U+009B is CSI on its own), the line/paragraph separators, the bidi controls.
_CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_CONTROLS}]")
_UNSAFE_IN_A_LINE = re.compile(f"[\t\n{_CONTROLS}]")


def printable(text: str, *, layout: bool = True) -> str:
    """``text`` with every terminal control character written as ``\\uXXXX``: all but newline and tab, or with
    ``layout=False`` (a file name, a key: one line of a listing) those two as well."""
    return (_UNSAFE if layout else _UNSAFE_IN_A_LINE).sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells (the header first) as left-aligned text columns two spaces apart, without trailing blanks.
    The cells are printed as given: pass untrusted ones through :func:`printable` first."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
