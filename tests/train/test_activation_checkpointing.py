"""Activation checkpointing (train/memory.py, `train.activation_checkpointing`): the blocks it finds, gradients
and losses equal to training without it (full fine-tuning, LoRA on a frozen base, QLoRA, prompt tuning, Llama,
GPT-2 with dropout, T5, BERT), blocks really recomputed and fewer activations kept, unchanged module and file key
names, resume with the setting changed, and the key/value cache refused in a training forward."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import tiny_lm
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lmcycle.adapt.lora import LoraConfig, add_lora, lora_state_dict
from lmcycle.adapt.prompt_tuning import PromptTuningConfig, add_prompt_tuning
from lmcycle.adapt.qlora import quantize_model
from lmcycle.align.ppo import PolicyWithValue
from lmcycle.config import validate
from lmcycle.errors import LmcycleError
from lmcycle.stages.sft import SftStage, run_sft
from lmcycle.train.loop import TrainConfig, lm_loss_sum, train
from lmcycle.train.memory import (
    activation_checkpointing,
    apply_activation_checkpointing,
    is_checkpointed,
    remove_activation_checkpointing,
    transformer_blocks,
)

V = 300


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_dropout=0.1))


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    # dropout everywhere: the recomputation must draw the same masks as the first forward did
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2, pad_token_id=0))


def t5(seed: int = 0) -> T5ForConditionalGeneration:
    # two blocks per stack: the later blocks get the position bias the first one computed
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, dropout_rate=0.1,
                                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                    max_position_embeddings=64))


def lm_batch(seq2seq: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    if seq2seq:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, V, (3, 7), generator=gen)}
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, loss_fn, batch, checkpointed: bool, seed: int = 5):
    """The loss and every trainable parameter's gradient, by name, of one forward and backward in train mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout draws for both runs
    with activation_checkpointing(model, checkpointed):
        loss = loss_fn(model, batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def lm_loss(model, batch):
    loss_sum, n = lm_loss_sum(model, batch)
    return loss_sum / n


def count_block_forwards(model) -> tuple[dict[str, int], list]:
    """Calls of each block's first leaf module (a projection or a norm), by block: a recomputed block counts 2."""
    calls: dict[str, int] = {}
    handles = []
    for i, block in enumerate(transformer_blocks(model)):
        first = next(m for m in block.modules() if not list(m.children()))
        calls[i] = 0
        handles.append(first.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)))
    return calls, handles


def assert_same(plain, checkpointed):
    loss0, grads0 = plain
    loss1, grads1 = checkpointed
    assert torch.equal(loss0, loss1)  # the forward is the same computation
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt_tuning"])
def test_gradients_equal_those_without_checkpointing(arch, method):
    model = {"llama": llama, "gpt2": gpt2, "t5": t5}[arch]()
    seq2seq = arch == "t5"
    if method == "qlora":
        quantize_model(model, bits=4)
    if method in ("lora", "qlora"):
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    if method == "prompt_tuning":
        model = add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=3))
    batch = lm_batch(seq2seq)
    plain = loss_and_grads(model, lm_loss, batch, checkpointed=False)
    calls, handles = count_block_forwards(model)
    checkpointed = loss_and_grads(model, lm_loss, batch, checkpointed=True)
    for h in handles:
        h.remove()
    assert_same(plain, checkpointed)
    if method != "full":
        # Only the adapters (or the soft prompt) train; their gradients reach them through frozen blocks whose
        # inputs require no grad: non-reentrant checkpointing needs no enable_input_require_grads.
        assert all("lora_" in n or "prompt" in n for n in plain[1])
    blocks = transformer_blocks(model)
    assert len(blocks) == {"llama": 3, "gpt2": 2, "t5": 4}[arch]
    assert all(n == 2 for n in calls.values()), calls  # each block ran again during backward
    assert not any(is_checkpointed(b) for b in blocks)  # the with-block left the model as it was


