"""Atomic writes: finished artifacts get the modes the umask gives, not tempfile's private 0600 / 0700."""

from __future__ import annotations

import os
import stat
import textwrap

import pytest

from lmcycle.atomic import atomic_dir, atomic_write_json, atomic_write_text
from lmcycle.cli import main

# umask -> (file mode, directory mode) that open() / mkdir() give under it
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o027: (0o640, 0o750)}


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_tree_modes(root, file_mode, dir_mode):
    """``root`` and everything under it have exactly the umask's modes."""
    assert mode(root) == dir_mode, root
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            assert mode(os.path.join(folder, d)) == dir_mode, os.path.join(folder, d)
        for f in files:
            assert mode(os.path.join(folder, f)) == file_mode, os.path.join(folder, f)


def test_current_umask_reads_the_umask_without_changing_it(umask):
    from lmcycle.atomic import current_umask

    assert current_umask() == umask
    assert os.umask(umask) == umask  # still set: reading did not leave anything else behind


def test_atomic_files_and_dirs_follow_the_umask(tmp_path, umask):
    file_mode, dir_mode = MODES[umask]
    atomic_write_text(tmp_path / "out" / "DONE", "done\n")
    atomic_write_json(tmp_path / "out" / "eval.json", {"a": 1})
    assert mode(tmp_path / "out" / "DONE") == file_mode and mode(tmp_path / "out" / "eval.json") == file_mode
    for _ in range(2):  # the second time replaces an existing directory
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights.bin").write_bytes(b"x")
            atomic_write_text(tmp / "config.json", "{}")
        assert_tree_modes(tmp_path / "model", file_mode, dir_mode)
    with atomic_dir(tmp_path / "tool") as tmp:
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)  # an executable stays executable, as far as the umask allows
    assert mode(tmp_path / "tool" / "run.sh") == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "tool"]  # no temporary sibling left


def test_a_run_directory_follows_the_umask(tmp_path, umask):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: modes
        seed: 0
        data:
          train: {format: synthetic, n: 20, seed: 1}
        stages:
          - {type: build, arch: llama, size: 1m, corpus: [train], vocab_size: 320, max_len: 64}
          - {type: report}
        """))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for name in ("DONE", "report.md", "config.yaml", "artifacts.json"):
        assert (out / name).exists(), name
    assert list(out.rglob("model.safetensors"))  # a saved model is part of what is checked
    assert_tree_modes(out, *MODES[umask])
