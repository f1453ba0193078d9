"""Prompt tuning: a few trainable "virtual token" embeddings in front of every input, saved in PEFT's format.

The base model stays frozen; the only trainable tensor is ``prompt_embeddings`` (v·s × hidden), where ``v`` is
``num_virtual_tokens`` and ``s`` is ``num_transformer_submodules`` (1 for decoders; 2 for encoder-decoders, as
PEFT stores it, although PEFT's prompt tuning only ever feeds the first ``v`` rows, to the encoder). Forward
semantics match ``peft.PeftModelForCausalLM`` / ``PeftModelForSeq2SeqLM``:

- decoder: the input embeddings become ``[prompt; embed(input_ids)]``, the attention mask gets ``v`` leading
  ones, labels ``v`` leading -100s. The logits we return cover the caller's tokens only (the virtual positions
  are cut off) so they line up with the caller's ``input_ids`` and labels. With a key/value cache the prompt is
  prepended on the first call only; later calls just get the ``v`` extra mask columns. Caller's position ids
  are shifted by ``v`` (the virtual tokens sit at positions ``0..v-1``), so a left-padded row decodes exactly as
  it would alone.
- encoder-decoder: the prompt goes in front of the encoder's input; the mask over the encoder output always
  gets ``v`` leading ones (also when the caller passes ``encoder_outputs`` from :meth:`get_encoder`).

Files written by :func:`save_prompt_tuning` load with ``peft.PeftModel.from_pretrained``, and PEFT-saved prompt
tuning adapters load with :func:`load_prompt_tuning`. PEFT itself is never imported here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from lmcycle.adapt.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_adapter,
    reject_unknown_settings,
    write_adapter,
)
from lmcycle.config import Config
from lmcycle.errors import LmcycleError
from lmcycle.models.kv_cache import cache_kwargs
from lmcycle.models.load import is_seq2seq

TENSOR_KEY = "prompt_embeddings"

# adapter_config.json keys of PEFT 0.21's PromptTuningConfig that do not change what a loaded prompt computes.
_UNDERSTOOD_KEYS = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                    "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                    "tokenizer_kwargs", "modules_to_save"}


class PromptTuningConfig(Config):
    """How many virtual tokens and how to initialise them."""

    num_virtual_tokens: int = Field(20, ge=1, description="soft prompt length (typically 20-100)")
    init: Literal["random", "text"] = Field(
        "random", description="random: N(0, 1) as PEFT's RANDOM; text: the embeddings of init_text's tokens")
    init_text: str | None = Field(None, validate_default=True, description="required when init is 'text'")

    @field_validator("init_text")
    @classmethod
    def _text_needs_text(cls, text: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("init") == "text" and not text:
            raise ValueError("init 'text' needs a non-empty init_text")
        return text


def _ones(batch: int, v: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, v, dtype=like.dtype, device=like.device)


class _PromptedEncoder:
    """What :meth:`PromptTunedModel.get_encoder` returns: the base encoder run on ``[prompt; input]``."""

    def __init__(self, owner: PromptTunedModel):
        self.owner = owner

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        embeds, mask = self.owner.prepend_prompt(input_ids, inputs_embeds, attention_mask)
        return self.owner.base_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask, **kwargs)


class PromptTunedModel(nn.Module):
    """A frozen HF causal LM or encoder-decoder plus a trainable soft prompt, usable where the HF model is.

    ``prompt_embeddings``: (num_virtual_tokens · num_transformer_submodules, hidden), float32 like PEFT's.
    """

    def __init__(self, base_model: nn.Module, num_virtual_tokens: int, init_weights: torch.Tensor | None = None,
                 prompt_config: PromptTuningConfig | None = None):
        super().__init__()
        self.base_model = base_model
        self.num_virtual_tokens = num_virtual_tokens
        self.num_transformer_submodules = 2 if is_seq2seq(base_model) else 1
        hidden = base_model.get_input_embeddings().weight.shape[1]
        device = base_model.get_input_embeddings().weight.device
        rows = num_virtual_tokens * self.num_transformer_submodules
        weights = torch.randn(rows, hidden, device=device) if init_weights is None else init_weights
        self.prompt_embeddings = nn.Parameter(weights.detach().to(device=device, dtype=torch.float32).clone())
        self.prompt_config = prompt_config or PromptTuningConfig(num_virtual_tokens=num_virtual_tokens)
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.train(base_model.training)  # keep the base's train/eval mode

    # -- what lmcycle's training and decoding code reads from an HF model ---------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def device(self) -> torch.device:
        return self.prompt_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def get_encoder(self) -> _PromptedEncoder:
        """The encoder with the prompt in front: ``(input_ids (B, T), attention_mask (B, T))`` -> hidden
        ``(B, v + T, hidden)``. Pass its output as ``encoder_outputs`` with the caller's (B, T) mask."""
        if not is_seq2seq(self.base_model):
            raise LmcycleError(f"{type(self.base_model).__name__} has no encoder")
        return _PromptedEncoder(self)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.base_model.prepare_decoder_input_ids_from_labels(labels=labels)

    # -- the prompt ------------------------------------------------------------------------------------------
    def prepend_prompt(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                       attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[prompt; embed(input_ids)]`` (B, v + T, hidden) and the mask (B, v + T) with leading ones."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("need input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, v = inputs_embeds.shape[0], self.num_virtual_tokens
        prompt = self.prompt_embeddings[:v].to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([prompt, inputs_embeds], dim=1)
        return embeds, self._extend_mask(attention_mask, batch)

    def _extend_mask(self, attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        return torch.cat([_ones(batch, self.num_virtual_tokens, attention_mask), attention_mask], dim=1)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                encoder_outputs: Any = None, logits_to_keep: int | torch.Tensor = 0,
                inputs_embeds: torch.Tensor | None = None, past_key_values: Any = None, **kwargs):
        """Run the base with the prompt in front; shapes as the base model's, logits over the caller's tokens.

        Decoder: ``input_ids`` (B, T) -> ``logits`` (B, T, vocab) (or the last ``logits_to_keep``), the cache
        then holds ``v + T`` positions. Encoder-decoder: ``logits`` (B, decoder length, vocab). The key/value
        cache comes as ``cache`` or, as transformers before 5.24 and PEFT name it, ``past_key_values``; the
        base model gets it under the name its transformers version uses.
        """
        cache = cache if cache is not None else past_key_values
        if is_seq2seq(self.base_model):
            return self._seq2seq_forward(input_ids, attention_mask, cache, use_cache, labels,
                                         decoder_input_ids, encoder_outputs, inputs_embeds, **kwargs)
        return self._causal_forward(input_ids, attention_mask, position_ids, cache, use_cache, labels,
                                    logits_to_keep, inputs_embeds, **kwargs)

    def _causal_forward(self, input_ids, attention_mask, position_ids, cache, use_cache, labels,
                        logits_to_keep, inputs_embeds, **kwargs):
        v = self.num_virtual_tokens
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        prefill = cache is None or not cache.get_seq_length()
        if not prefill:
            # The cache already holds the prompt: only the mask and the positions know about it.
            return self.base_model(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=self._extend_mask(attention_mask, batch),
                position_ids=None if position_ids is None else position_ids + v, **cache_kwargs(cache),
                use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        embeds, mask = self.prepend_prompt(input_ids, inputs_embeds, attention_mask)
        if position_ids is not None:
            virtual = torch.arange(v, device=position_ids.device, dtype=position_ids.dtype).expand(batch, -1)
            position_ids = torch.cat([virtual, position_ids + v], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full((batch, v), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        if isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = logits_to_keep + v  # indices into the caller's positions
        out = self.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                              **cache_kwargs(cache), use_cache=use_cache, labels=labels,
                              logits_to_keep=logits_to_keep, **kwargs)
        real = embeds.shape[1] - v
        if out.logits.shape[1] > real:
            out.logits = out.logits[:, -real:]
        return out

    def _seq2seq_forward(self, input_ids, attention_mask, cache, use_cache, labels, decoder_input_ids,
                         encoder_outputs, inputs_embeds, **kwargs):
        if encoder_outputs is None:
            inputs_embeds, attention_mask = self.prepend_prompt(input_ids, inputs_embeds, attention_mask)
        else:
            batch = encoder_outputs[0].shape[0]
            attention_mask = self._extend_mask(attention_mask, batch)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids,
                               **cache_kwargs(cache), use_cache=use_cache, labels=labels, **kwargs)


# -- building, counting, unwrapping ---------------------------------------------------------------------------
def text_init_ids(tokenizer, text: str, total: int) -> list[int]:
    """``total`` token ids of ``text`` (special tokens included, as PEFT does), cut or repeated to fit."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise LmcycleError("init_text tokenizes to no tokens", field="init_text")
    return (ids * math.ceil(total / len(ids)))[:total]


def add_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig, tokenizer=None) -> PromptTunedModel:
    """Wrap ``model`` with a new soft prompt; the base is frozen, the prompt is the only trainable tensor.

    ``init='random'`` draws N(0, 1) from torch's global generator (PEFT's RANDOM); ``init='text'`` copies the
    input embeddings of ``tokenizer(cfg.init_text)`` (needs ``tokenizer``).
    """
    if isinstance(model, PromptTunedModel):
        raise LmcycleError("the model already has a soft prompt")
    rows = cfg.num_virtual_tokens * (2 if is_seq2seq(model) else 1)
    weights = None
    if cfg.init == "text":
        if tokenizer is None:
            raise LmcycleError("prompt tuning init 'text' needs the tokenizer", field="init")
        emb = model.get_input_embeddings()
        ids = torch.tensor(text_init_ids(tokenizer, cfg.init_text, rows), device=emb.weight.device)
        if int(ids.max()) >= emb.weight.shape[0]:
            raise LmcycleError("init_text has token ids outside the model's vocabulary", field="init_text")
        with torch.no_grad():
            weights = emb(ids).float()
    return PromptTunedModel(model, cfg.num_virtual_tokens, weights, cfg)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, parameters of the base model without the prompt)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in unwrap(model).parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The base model inside a :class:`PromptTunedModel` (any other model is returned as is)."""
    return model.base_model if isinstance(model, PromptTunedModel) else model


# -- PEFT files ---------------------------------------------------------------------------------------------
def _count(config, name: str) -> int | None:
    return getattr(config, name, None)


def save_prompt_tuning(model: PromptTunedModel, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                       tokenizer_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (tensor ``prompt_embeddings``), atomically.

    PEFT refuses a TEXT-initialised config without a tokenizer path, so without one (the tokenizer path, else
    the base model path) the init is recorded as RANDOM; the saved weights are what count.
    """
    if not isinstance(model, PromptTunedModel):
        raise LmcycleError(f"{type(model).__name__} has no soft prompt to save")
    cfg = model.config
    seq2seq = is_seq2seq(model.base_model)
    tokenizer_path = tokenizer_name_or_path or base_model_name_or_path
    text = model.prompt_config.init == "text" and tokenizer_path is not None
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": model.prompt_embeddings.shape[1],
        "num_transformer_submodules": model.num_transformer_submodules,
        "num_attention_heads": _count(cfg, "num_attention_heads") or _count(cfg, "n_head"),
        "num_layers": _count(cfg, "num_hidden_layers") or _count(cfg, "num_layers") or _count(cfg, "n_layer"),
        "prompt_tuning_init": "TEXT" if text else "RANDOM",
        "prompt_tuning_init_text": model.prompt_config.init_text if text else None,
        "tokenizer_name_or_path": tokenizer_path if text else tokenizer_name_or_path,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
        "revision": None,
        "inference_mode": True,
    }
    tensors = {TENSOR_KEY: model.prompt_embeddings.detach().contiguous().cpu()}
    return write_adapter(out_dir, config, tensors)


def _positive_int(config: dict, key: str, cfg_file: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LmcycleError(f"must be a positive integer, got {value!r}", file=cfg_file, field=key)
    return value


def read_prompt_adapter(adapter_dir: str | os.PathLike, model: nn.Module) -> tuple[dict, torch.Tensor]:
    """The config and the checked ``prompt_embeddings`` (v·s × hidden) of a PEFT prompt-tuning adapter for
    ``model``; raises :class:`LmcycleError` naming the file and field of the first problem."""
    path = Path(adapter_dir)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    config, tensors = read_adapter(path, "PROMPT_TUNING")
    # Keys we do not know (a newer PEFT) are fine while unset; a set one could change what the prompt does.
    reject_unknown_settings(config, _UNDERSTOOD_KEYS, cfg_file)
    if config.get("modules_to_save"):
        raise LmcycleError(f"unsupported value {config['modules_to_save']!r}", file=cfg_file, field="modules_to_save")
    seq2seq = is_seq2seq(model)
    want_task = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    if config.get("task_type") != want_task:
        raise LmcycleError(f"task_type is {config.get('task_type')!r}, this {type(model).__name__} needs "
                           f"{want_task!r}", file=cfg_file, field="task_type")
    v = _positive_int(config, "num_virtual_tokens", cfg_file)
    token_dim = _positive_int(config, "token_dim", cfg_file)
    hidden = model.get_input_embeddings().weight.shape[1]
    if token_dim != hidden:
        raise LmcycleError(f"token_dim is {token_dim} but the model's hidden size is {hidden} (an adapter for a "
                           f"different base model?)", file=cfg_file, field="token_dim")
    submodules = config.get("num_transformer_submodules") or (2 if seq2seq else 1)
    if submodules not in ((1, 2) if seq2seq else (1,)):
        raise LmcycleError(f"unsupported value {submodules!r} for a {want_task} model", file=cfg_file,
                           field="num_transformer_submodules")
    if set(tensors) != {TENSOR_KEY}:
        raise LmcycleError(f"expected exactly one tensor '{TENSOR_KEY}', found {sorted(tensors)}", file=weights_file)
    prompt = tensors[TENSOR_KEY]
    if tuple(prompt.shape) != (v * submodules, token_dim):
        raise LmcycleError(f"'{TENSOR_KEY}' has shape {tuple(prompt.shape)}, the config needs "
                           f"{(v * submodules, token_dim)}", file=weights_file, field=TENSOR_KEY)
    if not prompt.is_floating_point() or not torch.isfinite(prompt).all():
        raise LmcycleError(f"'{TENSOR_KEY}' must hold finite floating-point values", file=weights_file,
                           field=TENSOR_KEY)
    return config, prompt


def load_prompt_tuning(model: nn.Module, adapter_dir: str | os.PathLike) -> PromptTunedModel:
    """Wrap ``model`` with the PEFT-format soft prompt in ``adapter_dir`` (trainable, base frozen).

    Every check runs before ``model`` is touched. A seq2seq adapter saved with one submodule gets the second
    (decoder) half PEFT would have: copies of the first ``v`` rows (prompt tuning never reads it).
    """
    if isinstance(model, PromptTunedModel):
        raise LmcycleError("the model already has a soft prompt")
    config, prompt = read_prompt_adapter(adapter_dir, model)
    v = int(config["num_virtual_tokens"])
    if is_seq2seq(model) and prompt.shape[0] == v:
        prompt = torch.cat([prompt, prompt])
    init = "text" if config.get("prompt_tuning_init") == "TEXT" and config.get("prompt_tuning_init_text") else "random"
    cfg = PromptTuningConfig(num_virtual_tokens=v, init=init,
                             init_text=config.get("prompt_tuning_init_text") if init == "text" else None)
    return PromptTunedModel(model, v, prompt, cfg)