def test_a_bert_classifier_and_a_ppo_policy_with_value_head_checkpoint_their_blocks():
    model = bert()
    batch = {"input_ids": lm_batch()["input_ids"], "labels": torch.tensor([0, 2, 1])}

    def cls_loss(m, b):
        return m(**b).loss

    assert [type(b).__name__ for b in transformer_blocks(model)] == ["BertLayer", "BertLayer"]
    assert_same(loss_and_grads(model, cls_loss, batch, False), loss_and_grads(model, cls_loss, batch, True))

    policy = llama()
    agent = PolicyWithValue(policy, beta=0.1)
    assert transformer_blocks(agent) == list(policy.model.layers)

    def value_loss(m, b):  # the value head reads the last hidden state through every block
        out = m.policy(input_ids=b["input_ids"], output_hidden_states=True, use_cache=False)
        return m.value_head(out.hidden_states[-1]).square().mean() + out.logits.mean()

    batch = lm_batch()
    assert_same(loss_and_grads(agent, value_loss, batch, False), loss_and_grads(agent, value_loss, batch, True))


def test_blocks_are_the_repeated_layers_each_family_declares():
    for model, lists in ((llama(), ["model.layers"]), (gpt2(), ["transformer.h"]),
                         (t5(), ["encoder.block", "decoder.block"])):
        expected = [m for name in lists for m in model.get_submodule(name)]
        assert transformer_blocks(model) == expected
        # the same classes transformers names as never to be split across devices (what FSDP wraps too)
        assert {type(b).__name__ for b in expected} == set(model._no_split_modules)
    with pytest.raises(LmcycleError, match="no transformer blocks") as e:
        apply_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    assert e.value.field == "train.activation_checkpointing"


def test_names_keys_and_copies_are_unchanged_while_checkpointed():
    model = add_lora(llama(), LoraConfig(r=4))
    names = [n for n, _ in model.named_modules()]
    state = model.state_dict()
    adapter = lora_state_dict(model)
    blocks = apply_activation_checkpointing(model)
    assert apply_activation_checkpointing(model) == []  # already checkpointed: nothing more to do
    assert [n for n, _ in model.named_modules()] == names
    assert list(model.state_dict()) == list(state) and list(lora_state_dict(model)) == list(adapter)
    assert not any("_checkpoint_wrapped_module" in k for k in model.state_dict())

    # A deep copy (PPO's frozen reference, say) checkpoints its own blocks, not the original's.
    twin = copy.deepcopy(model)
    for block, original in zip(transformer_blocks(twin), blocks, strict=True):
        assert is_checkpointed(block) and block.forward.__self__ is block and block is not original
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    batch = lm_batch()
    twin.train()
    model.train()
    torch.manual_seed(0)
    assert lm_loss(twin, batch) != lm_loss(model, batch)

    remove_activation_checkpointing(model)
    assert not any("forward" in b.__dict__ for b in blocks)


def test_a_training_forward_with_a_kv_cache_is_refused_and_no_grad_keeps_the_cache():
    model = llama().train()
    ids = lm_batch()["input_ids"]
    with activation_checkpointing(model):
        assert model.config.use_cache is False  # a plain model(ids) builds no cache to write twice
        assert model(input_ids=ids).logits.requires_grad
        with pytest.raises(LmcycleError, match="use_cache=False") as e:
            model(input_ids=ids, use_cache=True)
        assert e.value.field == "train.activation_checkpointing"
        with torch.no_grad():  # generation and rollouts: not checkpointed, the cache works as always
            assert model(input_ids=ids, use_cache=True).cache is not None
    assert model.config.use_cache is True


def tiny_train(model, tmp_path, max_steps: int, checkpointed: bool, **kw):
    batch = lm_batch()
    cfg = TrainConfig(max_steps=max_steps, lr=1e-2, seed=3, activation_checkpointing=checkpointed, log_every=1,
                      **kw)
    return train(model, lambda step: [batch], lm_loss_sum, cfg, tmp_path, log=lambda **_: None)


