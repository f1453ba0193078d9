import math

import pytest
import tiny_lm
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lmcycle.config import validate
from lmcycle.data.sft import collate_sft, encode_sft
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.stages.context import RunContext
from lmcycle.stages.sft import SftStage, run_sft
from lmcycle.train.loop import lm_loss_sum, mean_token_loss


def context(tmp_path, model, tokenizer) -> RunContext:
    return tiny_lm.run_context(tmp_path, model, tokenizer)


def held_out_loss(model, tokenizer, examples, seq2seq) -> float:
    items = encode_sft(examples, get_template("summarize"), tokenizer, 64, seq2seq)
    return mean_token_loss(model.eval(), [collate_sft(items, tokenizer.pad_token_id)], lm_loss_sum)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_sft_lowers_held_out_loss_and_saves_a_reloadable_model(arch, tok, t5_tok, tmp_path):
    seq2seq = arch == "t5"
    tokenizer = t5_tok if seq2seq else tok
    model = tiny_lm.tiny_t5(tokenizer) if seq2seq else tiny_lm.tiny_llama(tokenizer)
    ctx = context(tmp_path, model, tokenizer)
    before = held_out_loss(model, tokenizer, ctx.dataset("dev"), seq2seq)
    cfg = validate(SftStage, {"data": [{"dataset": "reverse"}], "max_len": 64, "eval_data": "dev",
                              "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "eval_every": 15}})
    produced = run_sft(cfg, ctx)

    evals = [m["eval_loss"] for m in ctx.read_metrics("sft") if "eval_loss" in m]
    assert len(evals) == 2 and evals[-1] < evals[0] < before
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    reloaded = auto.from_pretrained(produced["model"])
    # The saved model is the trained one: its held-out loss is what the last eval logged.
    assert held_out_loss(reloaded, tokenizer, ctx.dataset("dev"), seq2seq) == pytest.approx(evals[-1], rel=1e-4)
    assert math.isfinite(evals[-1])


def test_a_weighted_mixture_trains_on_every_task(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = validate(SftStage, {"name": "multi", "max_len": 64, "data": [
        {"dataset": "reverse", "weight": 3.0}, {"dataset": "upper", "weight": 1.0, "template": "plain"}],
        "train": {"max_steps": 3, "batch_size": 4}})
    produced = run_sft(cfg, ctx)
    data = next(m for m in ctx.read_metrics("multi") if m.get("event") == "data")
    assert data["tasks"] == ["reverse", "upper"] and data["train_examples"] == 128
    assert produced["model"].endswith("multi/model")
    assert not ctx.read_metrics("sft")  # a named stage writes under its own name only


def test_sft_config_rejects_unknown_keys_and_empty_data():
    with pytest.raises(LmcycleError, match="unknown key"):
        validate(SftStage, {"data": [{"dataset": "d", "wieght": 2}], "train": {"max_steps": 1}})
    with pytest.raises(LmcycleError, match="data"):
        validate(SftStage, {"data": [], "train": {"max_steps": 1}})
