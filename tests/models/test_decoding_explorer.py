from __future__ import annotations

import ast
import json

import matplotlib.image
import pytest
import torch

from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.models.explore import (
    default_settings,
    exploration_markdown,
    explore,
    next_token_distribution,
    plot_exploration,
    token_label,
)
from lmcycle.models.generate import DecodingConfig, generate_ids
from lmcycle.stages.context import RunContext
from lmcycle.stages.explore import ExploreStage, run_explore

PROMPT = "Summary: two friends greet"
SETTINGS = [
    DecodingConfig(max_new_tokens=6),
    DecodingConfig(do_sample=True, temperature=0.5, max_new_tokens=6),
    DecodingConfig(do_sample=True, temperature=1.5, max_new_tokens=6),
    DecodingConfig(do_sample=True, top_k=5, max_new_tokens=6),
    DecodingConfig(do_sample=True, top_p=0.9, max_new_tokens=6),
]


@pytest.fixture(scope="module")
def result(models):
    model, tokenizer = models["llama"]
    return explore(model, tokenizer, PROMPT, SETTINGS, top_n=12)


def _base_probs(model, tokenizer, prompt):
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].softmax(-1)


def test_next_token_distribution_is_the_models_own(models):
    model, tokenizer = models["gpt2"]
    dist = next_token_distribution(model, tokenizer, PROMPT, top_n=7)
    probs = _base_probs(model, tokenizer, PROMPT)
    expected = torch.topk(probs, 7)
    assert [p for _, p in dist] == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert [t for t, _ in dist] == [tokenizer.decode([i]) for i in expected.indices.tolist()]


def test_next_token_distribution_for_t5_is_the_first_decoder_step(models):
    model, tokenizer = models["t5"]
    dist = next_token_distribution(model, tokenizer, PROMPT, top_n=3)
    with torch.no_grad():
        enc = tokenizer(PROMPT, return_tensors="pt")
        start = torch.tensor([[model.config.decoder_start_token_id]])
        probs = model(**enc, decoder_input_ids=start).logits[0, -1].softmax(-1)
    assert dist[0][1] == pytest.approx(probs.max().item(), abs=1e-5)


def test_tokens_are_the_most_likely_ones(result, models):
    model, tokenizer = models["llama"]
    probs = _base_probs(model, tokenizer, PROMPT)
    top_ids = torch.topk(probs, 12).indices.tolist()
    assert [t["id"] for t in result["tokens"]][:12] == top_ids
    labels = [t["label"] for t in result["tokens"]]
    assert all(label.startswith(("'", '"', "b'", 'b"', "<")) for label in labels)
    assert len(set(labels)) == len(labels)  # distinct tokens never look alike


def test_each_setting_keeps_what_its_transform_keeps(result, models):
    greedy, cold, hot, top_k, top_p = result["settings"]
    vocab = len(models["llama"][1])
    base = [t["prob"] for t in result["tokens"]]
    assert greedy["kept_count"] == 1 and greedy["chosen"] == result["tokens"][0]["id"]
    assert greedy["probs"][0] == 1.0 and not any(greedy["kept"][1:])
    assert cold["kept_count"] == hot["kept_count"] == vocab  # temperature removes nothing ...
    assert cold["probs"][0] > base[0] > hot["probs"][0]  # ... it sharpens or flattens
    assert top_k["kept_count"] == 5 and top_k["kept"][:5] == [True] * 5 and not any(top_k["kept"][5:12])
    ratios = [p / b for p, b in zip(top_k["probs"][:5], base[:5], strict=True)]
    assert ratios == pytest.approx([1 / sum(base[:5])] * 5, rel=1e-4)  # renormalised, shape unchanged
    model, tokenizer = models["llama"]
    cumulative = _base_probs(model, tokenizer, PROMPT).sort(descending=True).values.cumsum(0)
    assert top_p["kept_count"] == int((cumulative < 0.9).sum()) + 1  # fewest tokens reaching mass 0.9


def test_chosen_token_starts_the_continuation(result, models):
    model, tokenizer = models["llama"]
    for cfg, s in zip(SETTINGS, result["settings"], strict=True):
        first = generate_ids(model, tokenizer, [PROMPT], cfg)[0][:1]
        assert first in ([s["chosen"]], [])  # empty only if it picked EOS
        assert s["chosen"] in [t["id"] for t in result["tokens"]]
        assert s["continuation"] == tokenizer.decode(generate_ids(model, tokenizer, [PROMPT], cfg)[0])


