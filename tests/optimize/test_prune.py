"""Pruning: exact per-layer sparsity, Wanda against brute force, the N:M pattern, structured shrinking with a
save/load round trip, LoRA healing that keeps the masks, bad input that leaves the model untouched, the stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from tiny_lm import examples, run_context, sentences, tiny_gpt2, tiny_llama
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmcycle.adapt.lora import LoraConfig
from lmcycle.errors import LmcycleError
from lmcycle.optimize.prune import (
    heal_with_lora,
    input_norms,
    magnitude_prune,
    nm_prune,
    prunable_layers,
    sparsity_report,
    structured_prune,
    tokenize_calibration,
    wanda_prune,
)
from lmcycle.stages.prune import HealConfig, PruneStage, run_prune
from lmcycle.train.loop import TrainConfig, lm_loss_sum, mean_token_loss

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def llama(tok):
    return tiny_llama(tok, seed=0)


@pytest.fixture
def calib(tok):
    # Different lengths, so every batch has padding that must not count.
    return tokenize_calibration(tok, sentences(12, seed=3) + [ex.input for ex in examples(12, seed=4)],
                                max_len=32, batch_size=6)


@pytest.fixture(scope="module")
def trained(tok):
    """A tiny Llama fitted for a few steps to the sentences (pruning then hurts, and healing has something to
    recover); tests take a deep copy."""
    model = tiny_llama(tok, seed=0)
    batches = lm_batches(tok, sentences(64, seed=5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        loss_sum, n = lm_loss_sum(model, batches[step % len(batches)])
        opt.zero_grad()
        (loss_sum / n).backward()
        opt.step()
    return model.eval()


def lm_batches(tok, texts):
    return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
            for b in tokenize_calibration(tok, texts, max_len=32, batch_size=16)]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def test_prunable_layers_are_the_block_linears_only(llama):
    names = set(prunable_layers(llama))
    leaves = {n.rsplit(".", 1)[1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in names
    assert set(prunable_layers(llama, layers=r"mlp\.")) == {n for n in names if ".mlp." in n}


def test_magnitude_zeroes_exactly_the_smallest_per_layer(llama):
    before = state(llama)
    masks = magnitude_prune(llama, 0.5)
    for name, layer in prunable_layers(llama).items():
        w0, w = before[name + ".weight"], layer.weight.detach()
        assert int((w == 0).sum()) == round(0.5 * w.numel())
        assert torch.equal(masks[name], w != 0)
        # every kept |w| is at least as large as every pruned one
        assert w0.abs()[masks[name]].min() >= w0.abs()[~masks[name]].max()
    assert torch.equal(llama.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    rows = sparsity_report(llama)
    assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-3) for r in rows[:-2])
    assert rows[-2]["layer"] == "[pruned layers]" and rows[-2]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rows[-1]["layer"] == "[whole model]" and 0 < rows[-1]["sparsity"] < 0.5  # embeddings stay dense


def test_wanda_kept_set_equals_brute_force(llama, calib):
    layer = llama.model.layers[0]
    w = layer.self_attn.q_proj.weight.detach().clone()
    # Hook-free inputs of q_proj: the RMS-normed embeddings of the real (non-padding) tokens.
    rows = []
    with torch.no_grad():
        for b in calib:
            x = layer.input_layernorm(llama.model.embed_tokens(b["input_ids"]))
            rows.append(x[b["attention_mask"].bool()])
            padded_too = x.reshape(-1, x.shape[-1])
    x_all = torch.cat(rows)
    norm = torch.sqrt((x_all ** 2).sum(0))
    got_norm = input_norms(llama, calib, [Q])[Q]
    assert torch.allclose(got_norm, norm, rtol=1e-4)
    assert padded_too.shape[0] > rows[-1].shape[0]  # the batch really had padding to exclude

    masks = wanda_prune(llama, calib, 0.5)
    out_f, in_f = w.shape
    for i in range(out_f):
        scores = [(abs(float(w[i, j])) * float(norm[j]), j) for j in range(in_f)]
        kept = {j for _, j in sorted(scores)[in_f // 2:]}
        assert set(torch.nonzero(masks[Q][i]).squeeze(1).tolist()) == kept
    assert (llama.model.layers[0].self_attn.q_proj.weight == 0).sum(1).eq(in_f // 2).all()


def test_wanda_differs_from_magnitude_when_inputs_are_skewed(tok, calib):
    def skewed():
        m = tiny_llama(tok, seed=0)
        with torch.no_grad():  # the first 8 input features of q/k/v are 100x louder than the rest
            m.model.layers[0].input_layernorm.weight[:8] *= 100
        return m

    wanda = wanda_prune(skewed(), calib, 0.5)[Q]
    magnitude = magnitude_prune(skewed(), 0.5)[Q]
    assert not torch.equal(wanda, magnitude)
    assert wanda[:, :8].float().mean() > 0.95  # Wanda keeps the loud features' weights
    assert magnitude[:, :8].float().mean() < 0.8  # magnitude does not look at the inputs


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_nm_pattern_holds_in_every_group(llama, calib, score):
    before = state(llama)
    nm_prune(llama, 2, 4, score=score, calibration_batches=calib)
    for name, layer in prunable_layers(llama).items():
        groups = layer.weight.detach().reshape(layer.out_features, -1, 4)
        assert ((groups != 0).sum(-1) == 2).all()
        if score == "magnitude":  # the kept two are the two largest |w| of their group
            g0 = before[name + ".weight"].abs().reshape(groups.shape)
            kept = (groups != 0)
            assert (g0.masked_fill(~kept, float("inf")).min(-1).values
                    >= g0.masked_fill(kept, -1).max(-1).values).all()
    assert all(r["nm_2_4"] == 1.0 for r in sparsity_report(llama)[:-2])


def gqa_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)).eval()


IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_structured_llama_removes_the_dead_head_group_and_channels_exactly(tmp_path):
    model = gqa_llama()
    with torch.no_grad():
        for layer in model.model.layers:  # KV group 1 (query heads 2, 3) and 16 MLP channels contribute nothing
            layer.self_attn.o_proj.weight[:, 16:] = 0
            layer.mlp.down_proj.weight[:, ::4] = 0
    reference, params = logits(model), sum(p.numel() for p in model.parameters())
    info = structured_prune(model, heads=0.5, mlp=0.25)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 8, 48)
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
    assert attn.o_proj.weight.shape == (32, 16) and model.model.layers[1].mlp.down_proj.weight.shape == (32, 48)
    assert info["params_after"] == sum(p.numel() for p in model.parameters()) < params
    assert torch.allclose(logits(model), reference, atol=1e-5)  # only dead parts went

    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    assert torch.equal(logits(loaded), logits(model))


def test_structured_small_fractions_change_outputs_gracefully(calib):
    reference = logits(gqa_llama())
    unchanged = gqa_llama()
    assert structured_prune(unchanged, mlp=0.001)["channels_removed"] == 0
    assert torch.equal(logits(unchanged), reference)
    change = {}
    for frac in (1 / 64, 0.5):
        model = gqa_llama()
        structured_prune(model, mlp=frac, calibration_batches=[{"input_ids": IDS}])
        change[frac] = float((logits(model) - reference).abs().mean())
    assert 0 < change[1 / 64] < change[0.5]


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3)).eval()


def test_structured_bert_shrinks_mlp_and_round_trips(tmp_path):
    model = tiny_bert()
    params = sum(p.numel() for p in model.parameters())
    before = state(model)
    with pytest.raises(LmcycleError, match="heads"):
        structured_prune(model, heads=0.5)
    assert same_state(model, before)
    structured_prune(model, mlp=0.5, calibration_batches=[{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}])
    assert model.config.intermediate_size == 32
    assert model.bert.encoder.layer[0].output.dense.weight.shape == (32, 32)
    assert sum(p.numel() for p in model.parameters()) == params - 2 * (2 * 32 * 32 + 32)
    model.save_pretrained(tmp_path / "b")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b").eval()
    assert torch.equal(logits(loaded), logits(model))


def test_healing_lowers_the_loss_and_keeps_the_zeros(tok, trained, tmp_path):
    llama = copy.deepcopy(trained)
    texts = sentences(64, seed=5)
    batches = lm_batches(tok, sentences(32, seed=6))  # held out
    dense_loss = mean_token_loss(llama, batches)
    masks = magnitude_prune(llama, 0.7)
    loss_before = mean_token_loss(llama, batches)
    heal_with_lora(llama, tok, texts, masks, LoraConfig(r=4, alpha=8), TrainConfig(max_steps=30, lr=1e-2,
                   batch_size=8, log_every=5), tmp_path / "heal", log=lambda **m: None, seed=0)
    loss_after = mean_token_loss(llama, batches)
    assert loss_before > dense_loss + 0.2  # pruning hurt
    assert loss_after < loss_before - 0.5 * (loss_before - dense_loss)  # healing recovered over half of it
    for name, layer in prunable_layers(llama).items():
        assert torch.equal(layer.weight != 0, masks[name])  # the zeros stay zero, the rest moved off zero
    assert type(llama.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # adapters merged away


@pytest.mark.parametrize("call, field", [
    (lambda m, c: magnitude_prune(m, 0.0), "sparsity"),
    (lambda m, c: magnitude_prune(m, 1.0), "sparsity"),
    (lambda m, c: wanda_prune(m, c, 1.5), "sparsity"),
    (lambda m, c: nm_prune(m, 4, 4), "n"),
    (lambda m, c: nm_prune(m, 0, 4), "n"),
    (lambda m, c: nm_prune(m, 2, 5), "m"),
    (lambda m, c: wanda_prune(m, [], 0.5), "calibration"),
    (lambda m, c: wanda_prune(m, [{"input_ids": torch.rand(2, 8)}], 0.5), "calibration"),
    (lambda m, c: nm_prune(m, 2, 4, score="wanda"), "calibration"),
    (lambda m, c: structured_prune(m, heads=1.0), "heads"),
    (lambda m, c: structured_prune(m, mlp=-0.1), "mlp"),
    (lambda m, c: magnitude_prune(m, 0.5, layers="nothing_matches"), "layers"),
])
def test_bad_input_raises_and_leaves_the_model_untouched(llama, calib, call, field):
    before = state(llama)
    with pytest.raises(LmcycleError) as e:
        call(llama, calib)
    assert e.value.field == field
    assert same_state(llama, before)


def test_bad_calibration_texts_and_architectures(tok):
    with pytest.raises(LmcycleError, match="empty"):
        tokenize_calibration(tok, [])
    with pytest.raises(LmcycleError, match="not text"):
        tokenize_calibration(tok, ["fine", torch.zeros(3, 8, 8)])
    gpt2 = tiny_gpt2(tok)
    before = state(gpt2)
    with pytest.raises(LmcycleError, match="Llama and BERT"):
        structured_prune(gpt2, mlp=0.5)
    assert same_state(gpt2, before)


def test_prune_stage_with_healing(tmp_path, tok, llama):
    ctx = run_context(tmp_path, llama, tok)
    cfg = PruneStage(method="wanda", sparsity=0.5, calibration="reverse", n_calibration=32, max_len=32,
                     eval_data=["dev"], heal=HealConfig(r=4, alpha=8, data=["reverse"],
                                                        train=TrainConfig(max_steps=30, lr=2e-2, batch_size=8)))
    out = run_prune(cfg, ctx)
    from lmcycle.artifacts import load_model

    pruned, _ = load_model(out["model"])
    report = json.loads((tmp_path / "run" / "prune" / "sparsity.json").read_text())
    assert report[-2]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity_report(pruned)[-2]["sparsity"] == pytest.approx(0.5, abs=1e-3)  # healing kept the masks
    ppl = json.loads((tmp_path / "run" / "prune" / "eval.json").read_text())["perplexity"]
    assert ppl["after_heal"]["dev"] < ppl["after_prune"]["dev"]
    assert {r.get("event") for r in ctx.read_metrics("prune")} >= {"prune", "heal"}


def test_prune_stage_structured_and_its_errors(tmp_path, tok, llama):
    ctx = run_context(tmp_path, llama, tok)
    with pytest.raises(LmcycleError) as e:
        run_prune(PruneStage(method="wanda"), ctx)
    assert e.value.field == "calibration"
    out = run_prune(PruneStage(name="shrink", method="structured", heads=0.5, mlp=0.5), ctx)
    loaded = AutoModelForCausalLM.from_pretrained(out["model"])
    assert (loaded.config.num_attention_heads, loaded.config.intermediate_size) == (1, 32)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in llama.parameters())
    with pytest.raises(ValidationError):
        PruneStage(method="magnitude", sparsity=1.0)
