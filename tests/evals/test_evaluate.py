"""EvalStage end to end on a tiny local Llama (and T5): prompts, generation, scores, files, metrics log."""

import json

import pytest

from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.evals.baselines import extractive_baseline
from lmcycle.evals.bleu import bleu
from lmcycle.evals.perplexity import conditional_perplexity, seq2seq_perplexity
from lmcycle.evals.rouge import rouge
from lmcycle.evals.score import Signature
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.models.load import load_pretrained
from lmcycle.stages.context import RunContext
from lmcycle.stages.eval import EvalStage, run_eval

EXAMPLES = [
    Example(input="#Person1#: Hello, how are you today?\n#Person2#: I am fine, thank you.",
            targets=["#Person1# and #Person2# greet.", "They say hello.", "A greeting."], id="d0"),
    Example(input="#Person1#: Where is the train station?\n#Person2#: Go straight and turn left at the bank.",
            targets=["#Person2# tells #Person1# the way to the station."], id="d1"),
    Example(input="#Person1#: Shall we meet at the cafe at noon?\n#Person2#: Yes, the weather is nice.",
            targets=["They meet at the cafe at noon.", "#Person1# and #Person2# meet at noon."], id="d2"),
    Example(input="#Person1#: I lost my bag.\n#Person2#: Go to the lost and found office.",
            targets=["#Person1# lost a bag."], id="d3"),
]
DECODING = DecodingConfig(max_new_tokens=6, stop=["\n\n"], batch_size=2)


def _ctx(tmp_path, model_dir=None) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / "run")
    ctx._datasets["d"] = list(EXAMPLES)
    if model_dir is not None:
        ctx.add_artifacts("m", {"model": str(model_dir)})
    return ctx


def _read(produced):
    rows = [json.loads(line) for line in open(produced["predictions"], encoding="utf-8")]
    return rows, json.load(open(produced["eval"], encoding="utf-8"))


def test_eval_stage_on_a_tiny_decoder(tmp_path, tiny_model_dir):
    ctx = _ctx(tmp_path, tiny_model_dir)
    cfg = EvalStage(name="few", model="m", data="d", limit=3, shots=1, decoding=DECODING)
    produced = run_eval(cfg, ctx)
    rows, result = _read(produced)

    assert [r["id"] for r in rows] == ["d0", "d1", "d2"] and result["metrics"]["n"] == 3
    template = get_template("summarize")
    for row, ex in zip(rows, EXAMPLES, strict=False):
        assert row["references"] == ex.targets
        assert row["prompt"].endswith(template.render(ex, []).split("\n\n")[-1])
        # One shot from the same dataset, never the query itself.
        assert row["prompt"].count("Summary:") == 2 and ex.targets[0] not in row["prompt"]

    # The predictions are what the model generates from those prompts, stripped.
    model, tokenizer = load_pretrained(tiny_model_dir)
    expected = [t.strip() for t in generate(model, tokenizer, [r["prompt"] for r in rows], DECODING)]
    assert [r["prediction"] for r in rows] == expected

    # The scores are the metric functions applied to the saved predictions and references.
    preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    r, b = rouge(preds, refs), bleu(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result["metrics"][key] == pytest.approx(r.values[key])
    assert result["metrics"]["bleu"] == pytest.approx(b.values["bleu"])
    assert [row["rougeL"] for row in rows] == pytest.approx([e["rougeL"] for e in r.per_example])
    ppl = conditional_perplexity(model, tokenizer, [template.render(ex, []) for ex in EXAMPLES[:3]],
                                 [" " + ex.targets[0] for ex in EXAMPLES[:3]])
    assert result["metrics"]["perplexity"] == pytest.approx(ppl.values["perplexity"], rel=1e-5)

    s = result["settings"]
    assert s["bleu"]["signature"].startswith("nrefs:var") and s["rouge"]["multi_ref"]
    assert s["perplexity"]["signature"] == str(ppl.signature) and s["rouge"]["signature"] == str(r.signature)
    assert s["decoding"]["max_new_tokens"] == 6 and s["shots"] == 1 and s["model"] == str(tiny_model_dir)
    logged = [m for m in ctx.read_metrics("few") if m.get("kind") == "eval"]
    assert len(logged) == 1 and logged[0]["rougeL"] == pytest.approx(result["metrics"]["rougeL"])
    assert produced["eval"].startswith(str(ctx.run_dir / "few"))


def test_extractive_baseline_loads_no_model(tmp_path):
    ctx = _ctx(tmp_path)  # no model anywhere: loading one would fail
    produced = run_eval(EvalStage(name="base", data="d", baseline="extractive"), ctx)
    rows, result = _read(produced)
    assert [r["prediction"] for r in rows] == [extractive_baseline(ex.input) for ex in EXAMPLES]
    assert "perplexity" not in result["metrics"] and result["settings"]["baseline"] == "extractive"
    assert result["settings"]["shots"] is None and result["settings"]["decoding"] is None
    assert result["metrics"]["rougeL"] == pytest.approx(
        rouge([r["prediction"] for r in rows], [ex.targets for ex in EXAMPLES]).values["rougeL"])


def test_eval_json_records_each_metrics_signature(tmp_path):
    def settings(run: str, limit: int | None = None) -> dict:
        ctx = _ctx(tmp_path / run)
        return _read(run_eval(EvalStage(name="base", data="d", baseline="extractive", limit=limit), ctx))[1]["settings"]

    first, again, fewer = settings("a"), settings("b"), settings("c", limit=1)
    for metric in ("rouge", "bleu"):
        assert first[metric]["signature"] == again[metric]["signature"] and first[metric]["keys"]
        assert first[metric]["signature"] != fewer[metric]["signature"]  # one example: one reference count
    assert Signature.parse(first["rouge"]["signature"]).as_dict() == first["rouge"]["keys"]
    assert first["rouge"]["signature"].startswith("rouge|agg:max|refs:var|stem:porter|")
    assert first["bleu"]["keys"]["nrefs"] == "var" and "multi_ref" in first["bleu"]  # the long keys stay


def test_eval_stage_on_a_tiny_encoder_decoder(tmp_path, tokenizer, t5):
    model_dir = tmp_path / "t5"
    t5.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ctx = _ctx(tmp_path, model_dir)
    produced = run_eval(EvalStage(data="d", metrics=["rouge"], decoding=DECODING), ctx)
    rows, result = _read(produced)
    assert "bleu" not in result["metrics"] and "bleu" not in result["settings"] and len(rows) == 4
    model, tok = load_pretrained(model_dir)
    template = get_template("summarize")
    ppl = seq2seq_perplexity(model, tok, [template.render(ex, []) for ex in EXAMPLES],
                             [ex.targets[0] for ex in EXAMPLES])
    assert result["metrics"]["perplexity"] == pytest.approx(ppl.values["perplexity"], rel=1e-5)
    assert produced["eval"].endswith("eval/eval.json")


def test_eval_stage_config_errors():
    with pytest.raises(LmcycleError, match="metrics"):
        validate(EvalStage, {"type": "eval", "data": "d", "metrics": ["meteor"]})
    with pytest.raises(LmcycleError, match="unknown key"):
        validate(EvalStage, {"type": "eval", "data": "d", "shot": 1})
    assert EvalStage(data="d").decoding.stop == ["\n\n"]


def test_empty_dataset_is_a_clear_error(tmp_path):
    ctx = _ctx(tmp_path)
    ctx._datasets["empty"] = []
    with pytest.raises(LmcycleError, match="no examples"):
        run_eval(EvalStage(data="empty", baseline="extractive"), ctx)