def test_partial_characters_are_labelled_by_their_bytes(decoder_tokenizer):
    text = "你"  # three UTF-8 bytes the tiny tokenizer never merged
    ids = decoder_tokenizer(text).input_ids
    assert len(ids) == 3
    labels = [token_label(decoder_tokenizer, i) for i in ids]
    assert all(label.startswith("b'") for label in labels)
    assert b"".join(ast.literal_eval(label) for label in labels) == text.encode()
    assert token_label(decoder_tokenizer, decoder_tokenizer("the").input_ids[0]).startswith("'t")
    assert token_label(decoder_tokenizer, decoder_tokenizer.eos_token_id) == "<eos>"


def test_markdown_tables(result):
    md = exploration_markdown(result)
    lines = md.strip().splitlines()
    first_table = lines[: lines.index("")]
    assert len(first_table) == 2 + len(result["tokens"])
    assert all(line.count(" | ") >= 1 + len(SETTINGS) for k, line in enumerate(first_table) if k != 1)
    assert md.count("←") == len(SETTINGS)  # one picked token per setting
    assert "–" in md  # removed tokens are shown as a dash
    assert "greedy" in lines[0] and "top-k=5" in lines[0]


def test_markdown_escapes_pipes():
    result = {"prompt": "p", "tokens": [{"id": 5, "label": "'|'", "prob": 0.5}],
              "settings": [{"label": "greedy", "probs": [1.0], "kept": [True], "kept_count": 1, "chosen": 5,
                            "chosen_label": "'|'", "continuation": "a|b"}]}
    md = exploration_markdown(result)
    assert "'\\|'" in md and "a\\|b" in md
    assert all(line.count("|") - line.count("\\|") in (4, 5) for line in md.splitlines() if line.startswith("|"))


def test_plot_is_a_png_with_one_panel_per_setting(result, tmp_path):
    plot_exploration(result, tmp_path / "five.png")
    one = {**result, "settings": result["settings"][:1]}
    plot_exploration(one, tmp_path / "one.png")
    five_img = matplotlib.image.imread(tmp_path / "five.png")
    one_img = matplotlib.image.imread(tmp_path / "one.png")
    assert (tmp_path / "five.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert five_img.shape[1] > 2 * one_img.shape[1]  # three columns of panels
    assert five_img.shape[0] > one_img.shape[0]  # two rows of panels


def test_stage_needs_exactly_one_prompt_source():
    for data in ({}, {"prompt": "x", "data": "d"}):
        with pytest.raises(LmcycleError, match="exactly one"):
            validate(ExploreStage, data, file="r.yaml")
    assert len(ExploreStage(prompt="x").settings) == len(default_settings()) == 5


def _saved(models, tmp_path):
    model, tokenizer = models["llama"]
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def test_run_explore_with_a_prompt(models, tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run")
    cfg = ExploreStage(model=_saved(models, tmp_path), prompt=PROMPT, settings=SETTINGS[:2], top_n=5)
    out = run_explore(cfg, ctx)
    saved = json.loads(open(out["explore"], encoding="utf-8").read())
    assert saved["prompt"] == PROMPT and len(saved["settings"]) == 2 and len(saved["tokens"]) >= 5
    assert open(out["plot"], "rb").read()[:4] == b"\x89PNG"
    assert out["plot"].startswith(str(tmp_path / "run" / "explore"))


def test_run_explore_renders_a_dataset_example(models, tmp_path):
    from lmcycle.data.templates import get_template

    ctx = RunContext(run_dir=tmp_path / "run")
    example = Example(input="#Person1#: Hi.\n#Person2#: Hello!", targets=["They greet."])
    ctx._datasets["dev"] = [Example(input="other", targets=["x"]), example]
    cfg = ExploreStage(name="ex", model=_saved(models, tmp_path), data="dev", index=1, settings=SETTINGS[:1])
    out = run_explore(cfg, ctx)
    saved = json.loads(open(out["explore"], encoding="utf-8").read())
    assert saved["prompt"] == get_template("summarize").render(example, [])
    assert example.input in saved["prompt"]
    with pytest.raises(LmcycleError, match="out of range"):
        run_explore(cfg.model_copy(update={"index": 2}), ctx)