def test_train_gives_the_same_losses_and_resumes_with_the_setting_changed(tmp_path):
    plain = tiny_train(llama(), tmp_path / "a", 4, checkpointed=False)
    model = llama()
    checkpointed = tiny_train(model, tmp_path / "b", 4, checkpointed=True)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    assert not any(is_checkpointed(b) for b in transformer_blocks(model))
    # under bf16 autocast too: the recomputation runs in the autocast state of the first pass
    bf16 = [tiny_train(llama(), tmp_path / f"bf16-{on}", 2, checkpointed=on, bf16=True).losses for on in (0, 1)]
    assert bf16[1] == pytest.approx(bf16[0], rel=1e-5, abs=1e-6) and bf16[0] != pytest.approx(plain.losses[:2])

    # Memory settings are not part of what a resumed run must repeat: a run that ran out of memory resumes with
    # checkpointing on, and continues as it would have without.
    resumed = {}
    for on in (False, True):
        tiny_train(llama(), tmp_path / f"c{on}", 2, checkpointed=False)
        resumed[on] = tiny_train(llama(), tmp_path / f"c{on}", 4, checkpointed=on)
    assert resumed[True].step == 4
    assert resumed[True].losses == pytest.approx(resumed[False].losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("arch", "peft"), [("llama", {"method": "lora", "r": 4, "alpha": 8}), ("t5", None)])
def test_sft_with_checkpointing_saves_the_same_files_with_the_same_keys(arch, peft, tok, t5_tok, tmp_path):
    seq2seq = arch == "t5"
    tokenizer = t5_tok if seq2seq else tok
    produced, metrics = {}, {}
    for on in (False, True):
        model = tiny_lm.tiny_t5(tokenizer) if seq2seq else tiny_lm.tiny_llama(tokenizer)
        ctx = tiny_lm.run_context(tmp_path / str(on), model, tokenizer)
        cfg = {"data": [{"dataset": "reverse"}], "max_len": 64,
               "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1,
                         "activation_checkpointing": on}}
        produced[on] = run_sft(validate(SftStage, {**cfg, **({"peft": peft} if peft else {})}), ctx)
        metrics[on] = [r["loss"] for r in ctx.read_metrics("sft") if "loss" in r]
    assert metrics[True] == pytest.approx(metrics[False], rel=1e-5)
    for key in ("model", "adapter") if peft else ("model",):
        files = sorted(p.name for p in Path(produced[False][key]).iterdir())
        assert files == sorted(p.name for p in Path(produced[True][key]).iterdir())
        for name in (f for f in files if f.endswith(".safetensors")):
            off, on = (load_file(str(Path(produced[flag][key]) / name)) for flag in (False, True))
            assert list(on) == list(off) and not any("_checkpoint" in k for k in on)
            for k in off:
                torch.testing.assert_close(on[k], off[k], rtol=1e-4, atol=1e-6)
    if peft:
        config = json.loads((Path(produced[True]["adapter"]) / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"


@pytest.mark.parametrize("make", [llama, t5], ids=["llama", "t5"])
@pytest.mark.parametrize("order", ["checkpoint-then-shard", "shard-then-checkpoint"])
def test_composes_with_fsdp2_fully_shard_per_block(make, order, tmp_path):
    """FSDP2 on every block and the root (one gloo rank, as the fsdp strategy will shard) with checkpointing on
    in either order: the same gradients, and no wrapper in the parameter names."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    batch = lm_batch(seq2seq=make is t5)
    model = add_lora(make(), LoraConfig(r=4))
    plain = loss_and_grads(model, lm_loss, batch, checkpointed=False)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = add_lora(make(), LoraConfig(r=4))
        names = list(model.state_dict())
        if order == "checkpoint-then-shard":
            apply_activation_checkpointing(model)
        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        loss, grads = loss_and_grads(model, lm_loss, batch, checkpointed=order == "shard-then-checkpoint")
        grads = {n: g.full_tensor() for n, g in grads.items()}
        assert list(model.state_dict()) == names
    finally:
        dist.destroy_process_group()
    assert_same(plain, (loss, grads))
