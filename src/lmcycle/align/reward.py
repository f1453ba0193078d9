"""Reward model: a scalar score per (prompt, response) text, trained on chosen/rejected pairs (Bradley-Terry).

Two backbones are supported, both behind :class:`RewardModel`:

- ``kind="classifier"``: a Hugging Face sequence classifier with ``num_labels=1`` (e.g. BERT). Its own pooling
  decides where the score is read (BERT: the first token, ``[CLS]``; decoder classifiers: the last non-pad
  token). Inputs are moved to right padding first, so a first-token pooler never reads a pad.
- ``kind="causal"``: a decoder backbone (the base of a causal LM, without its LM head) plus a scalar
  ``nn.Linear(hidden, 1)`` head read at the last real token (:func:`last_token_index`, found from the attention
  mask, never from ``eos``/``pad`` ids, which are often the same token). Position ids are derived from the mask,
  so left and right padding give the same score.

A pair batch (:func:`collate_pairs`) stacks the ``B`` chosen rows over the ``B`` rejected rows, so one forward
pass scores both. After training, :func:`reward_stats` (mean, std of the rewards) is kept on the model and saved
with it, so PPO can :func:`normalise` scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_dir
from lmcycle.data.batching import pad_id_of, pad_rows
from lmcycle.data.preferences import PreferencePair
from lmcycle.errors import LmcycleError
from lmcycle.models.device import check_attn_implementation, hf_attn_implementation, resolve_device
from lmcycle.models.load import ensure_pad_token, eval_mode, forward_accepts
from lmcycle.train.loop import (
    Batch,
    TrainConfig,
    TrainResult,
    grouped_batch_indices,
    micro_batch_indices,
    train,
)

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of ``attention_mask`` [B, T] (1 = token): LongTensor [B].

    Correct for right padding, left padding and no padding (it is the position of the last 1). A row without
    any real token gives 0.
    """
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(dim=1)


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front (right padding): ``(input_ids, attention_mask)``, both [B, T].

    Assumes each row's real tokens are contiguous (true for left and right padding).
    """
    lead = (attention_mask.cumsum(1) == 0).sum(1, keepdim=True)  # leading pads per row
    index = (torch.arange(input_ids.size(1), device=input_ids.device) + lead) % input_ids.size(1)
    return input_ids.gather(1, index), attention_mask.gather(1, index)


class RewardModel(nn.Module):
    """Scores texts: ``forward(input_ids [B, T], attention_mask [B, T]) -> rewards [B]``.

    Build it with :meth:`from_classifier` or :meth:`from_causal_lm`. ``stats`` (``{"mean", "std"}`` or None) are
    the normalisation statistics, saved and loaded with the weights.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, stats: dict[str, float] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.kind = "classifier" if head is None else "causal"
        self.stats = stats

    @classmethod
    def from_classifier(cls, classifier: nn.Module) -> RewardModel:
        """Wrap a HF sequence classifier; it must have ``num_labels == 1`` (one score, not class logits)."""
        if getattr(classifier.config, "num_labels", None) != 1:
            raise LmcycleError(f"a reward classifier needs num_labels=1, got {classifier.config.num_labels}",
                               field="num_labels")
        return cls(classifier)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> RewardModel:
        """Take the decoder base of ``lm`` (a ``*ForCausalLM`` or a base model) and add a fresh scalar head."""
        if getattr(lm.config, "is_encoder_decoder", False):
            raise LmcycleError(f"a causal reward model needs a decoder-only model, got {type(lm).__name__}",
                               field="model")
        backbone = lm.base_model
        # The head is float32 over any backbone dtype, like a PPO value head: forward casts the hidden state to it.
        return cls(backbone, nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards [B] (float32) of ``input_ids`` [B, T] with ``attention_mask`` [B, T], any padding side."""
        if self.head is None:
            input_ids, attention_mask = right_align(input_ids, attention_mask)
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
        kwargs = {}
        if forward_accepts(type(self.backbone), "position_ids"):
            kwargs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               **kwargs).last_hidden_state  # [B, T, H]
        last = hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()

    def save(self, path: str | Path, tokenizer=None) -> Path:
        """Write the backbone (``save_pretrained``, safetensors), the head, the stats and optionally the
        tokenizer into ``path``, atomically. For a classifier, ``path`` is itself a loadable HF model dir."""
        with atomic_dir(path) as tmp:
            self.backbone.save_pretrained(tmp)
            if self.head is not None:
                safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in
                                             self.head.state_dict().items()}, str(tmp / HEAD_FILE))
            (tmp / META_FILE).write_text(json.dumps({"kind": self.kind, "stats": self.stats}, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
             ) -> RewardModel:
        """Load what :meth:`save` wrote, on the CPU (``.to(device)`` it), the backbone in ``dtype`` (the head as
        saved) computing attention with ``attn_implementation``."""
        attention = hf_attn_implementation(check_attn_implementation(attn_implementation))
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise LmcycleError(f"not a saved reward model (no {META_FILE})", file=path)
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("kind") == "classifier":
            return cls(AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=attention,
                                                                          dtype=dtype), stats=meta.get("stats"))
        backbone = AutoModel.from_pretrained(path, attn_implementation=attention, dtype=dtype)
        weights = safetensors.torch.load_file(str(path / HEAD_FILE))
        head = nn.Linear(weights["weight"].size(1), 1, dtype=weights["weight"].dtype)
        head.load_state_dict(weights)
        return cls(backbone, head, stats=meta.get("stats"))


# -- loss and metrics ----------------------------------------------------------------------------------------------


def pair_losses(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss [B]: ``-log sigmoid(r_chosen - r_rejected - margin)`` (margin [B] or None)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)  # logsigmoid stays finite where log(sigmoid(x)) underflows to -inf


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of :func:`pair_losses`: a scalar."""
    return pair_losses(r_chosen, r_rejected, margin).mean()


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores strictly higher."""
    return float((r_chosen > r_rejected).float().mean())


# -- data ----------------------------------------------------------------------------------------------------------


def encode_pairs(pairs: list[PreferencePair], tokenizer, max_len: int) -> list[dict]:
    """Token ids of ``prompt + chosen`` and ``prompt + rejected`` of each pair, at most ``max_len`` tokens.

    Long texts are truncated from the left (the tokenizer's special tokens are kept): the end of the response
    is what the score is read at and what differs between the two, so the prompt's start goes first.
    Returns ``[{"chosen": ids, "rejected": ids, "margin": float}, ...]``.
    """
    if not pairs:
        raise LmcycleError("there are no preference pairs to encode", field="pairs")
    room = max_len - tokenizer.num_special_tokens_to_add()
    if room < 1:
        raise LmcycleError(f"max_len {max_len} leaves no room for any response token (the tokenizer adds "
                           f"{tokenizer.num_special_tokens_to_add()} special tokens)", field="max_len")
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # a per-call truncation side is ignored by transformers 5
    try:
        chosen = tokenizer([p.prompt + p.chosen for p in pairs], truncation=True, max_length=max_len)["input_ids"]
        rejected = tokenizer([p.prompt + p.rejected for p in pairs], truncation=True,
                             max_length=max_len)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    return [{"chosen": c, "rejected": r, "margin": float(p.margin)}
            for c, r, p in zip(chosen, rejected, pairs, strict=True)]


def collate_pairs(encoded: list[dict], tokenizer) -> Batch:
    """A pair batch: ``input_ids``/``attention_mask`` [2B, T] (B chosen rows, then their B rejected rows),
    padded on ``tokenizer.padding_side`` (:func:`~lmcycle.data.batching.pad_id_of`), and ``margin`` [B]."""
    rows = [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    ids, mask = pad_rows(rows, pad_id_of(tokenizer), left=tokenizer.padding_side == "left")
    return {"input_ids": ids, "attention_mask": mask,
            "margin": torch.tensor([e["margin"] for e in encoded], dtype=torch.float32)}


def pair_batches(encoded: list[dict], tokenizer, batch_size: int) -> list[Batch]:
    """``encoded`` in order, as pair batches of at most ``batch_size`` pairs (for evaluation)."""
    return [collate_pairs(encoded[i:i + batch_size], tokenizer) for i in range(0, len(encoded), batch_size)]


def score_pairs(model: RewardModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen [B], r_rejected [B])`` of a pair batch."""
    rewards = model(batch["input_ids"], batch["attention_mask"])
    n = rewards.size(0) // 2
    return rewards[:n], rewards[n:]


# -- training ------------------------------------------------------------------------------------------------------


def pair_loss_fn(use_margin: bool) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]:
    """A ``loss_fn`` for :func:`lmcycle.train.loop.train`: ``(summed pair loss, number of pairs)``; the loop
    divides by the pair count, so the gradient is that of the mean pair loss."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        r_chosen, r_rejected = score_pairs(model, batch)
        margin = batch["margin"] if use_margin else None
        return pair_losses(r_chosen, r_rejected, margin).sum(), int(r_chosen.size(0))

    return loss_fn


def pair_metrics(model: RewardModel, batches: list[Batch], use_margin: bool = False) -> dict[str, float]:
    """``{"loss", "accuracy"}`` over pair batches (no gradients; the model's mode is left as it is)."""
    metrics = held_out_reward_metrics(model, batches, use_margin)
    return {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}


def train_reward_model(model: RewardModel, tokenizer, pairs: list[PreferencePair], cfg: TrainConfig,
                       out_dir: str | Path, log: Callable[..., None], margin: bool = False, max_len: int = 512,
                       eval_pairs: list[PreferencePair] | None = None, group_by_length: bool = True) -> TrainResult:
    """Train ``model`` in place on ``pairs`` with the pairwise loss (``margin``: subtract each pair's margin).

    Checkpoints go under ``out_dir`` (resumable). ``eval_pairs`` give ``eval_loss``/``eval_accuracy``. At the end
    ``model.stats`` is set to :func:`reward_stats` over the training pairs, so :meth:`RewardModel.save` keeps it.
    ``group_by_length``: batches of pairs of similar length (:func:`pair_step_indices`), so less padding.
    """
    encoded = encode_pairs(pairs, tokenizer, max_len)
    seed = cfg.seed if cfg.seed is not None else 0
    lengths = [max(len(e["chosen"]), len(e["rejected"])) for e in encoded]

    def batch_at(step: int) -> list[Batch]:
        return [collate_pairs([encoded[i] for i in idx], tokenizer)
                for idx in pair_step_indices(lengths, step, cfg, seed, group_by_length)]

    eval_fn = None
    if eval_pairs:
        eval_batches = pair_batches(encode_pairs(eval_pairs, tokenizer, max_len), tokenizer, cfg.batch_size)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            return {f"eval_{k}": v for k, v in pair_metrics(m, eval_batches, margin).items()}

    result = train(model, batch_at, pair_loss_fn(margin), cfg, out_dir, log, eval_fn=eval_fn, desc="reward")
    model.stats = reward_stats(model, pair_batches(encoded, tokenizer, cfg.batch_size))
    return result


def pair_step_indices(lengths: list[int], step: int, cfg: TrainConfig, seed: int,
                      group_by_length: bool) -> list[list[int]]:
    """The pair indices of each micro-batch of ``step`` on this rank: length-grouped
    (:func:`~lmcycle.train.loop.grouped_batch_indices`, ``lengths[i]`` = pair ``i``'s longer sequence) or plainly
    shuffled (:func:`~lmcycle.train.loop.micro_batch_indices`). A pair batch is padded to its longest row, so
    grouping pairs of similar length saves the padded positions' compute (shared by reward and DPO training)."""
    if group_by_length:
        return grouped_batch_indices(lengths, step, cfg.batch_size, cfg.grad_accum, seed)
    return micro_batch_indices(len(lengths), step, cfg.batch_size, cfg.grad_accum, seed)


def reward_stats(model: RewardModel, batches: list[Batch]) -> dict[str, float]:
    """``{"mean", "std"}`` of the rewards of every row of ``batches`` (chosen and rejected), in eval mode."""
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        rewards = torch.cat([model(b["input_ids"].to(device), b["attention_mask"].to(device)).cpu()
                             for b in batches])
    std = float(rewards.std()) if rewards.numel() > 1 else 0.0
    return {"mean": float(rewards.mean()), "std": std}


def normalise(rewards: torch.Tensor, stats: dict[str, float], eps: float = 1e-8) -> torch.Tensor:
    """``(rewards - mean) / (std + eps)`` with the saved ``stats``."""
    return (rewards - stats["mean"]) / (stats["std"] + eps)


# -- loading and held-out metrics ----------------------------------------------------------------------------------


def load_reward_backbone(source: str, backbone: str = "auto", device: str | torch.device = "auto",
                         attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """``(RewardModel, tokenizer)`` to train, from a model folder or hub id, on ``device`` (``auto``: CUDA when
    present, else CPU) with ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``), its backbone in
    ``dtype`` (a causal backbone's fresh scalar head is float32 whatever ``dtype``).

    ``backbone``: ``classifier`` (a sequence classifier with one label; a plain encoder such as all-MiniLM-L6-v2
    gets a fresh one-label head), ``causal_lm`` (the decoder of a causal LM plus a fresh scalar head) or
    ``auto`` (``causal_lm`` when the checkpoint is a ``*ForCausalLM``/``*LMHeadModel``, else ``classifier``).
    A folder saved by :meth:`RewardModel.save` continues as the reward model it is.
    """
    device = resolve_device(device)
    check_attn_implementation(attn_implementation, device)
    attention = hf_attn_implementation(attn_implementation)
    if (Path(source) / META_FILE).is_file():
        model = RewardModel.load(source, attn_implementation=attn_implementation, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise LmcycleError(f"cannot load the reward model's backbone: {str(e).splitlines()[0]}", file=source,
                               field="model") from None
        if backbone == "auto":
            causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
            backbone = "causal_lm" if causal else "classifier"
        if backbone == "causal_lm":
            lm, tokenizer = load_model(source, device=device, attn_implementation=attn_implementation, dtype=dtype)
            model = RewardModel.from_causal_lm(lm)
        else:
            if getattr(config, "is_encoder_decoder", False):
                raise LmcycleError("an encoder-decoder cannot be a sequence-classifier reward model here; use a "
                                   "decoder (backbone: causal_lm) or an encoder", file=source, field="backbone")
            try:
                classifier = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype,
                                                                                attn_implementation=attention)
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as e:
                raise LmcycleError(f"cannot load a sequence classifier: {str(e).splitlines()[0]}", file=source,
                                   field="model") from None
            model = RewardModel.from_classifier(classifier)
    ensure_pad_token(tokenizer, model.backbone if model.head is None else None)
    return model.to(device), tokenizer


def held_out_reward_metrics(model: RewardModel, batches: list[Batch], use_margin: bool = False) -> dict[str, float]:
    """``{"accuracy", "loss", "margin", "reward_mean", "reward_std", "n"}`` over pair batches (no gradients):
    pair accuracy and loss as :func:`pair_metrics`, ``margin`` the mean of ``r_chosen - r_rejected``, and the
    mean/std over every chosen and rejected reward."""
    device = next(model.parameters()).device
    chosen, rejected, margins = [], [], []
    with torch.no_grad():
        for batch in batches:
            c, r = score_pairs(model, {k: v.to(device) for k, v in batch.items()})
            chosen.append(c.cpu())
            rejected.append(r.cpu())
            margins.append(batch["margin"])
    c, r = torch.cat(chosen), torch.cat(rejected)
    both = torch.cat([c, r])
    return {"accuracy": preference_accuracy(c, r),
            "loss": float(pairwise_loss(c, r, torch.cat(margins) if use_margin else None)),
            "margin": float((c - r).mean()), "reward_mean": float(both.mean()),
            "reward_std": float(both.std()) if both.numel() > 1 else 0.0, "n": int(c.numel())}
