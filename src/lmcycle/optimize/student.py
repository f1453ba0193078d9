"""Students for distillation: a subset of the teacher's layers (DistilBERT's initialisation) or a fresh model of
the teacher's architecture, and vocabulary trimming for classifiers (in a small BERT the word embeddings are
most of the parameters: all-MiniLM-L6-v2's are 52%, which dropping layers does not touch)."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from lmcycle.errors import LmcycleError


def default_student_layers(n_teacher: int) -> list[int]:
    """Every other teacher layer from the first (6 -> [0, 2, 4]): DistilBERT's "one layer out of two". Spread
    layers keep the teacher's depth-wise progression of features; the first layer is kept because every later
    one was trained on its output."""
    return list(range(0, n_teacher, 2))


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only transformer ``layers`` (in that order): embeddings, the listed
    layers, the final norm and the head are copied; ``config.num_hidden_layers = len(layers)`` (per-layer config
    lists such as ``layer_types`` are subset too). BERT-like encoders (bare or with a classification head) and
    decoder LMs (Llama, GPT-2); encoder-decoders (T5) are refused."""
    if getattr(teacher.config, "is_encoder_decoder", False):
        raise LmcycleError("student_from_teacher does not support encoder-decoder models (T5); use "
                           "student_config to train a student from scratch", field="student_layers")
    prefix, n_teacher = _layer_list(teacher)
    check_layers(layers, n_teacher)
    config = copy.deepcopy(teacher.config)
    for key, value in list(vars(config).items()):  # per-layer settings (layer_types, ...) follow their layers
        if isinstance(value, list) and len(value) == n_teacher and key != "architectures":
            setattr(config, key, [value[i] for i in layers])
    _set_num_layers(config, len(layers))
    student = type(teacher)(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            if int(index) not in layers:
                continue
            key = f"{prefix}.{layers.index(int(index))}.{rest}"
        state[key] = value.detach().clone()
    student.load_state_dict(state, strict=True)
    return student.to(next(teacher.parameters()).device)


def student_from_scratch(teacher: nn.Module, **overrides: Any) -> nn.Module:
    """A randomly initialised model of the teacher's class and config with ``overrides`` (e.g.
    ``num_hidden_layers=3, hidden_size=256``); the vocabulary stays the teacher's, so it shares its tokenizer."""
    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise LmcycleError(f"the teacher's config has no '{key}'", field=f"student_config.{key}")
        if key == "vocab_size" and value != teacher.config.vocab_size:
            raise LmcycleError(f"the student must share the teacher's tokenizer and vocabulary (vocab_size "
                               f"{teacher.config.vocab_size}, not {value})", field="student_config.vocab_size")
        setattr(config, key, value)
    if "num_hidden_layers" in overrides:
        n = overrides["num_hidden_layers"]
        for key, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == teacher.config.num_hidden_layers and key != "architectures":
                setattr(config, key, (value * n)[:n])
        _set_num_layers(config, n)
    try:
        student = type(teacher)(config)
    except (ValueError, TypeError, RuntimeError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmcycleError(f"cannot build the student: {first_line}", field="student_config") from None
    return student.to(next(teacher.parameters()).device)


def check_layers(layers: list[int], n_teacher: int) -> None:
    """Layer indices must be distinct, within ``0..n_teacher - 1``, and at least one."""
    if not layers:
        raise LmcycleError("student_layers is empty", field="student_layers")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise LmcycleError(f"student_layers {bad} out of range: the teacher has layers 0..{n_teacher - 1}",
                           field="student_layers")
    if len(set(layers)) != len(layers):
        raise LmcycleError(f"student_layers repeats a layer: {layers}", field="student_layers")


def param_count(model: nn.Module) -> int:
    """Parameters of ``model`` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _layer_list(model: nn.Module) -> tuple[str, int]:
    """The dotted name of the model's ``ModuleList`` of transformer layers, and its length."""
    n = num_layers_of(model.config)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return name, n
    raise LmcycleError(f"cannot find the transformer layers of {type(model).__name__}", field="teacher")


def num_layers_of(config) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise LmcycleError(f"the teacher's config ({type(config).__name__}) has no layer count", field="teacher")


def _set_num_layers(config, n: int) -> None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, n)


def hidden_size_of(config) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise LmcycleError(f"the config ({type(config).__name__}) has no hidden size", field="teacher")


# -- vocabulary trimming ------------------------------------------------------------------------------------------


def trim_vocabulary(tokenizer, used_ids: set[int]):
    """``(tokenizer, kept)``: a WordPiece tokenizer keeping only the special tokens, ``used_ids`` and every
    single-character piece (``x`` and ``##x``), renumbered ``0..K-1`` in the old order; ``kept[new] = old``.

    Why: in a small BERT most parameters are the word embeddings (all-MiniLM-L6-v2: 52%), which layer
    dropping does not touch. Texts whose words the kept pieces cover tokenize exactly as before (WordPiece's
    greedy longest match still finds the same pieces, as longer ones were not there to be found); other words
    fall back to shorter pieces and single characters, never to ``[UNK]`` for a character the old vocabulary had.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"].get("type") != "WordPiece":
        raise LmcycleError(f"trim_vocab needs a WordPiece (BERT-style) tokenizer, not {state['model'].get('type')}",
                           field="trim_vocab")
    vocab: dict[str, int] = state["model"]["vocab"]
    prefix = state["model"].get("continuing_subword_prefix", "##")
    special = {a["id"] for a in state.get("added_tokens", [])} | set(tokenizer.all_special_ids)
    chars = {i for piece, i in vocab.items() if len(piece.removeprefix(prefix)) == 1}
    kept = sorted(set(used_ids) | special | chars)
    new_id = {old: new for new, old in enumerate(kept)}
    state["model"]["vocab"] = {piece: new_id[i] for piece, i in vocab.items() if i in new_id}
    for added in state.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    _renumber_specials(state.get("post_processor"), new_id)
    backend = Tokenizer.from_str(json.dumps(state))
    names = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
                                      **names)
    return trimmed, kept


def _renumber_specials(processor: dict | None, new_id: dict[int, int]) -> None:
    """Point a post-processor's special-token ids (TemplateProcessing, BertProcessing, Sequence) to new ids."""
    if not processor:
        return
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("cls", "sep"):
        if isinstance(processor.get(key), list):
            processor[key][1] = new_id[processor[key][1]]
    for inner in processor.get("processors") or []:
        _renumber_specials(inner, new_id)


def trim_embeddings(model: nn.Module, kept: list[int]) -> None:
    """Keep input-embedding rows ``kept`` (in that order) and set ``config.vocab_size`` to match. For models
    whose output does not depend on the vocabulary (classifiers); an LM's head would have to follow."""
    old = model.get_input_embeddings()
    index = torch.tensor(kept, dtype=torch.long, device=old.weight.device)
    pad = getattr(model.config, "pad_token_id", None)
    new = nn.Embedding(len(kept), old.embedding_dim, padding_idx=kept.index(pad) if pad in kept else None)
    new.to(old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight[index])
    model.set_input_embeddings(new)
    model.config.vocab_size = len(kept)
    if pad is not None:
        model.config.pad_token_id = kept.index(pad)
