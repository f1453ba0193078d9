"""Soft preference targets for the reward model: the soft Bradley-Terry loss against a hand computation, its
limits (target 1 is the plain pairwise loss, target 0.5 is flat at d = 0), the ``pairs`` dataset format (targets,
errors, a stage's ``pairs`` artifact) and a reward stage trained on a list of datasets, one of them soft."""

from __future__ import annotations

import json
import math

import pytest
import tiny_lm
import torch
from test_reward_stage import TRAIN, context

from lmcycle.align import reward as reward_module
from lmcycle.align.reward import (
    collate_pairs,
    encode_pairs,
    pair_loss_fn,
    pair_losses,
    soft_bradley_terry_losses,
)
from lmcycle.config import validate
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.data.preferences import (
    PreferencePair,
    examples_from_pairs,
    load_preference_examples,
    pairs_from_examples,
)
from lmcycle.errors import LmcycleError
from lmcycle.stages.context import RunContext
from lmcycle.stages.reward import RewardStage, run_reward


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_soft_loss_matches_a_hand_computation_for_three_pairs():
    chosen, rejected, target = [1.2, -0.3, 0.0], [0.2, 0.4, 0.0], [1.0, 0.7, 0.55]
    margin = [0.5, 0.0, -1.0]
    got = soft_bradley_terry_losses(torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64),
                                    torch.tensor(target, dtype=torch.float64))
    got_margin = soft_bradley_terry_losses(torch.tensor(chosen, dtype=torch.float64),
                                           torch.tensor(rejected, dtype=torch.float64),
                                           torch.tensor(target, dtype=torch.float64),
                                           torch.tensor(margin, dtype=torch.float64))
    for i in range(3):
        for out, m in ((got, 0.0), (got_margin, margin[i])):
            d = chosen[i] - rejected[i] - m
            p = 1 / (1 + math.exp(-d))
            expected = -(target[i] * math.log(p) + (1 - target[i]) * math.log(1 - p))
            assert out[i].item() == pytest.approx(expected, rel=1e-12)
    assert got.shape == (3,)


def test_target_one_is_exactly_the_pairwise_loss():
    gen = torch.Generator().manual_seed(0)
    c, r, m = (torch.randn(16, generator=gen) * 3 for _ in range(3))
    ones = torch.ones(16)
    assert torch.equal(soft_bradley_terry_losses(c, r, ones), pair_losses(c, r))
    assert torch.equal(soft_bradley_terry_losses(c, r, ones, m), pair_losses(c, r, m))
    # far from 0 it stays finite, as logsigmoid does
    assert torch.isfinite(soft_bradley_terry_losses(torch.tensor([80.0, -80.0]), torch.zeros(2), torch.tensor([0.9, 0.9]))).all()


def test_target_one_half_has_no_gradient_at_zero_difference_and_pulls_towards_it():
    d = torch.zeros(1, requires_grad=True)
    soft_bradley_terry_losses(d, torch.zeros(1), torch.tensor([0.5])).sum().backward()
    assert d.grad.item() == 0.0
    # the minimum over d is where sigmoid(d) = t: a soft label does not ask for an unbounded margin
    d = torch.tensor([2.0], requires_grad=True)
    soft_bradley_terry_losses(d, torch.zeros(1), torch.tensor([0.5])).sum().backward()
    assert d.grad.item() > 0  # gradient descent lowers d back towards 0
    at = torch.tensor([math.log(0.8 / 0.2)], requires_grad=True)
    soft_bradley_terry_losses(at, torch.zeros(1), torch.tensor([0.8])).sum().backward()
    assert at.grad.item() == pytest.approx(0.0, abs=1e-6)


class FirstToken(torch.nn.Module):
    """A 'reward model' whose score is its first token id / 10, so losses are known by hand."""

    def forward(self, input_ids, attention_mask):
        return input_ids[:, 0].float() / 10


class Pad:
    padding_side = "right"
    pad_token_id = 0


def test_pair_batches_carry_targets_into_the_training_loss():
    encoded = [{"chosen": [5], "rejected": [2], "margin": 1.0, "target": 0.6},
               {"chosen": [1], "rejected": [4], "margin": 1.0}]  # no target: a hard pair
    batch = collate_pairs(encoded, Pad())
    assert batch["target"].tolist() == pytest.approx([0.6, 1.0])
    total, n = pair_loss_fn(False)(FirstToken(), batch)
    expected = -(0.6 * log_sigmoid(0.3) + 0.4 * log_sigmoid(-0.3)) - log_sigmoid(-0.3)
    assert n == 2 and total.item() == pytest.approx(expected, rel=1e-6)


