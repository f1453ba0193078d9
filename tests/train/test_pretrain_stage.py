import math

import pytest
import tiny_lm
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.stages.context import RunContext
from lmcycle.stages.pretrain import PretrainStage, run_pretrain


def context(tmp_path, model, tokenizer) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"))
    ctx.add_artifacts("build", {"model": tiny_lm.save_tiny(model, tokenizer, tmp_path / "build")})
    ctx._datasets["text"] = [Example(input=s, targets=[t]) for s, t in zip(tiny_lm.sentences(200, seed=1),
                                                                            tiny_lm.sentences(200, seed=2),
                                                                            strict=True)]
    return ctx


def stage(**train) -> PretrainStage:
    return validate(PretrainStage, {"corpus": ["text"], "seq_len": 32, "eval_fraction": 0.1, "train": {
        "max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "eval_every": 10, "log_every": 5,
        **train}})


def eval_losses(ctx, name="pretrain"):
    return [m["eval_loss"] for m in ctx.read_metrics(name) if "eval_loss" in m]


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_pretraining_lowers_held_out_loss_and_saves_a_reloadable_model(arch, tok, t5_tok, tmp_path):
    tokenizer = t5_tok if arch == "t5" else tok
    model = tiny_lm.tiny_t5(tokenizer) if arch == "t5" else tiny_lm.tiny_llama(tokenizer)
    ctx = context(tmp_path, model, tokenizer)
    produced = run_pretrain(stage(), ctx)

    losses = eval_losses(ctx)
    assert len(losses) == 3  # steps 10, 20, 30
    assert losses[-1] < losses[0] < math.log(len(tokenizer))  # below the uniform guess, and still falling
    ppl = [m["eval_ppl"] for m in ctx.read_metrics("pretrain") if "eval_ppl" in m]
    assert ppl[-1] == pytest.approx(math.exp(losses[-1]), rel=1e-6)
    data = next(m for m in ctx.read_metrics("pretrain") if m.get("event") == "data")
    assert data["objective"] == ("span_corruption" if arch == "t5" else "causal_lm")

    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(produced["model"])
    assert AutoTokenizer.from_pretrained(produced["model"]).get_vocab() == tokenizer.get_vocab()
    before = model.state_dict()
    assert any((reloaded.state_dict()[k] != v).any() for k, v in before.items())  # trained weights, not init


def test_running_again_resumes_from_the_checkpoint(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    run_pretrain(stage(max_steps=10, eval_every=0), ctx)
    run_pretrain(stage(max_steps=20, eval_every=0), ctx)
    steps = [m["step"] for m in ctx.read_metrics("pretrain") if "loss" in m]
    assert steps == [5, 10, 15, 20]  # the second run went on from step 10


def test_text_files_are_read_relative_to_the_recipe(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("\n".join(tiny_lm.sentences(100, seed=4)), encoding="utf-8")
    cfg = validate(PretrainStage, {"files": ["notes/a.txt"], "seq_len": 32,
                                   "train": {"max_steps": 2, "batch_size": 2}})
    run_pretrain(cfg, ctx)
    data = next(m for m in ctx.read_metrics("pretrain") if m.get("event") == "data")
    assert data["train_blocks"] + data["eval_blocks"] > 10


@pytest.mark.parametrize(("change", "message"), [
    ({"files": ["missing.txt"]}, "files.0"),
    ({"seq_len": 4096}, "context window"),
    ({"corpus": [], "files": []}, "no text"),
])
def test_bad_pretrain_settings_are_one_line_errors(change, message, tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = validate(PretrainStage, {"corpus": ["text"], "seq_len": 32, "train": {"max_steps": 1}, **change})
    with pytest.raises(LmcycleError, match=message) as err:
        run_pretrain(cfg, ctx)
    assert "\n" not in str(err.value)
