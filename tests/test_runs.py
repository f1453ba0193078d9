"""RunContext: "the latest model" is the newest *language* model, never a reward model or classifier."""

from __future__ import annotations

import json

import pytest

from lmcycle.errors import LmcycleError
from lmcycle.stages.context import RunContext, is_scorer


def _model_dir(path, architecture: str, reward_meta: bool = False) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    if reward_meta:
        (path / "reward_model.json").write_text("{}")
    return str(path)


def test_latest_model_skips_reward_models_and_classifiers(tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file="r.yaml")
    lm = _model_dir(tmp_path / "lm", "LlamaForCausalLM")
    ctx.add_artifacts("sft", {"model": lm})
    ctx.add_artifacts("rm", {"model": _model_dir(tmp_path / "rm", "LlamaModel", reward_meta=True)})
    ctx.add_artifacts("clf", {"model": _model_dir(tmp_path / "clf", "BertForSequenceClassification")})
    assert ctx.model_path(None) == lm and ctx.model_path("latest") == lm
    assert ctx.model_path("rm") == str(tmp_path / "rm")  # by name, a scorer is still reachable
    assert is_scorer(tmp_path / "clf") and not is_scorer(lm) and not is_scorer(tmp_path / "missing")


def test_no_language_model_yet_is_an_error(tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file="r.yaml")
    ctx.add_artifacts("clf", {"model": _model_dir(tmp_path / "clf", "BertForSequenceClassification")})
    with pytest.raises(LmcycleError, match="language model"):
        ctx.model_path(None)
