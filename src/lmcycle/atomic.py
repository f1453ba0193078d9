"""Atomic writes: nothing half-written is ever left where a finished artifact is expected.

Files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on POSIX). Directories
(checkpoints, saved models, datasets) are written into a temporary sibling directory and renamed; a directory
that exists at the final path is therefore always complete.

``tempfile`` makes its files 0600 and its directories 0700 whatever the umask, and so does safetensors for every
file it saves; a finished artifact (a directory: everything in it) gets the mode an ordinary ``open`` / ``mkdir``
would have given it (0644 / 0755 under umask 022), so that a server account or a teammate can read a run exactly
as the umask allows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it."""
    # os.umask can only read by setting: a file another thread creates in between would get the wrong mode.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # no /proc (not Linux, or before 4.7): what is created meanwhile is private, not open
    os.umask(old)
    return old


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling; the file gets the mode the umask gives new files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` whole (with the mode the umask gives new
    directories), on error it is removed.

    >>> with atomic_dir("ckpt/step-100") as tmp:   # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _follow_umask(tmp)  # only now: a umask without the owner's write bit would lock us out of tmp
        if path.exists():
            # Move the old one aside first so that at every instant one complete copy exists.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _follow_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes that the umask gives new files and directories."""
    mask = current_umask()
    for folder, dirs, files in os.walk(root):
        for name in files:
            file = os.path.join(folder, name)
            st = os.lstat(file)
            if stat.S_ISREG(st.st_mode):  # a symlink's own mode means nothing, and chmod would follow it
                os.chmod(file, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), 0o777 & ~mask)
    os.chmod(root, 0o777 & ~mask)
