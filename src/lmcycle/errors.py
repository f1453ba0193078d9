"""User-facing errors.

Every problem caused by the user's input (recipe, data file, model path) is raised as :class:`LmcycleError`,
whose ``str`` is one line that names where the problem is (file, line, field or key). The CLI prints that line
and exits non-zero; it never prints a traceback for these.
"""

from __future__ import annotations

import os


class LmcycleError(Exception):
    """One clear line about bad input: ``file:line: field 'x': message``."""

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        what = f"field '{self.field}': " if self.field else ""
        return " ".join(f"{where}{what}{self.message}".split())