def test_encode_pairs_keeps_each_target(tok):
    pairs = [PreferencePair("a", "the cat", " sees", " red", target=0.75), PreferencePair("b", "hi", " sun", " moon")]
    assert [e["target"] for e in encode_pairs(pairs, tok, 32)] == [0.75, 1.0]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_pairs_file_round_trips_with_its_targets(tmp_path):
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b", "target": 0.8, "labeler": "judge"},
            {"prompt": "q1", "chosen": "c", "rejected": "d"},  # target 1.0 by default
            {"prompt": "q2", "chosen": "e", "rejected": "f", "target": 0.25, "prompt_id": "two"},  # said backwards
            {"prompt": "q3", "chosen": "g", "rejected": "h", "target": 0.5, "labeler": None}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    examples = load_preference_examples(tmp_path / "p.jsonl", "pairs", "all")
    pairs = pairs_from_examples(examples, "soft")
    assert [(p.prompt, p.chosen, p.rejected, p.target, p.labeler) for p in pairs] == [
        ("q1", "a", "b", 0.8, "judge"), ("q1", "c", "d", 1.0, ""), ("q2", "f", "e", 0.75, ""), ("q3", "g", "h", 0.5, "")]
    assert pairs[0].prompt_id == pairs[1].prompt_id != pairs[3].prompt_id and pairs[2].prompt_id == "two"
    assert "target" not in examples[1].meta and examples[0].meta["target"] == 0.8  # hard pairs are as before
    assert pairs_from_examples(examples_from_pairs(pairs)) == pairs
    # the recipe format, split by prompt like hh_rlhf: train and test share no prompt and make up the whole
    many = [{"prompt": f"q{i % 20}", "chosen": "x", "rejected": "y", "target": 0.9} for i in range(60)]
    write_jsonl(tmp_path / "many.jsonl", many)
    split = {s: load_examples(DatasetConfig(format="pairs", path=str(tmp_path / "many.jsonl"), split=s))
             for s in ("train", "test", "all")}
    assert len(split["train"]) + len(split["test"]) == len(split["all"]) == 60 and split["test"]
    assert not {e.id for e in split["train"]} & {e.id for e in split["test"]}
    # a folder holds <split>.jsonl files, each that split already
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "test.jsonl", rows[:2])
    assert len(load_examples(DatasetConfig(format="pairs", path=str(tmp_path / "folder"), split="test"))) == 2


@pytest.mark.parametrize("row,line,field,words", [
    ({"prompt": "q", "chosen": "a", "rejected": "b", "target": 1.5}, 2, "target", "outside [0, 1]"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "target": -0.1}, 2, "target", "outside [0, 1]"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "target": "high"}, 2, "target", "expected a number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "target": True}, 2, "target", "expected a number"),
    ({"prompt": "q", "rejected": "b"}, 2, "chosen", "missing field"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "labeler": 3}, 2, "labeler", "expected a string"),
    ({"prompt": "other", "chosen": "a", "rejected": "b", "prompt_id": "one"}, 2, "prompt_id", "different prompt"),
])
def test_a_bad_pairs_row_is_an_error_naming_file_line_and_field(tmp_path, row, line, field, words):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"prompt": "q0", "chosen": "a", "rejected": "b", "prompt_id": "one"}, row])
    with pytest.raises(LmcycleError) as e:
        load_examples(DatasetConfig(format="pairs", path=str(path), split="all"))
    assert (e.value.file, e.value.line, e.value.field) == (str(path), line, field) and words in e.value.message


def test_a_pairs_dataset_reads_an_earlier_stages_pairs_artifact(tmp_path):
    write_jsonl(tmp_path / "judged.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "target": 0.7}])
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"),
                     data={"ai": validate(DatasetConfig, {"format": "pairs", "stage": "ai_feedback", "split": "all"})})
    ctx.add_artifacts("ai_feedback", {"pairs": str(tmp_path / "judged.jsonl")})
    assert pairs_from_examples(ctx.dataset("ai"))[0].target == 0.7
    with pytest.raises(LmcycleError, match="only applies to format 'label_db' or 'pairs'"):
        validate(DatasetConfig, {"format": "hh_rlhf", "stage": "ai_feedback"})


def test_a_reward_stage_trains_on_a_list_of_datasets_one_with_soft_targets(tok, tmp_path, monkeypatch):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    soft = tiny_lm.marker_pairs(32, seed=3, longer_rejected=True)
    for i, p in enumerate(soft):
        p.prompt_id, p.target = f"soft{i}", 0.9 if i % 2 else 0.6
    ctx._datasets["ai"] = examples_from_pairs(soft)
    seen = []
    real = reward_module.soft_bradley_terry_losses

    def spy(c, r, target, margin=None):
        seen.append(target.detach().cpu())
        return real(c, r, target, margin)

    monkeypatch.setattr(reward_module, "soft_bradley_terry_losses", spy)
    cfg = validate(RewardStage, {"model": "build", "data": ["ai", "prefs"], "eval_data": "held_out", "max_len": 64,
                                 "train": {**TRAIN, "max_steps": 30, "eval_every": 30}})
    produced = run_reward(cfg, ctx)
    settings = json.loads(open(produced["eval"]).read())["settings"]
    assert settings["data"] == ["ai", "prefs"] and settings["train_pairs"] == 32 + 96
    assert settings["soft_target_pairs"] == 32
    assert settings["mean_target"] == pytest.approx((16 * 0.9 + 16 * 0.6 + 96 * 1.0) / 128)
    targets = torch.cat(seen)
    assert (targets < 1).any() and (targets == 1).any()  # both datasets' pairs reached the training loss
    assert json.loads(open(produced["eval"]).read())["metrics"]["accuracy"] >= 0.8


def test_a_reward_stage_data_list_is_checked():
    base = {"model": "build", "eval_data": "held_out", "train": TRAIN}
    for data, words in (([], "at least one dataset"), (["a", "a"], "listed twice")):
        with pytest.raises(LmcycleError, match=words):
            validate(RewardStage, {**base, "data": data})
    # a loss that needs rankings names the dataset of the list that holds pairs only
    cfg = validate(RewardStage, {**base, "data": ["ranked", "soft"], "loss": "listwise"})
    data = {"ranked": DatasetConfig(format="rankings", path="r.jsonl"), "soft": DatasetConfig(format="pairs", path="p")}
    field, message = cfg.data_problem(data)
    assert field == "loss" and "dataset 'soft' is format pairs" in message
