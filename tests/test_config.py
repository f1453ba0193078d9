"""Typed configs: every error names the file, the line and the key."""

from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcycle.config import Config, apply_overrides, load_config, load_yaml
from lmcycle.errors import LmcycleError


class Inner(Config):
    lr: float = 1e-3
    steps: int


class Outer(Config):
    name: str
    kind: Literal["a", "b"] = "a"
    train: Inner


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_valid_file_and_defaults(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "name: x\ntrain:\n  steps: 3\n"))
    assert (cfg.name, cfg.kind, cfg.train.steps, cfg.train.lr) == ("x", "a", 3, 1e-3)


@pytest.mark.parametrize(
    "text, line, field, words",
    [
        ("name: x\ntrain:\n  steps: 3\n  lrr: 1\n", 4, "train.lrr", "unknown key"),
        ("name: x\ntrain:\n  steps: three\n", 3, "train.steps", "integer"),
        ("name: x\ntrain:\n  lr: 0.1\n", 2, "train.steps", "missing"),
        ("name: x\nkind: c\ntrain: {steps: 1}\n", 2, "kind", "'a' or 'b'"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, line, field, words):
    path = write(tmp_path, text)
    with pytest.raises(LmcycleError) as e:
        load_config(Outer, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: field '{field}'"), msg
    assert words in msg
    assert "\n" not in msg


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "name: x\ntrain: [1, 2\nother: 3\n")
    with pytest.raises(LmcycleError, match=r"r\.yaml:\d+: invalid YAML"):
        load_yaml(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "name: x\nname: y\n")
    with pytest.raises(LmcycleError, match=r"r\.yaml:2: field 'name': duplicate key"):
        load_yaml(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(LmcycleError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(LmcycleError, match="not valid UTF-8"):
        load_yaml(bad)


def test_overrides_parse_yaml_values_and_reach_into_lists():
    data = {"stages": [{"type": "a"}, {"type": "b", "train": {"lr": 1}}]}
    apply_overrides(data, ["stages.1.train.lr=0.5", "stages.0.corpus=[x, y]", "seed=3", "new.key=on"])
    assert data["stages"][1]["train"]["lr"] == 0.5
    assert data["stages"][0]["corpus"] == ["x", "y"]
    assert data["seed"] == 3 and data["new"]["key"] is True
    with pytest.raises(LmcycleError, match="no list item 5"):
        apply_overrides(data, ["stages.5.lr=1"])
    with pytest.raises(LmcycleError, match="key=value"):
        apply_overrides(data, ["stages"])


def test_override_type_errors_are_reported_against_the_file(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  steps: 3\n")
    with pytest.raises(LmcycleError, match=r"field 'train.steps'"):
        load_config(Outer, path, ["train.steps=many"])


@given(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.integers(), min_size=1, max_size=5))
def test_line_numbers_match_the_key_positions(tmp_path_factory, mapping):
    path = tmp_path_factory.mktemp("y") / "m.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in mapping.items()))
    data, lines = load_yaml(path)
    assert data == mapping
    for i, key in enumerate(mapping):
        assert lines[(key,)] == i + 1
