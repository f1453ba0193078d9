"""Reward sources: a Python callable (checked), a saved reward model with its own tokenizer, a classifier."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_lm
import torch

from lmcycle.align.reward import RewardModel
from lmcycle.align.reward_sources import build_reward, check_rewards, python_reward
from lmcycle.config import validate
from lmcycle.errors import LmcycleError
from lmcycle.stages.ppo import PpoStage


def test_any_callable_returning_numbers_is_a_reward():
    for out in ([1, 2], np.array([1.0, 2.0]), torch.tensor([[1.0], [2.0]])):
        fn = python_reward(lambda p, r, out=out: out)
        assert fn(["a", "b"], ["x", "y"]).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("values, message", [
    ([1.0], "shape"), ([[1.0, 2.0], [3.0, 4.0]], "shape"), ([1.0, float("inf")], "inf"),
    (["high", "low"], "not numbers"), (None, "not numbers"),
])
def test_bad_reward_outputs_are_clear_errors(values, message):
    with pytest.raises(LmcycleError, match=message) as e:
        check_rewards(values, 2, "f")
    assert e.value.field == "reward"


def test_reward_function_names_are_checked():
    for spec, message in (("no_colon", "must look like"), ("not_a_module_xyz:f", "cannot import"),
                          ("math:no_such_function", "has no")):
        with pytest.raises(LmcycleError, match=message):
            python_reward(spec)
    assert python_reward("math:fsum")  # any importable callable


def test_reward_model_rescores_text_with_its_own_tokenizer(tok, tmp_path):
    """Policy and reward model need not share a vocabulary: the reward re-tokenises the decoded text."""
    rm_tok = tiny_lm.make_tokenizer(vocab_size=400)  # a different vocabulary from the policy's 320
    rm = RewardModel.from_causal_lm(tiny_lm.tiny_llama(rm_tok))
    rm.stats = {"mean": 0.5, "std": 2.0}
    rm.save(tmp_path / "rm", tokenizer=rm_tok)
    prompts, responses = ["the cat sees", "a dog"], [" the sun .", " red"]

    raw = build_reward(validate(PpoStage, _stage(str(tmp_path / "rm"), normalise=False)).reward)(prompts, responses)
    enc = rm_tok([p + r for p, r in zip(prompts, responses, strict=True)], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = rm(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(raw, expected, atol=1e-5)
    normalised = build_reward(validate(PpoStage, _stage(str(tmp_path / "rm"))).reward)(prompts, responses)
    assert torch.allclose(normalised, (expected - 0.5) / 2.0, atol=1e-5)


def _stage(path: str, **reward) -> dict:
    return {"prompts": "p", "rollouts": 1, "reward": {"kind": "model", "path": path, **reward}}


def test_a_reward_model_without_stats_cannot_normalise(tok, tmp_path):
    RewardModel.from_causal_lm(tiny_lm.tiny_llama(tok)).save(tmp_path / "rm", tokenizer=tok)
    with pytest.raises(LmcycleError, match="no saved mean/std") as e:
        build_reward(validate(PpoStage, _stage(str(tmp_path / "rm"))).reward)
    assert e.value.field == "reward.normalise"


def test_classifier_reward_is_the_probability_or_log_odds_of_its_label(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from lmcycle.models.classifier import TextClassifier

    clf_tok = tiny_lm.make_tokenizer(vocab_size=400)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(clf_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, num_labels=2, id2label={0: "not_toxic", 1: "toxic"},
        label2id={"not_toxic": 0, "toxic": 1}))
    tiny_lm.save_tiny(model, clf_tok, tmp_path / "clf")
    responses = [" the cat", " red sun sees the moon", " milk"]
    expected = TextClassifier.load(tmp_path / "clf").probabilities(responses)[:, 0]

    def spec(**fields):
        raw = {"prompts": "p", "rollouts": 1, "reward": {"kind": "classifier", "path": str(tmp_path / "clf"),
                                                       "label": "not_toxic", **fields}}
        return validate(PpoStage, raw).reward

    prob = build_reward(spec())(["q"] * 3, responses)
    assert torch.allclose(prob, expected, atol=1e-6)
    log_odds = build_reward(spec(output="log_odds"))(["q"] * 3, responses)
    assert torch.allclose(log_odds, torch.log(expected / (1 - expected)), atol=1e-4)
    with pytest.raises(LmcycleError, match="not_toxic|label"):
        build_reward(spec(label="no_such_class"))
