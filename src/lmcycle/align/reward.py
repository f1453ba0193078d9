"""Reward model: a scalar score per (prompt, response) text, trained on chosen/rejected pairs (Bradley-Terry) or
on whole rankings (Plackett-Luce, or the tie-aware Rao-Kupper and Davidson models).

Two backbones are supported, both behind :class:`RewardModel`:

- ``kind="classifier"``: a Hugging Face sequence classifier with ``num_labels=1`` (e.g. BERT). Its own pooling
  decides where the score is read (BERT: the first token, ``[CLS]``; decoder classifiers: the last non-pad
  token). Inputs are moved to right padding first, so a first-token pooler never reads a pad.
- ``kind="causal"``: a decoder backbone (the base of a causal LM, without its LM head) plus a scalar
  ``nn.Linear(hidden, 1)`` head read at the last real token (:func:`last_token_index`, found from the attention
  mask, never from ``eos``/``pad`` ids, which are often the same token). Position ids are derived from the mask,
  so left and right padding give the same score.

A pair's target may be soft (the probability that ``chosen`` is better, e.g. an AI judge's): the pairwise loss
is then the cross-entropy to it (:func:`soft_bradley_terry_losses`); a target of 1 is plain Bradley-Terry.

A pair batch (:func:`collate_pairs`) stacks the ``B`` chosen rows over the ``B`` rejected rows, so one forward
pass scores both. After training, :func:`reward_stats` (mean, std of the rewards) is kept on the model and saved
with it, so PPO can :func:`normalise` scores.

The ranking losses (:func:`train_ranking_reward_model`) see whole rankings: a ranking batch
(:func:`collate_rankings`) holds every ranked completion of each of its rankings once, and the losses are pure
functions of the scores [R, K] and ranks [R, K] of those rankings:

- ``listwise``: Plackett-Luce, ``-Σ_j [s_(j) - logsumexp(s_(j..k))]``; a tie group shares one denominator over
  everything not yet placed (Breslow), unranked completions are left out (:func:`plackett_luce_losses`).
- ``rao_kupper``: ``P(i≻j) = σ(s_i - s_j - log θ)``, ``P(i=j) = (θ² - 1)·σ(s_i - s_j - log θ)·σ(s_j - s_i - log θ)``,
  θ > 1 (:func:`rao_kupper_log_probs`).
- ``davidson``: ``P(i≻j) ∝ e^{s_i}``, ``P(i=j) ∝ ν·e^{(s_i+s_j)/2}``, ν > 0 (:func:`davidson_log_probs`).

Both tie models sum ``-log P`` over every strict and every tied pair of a ranking (:func:`tie_pair_losses`); θ or
ν is fixed, or learned with the model (:class:`LearnedTie`). Per-labeler weights (:func:`unit_weights`) make any
loss a weighted mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_dir
from lmcycle.data.batching import pad_id_of, pad_rows
from lmcycle.data.preferences import PreferencePair, Ranking
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


def soft_bradley_terry_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, target: torch.Tensor,
                              margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss with a soft target [B]: the cross-entropy between the target probability
    ``t`` that ``chosen`` is better and the model's ``σ(d)``, ``-(t·log σ(d) + (1 - t)·log σ(-d))`` with
    ``d = r_chosen - r_rejected`` (minus ``margin`` [B] when given). All inputs are [B].

    ``t = 1`` is exactly :func:`pair_losses`; ``t = 0.5`` (a judge that cannot tell) pulls ``d`` to 0, where its
    gradient vanishes. The minimum over ``d`` is at ``σ(d) = t``: a soft label is not pushed to an unbounded
    margin, as a hard one is."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    target = target.to(diff.dtype)
    return -(target * F.logsigmoid(diff) + (1.0 - target) * F.logsigmoid(-diff))


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of :func:`pair_losses`: a scalar."""
    return pair_losses(r_chosen, r_rejected, margin).mean()


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores strictly higher."""
    return float((r_chosen > r_rejected).float().mean())


# -- losses over whole rankings ------------------------------------------------------------------------------------
#
# A ranking batch holds R rankings padded to K completions: ``scores`` [R, K] and ``ranks`` [R, K] (long; 1 = best,
# equal = tied, 0 = no completion there: padding, or one the labeler left unranked, which is never scored).


def ranked_pairs(ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(better, tied)``, both bool [R, K, K], of ``ranks`` [R, K]: ``better[r, i, j]`` when completion ``i`` is
    ranked strictly above ``j``; ``tied[r, i, j]`` when ``i < j`` share a rank. So each strict pair and each
    tied pair of a ranking is marked once; completions with rank 0 take no part."""
    valid = ranks > 0
    both = valid[:, :, None] & valid[:, None, :]
    upper = torch.ones(ranks.size(1), ranks.size(1), dtype=torch.bool, device=ranks.device).triu(1)
    return both & (ranks[:, :, None] < ranks[:, None, :]), both & (ranks[:, :, None] == ranks[:, None, :]) & upper


def plackett_luce_losses(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per-ranking Plackett-Luce negative log-likelihood [R] of the observed order (``scores``, ``ranks`` [R, K]).

    Strict order: ``-Σ_j [s_(j) - logsumexp(s_(j), ..., s_(k))]``, the best first. Ties are unordered groups
    (Breslow's approximation): every member of a tie group shares the denominator over everything not yet
    placed, its own group included, so a group ``G`` adds ``-Σ_{i∈G} s_i + |G|·logsumexp(s of ranks ≥ G's)``.
    The last group's terms are not dropped (a last singleton adds 0; a tie at the bottom still says "equal").
    A k=2 strict ranking gives the Bradley-Terry pair loss ``-log σ(s_1 - s_2)``."""
    valid = ranks > 0
    eye = torch.eye(ranks.size(1), dtype=torch.bool, device=ranks.device)
    # at_risk[r, i, j]: j is still unplaced when i's group is placed. A rank-0 slot sees itself only, so its
    # (discarded) term stays finite and so does its zero gradient.
    at_risk = (valid[:, :, None] & valid[:, None, :] & (ranks[:, None, :] >= ranks[:, :, None])) | eye
    denom = scores[:, None, :].expand(-1, ranks.size(1), -1).masked_fill(~at_risk, float("-inf")).logsumexp(-1)
    return -torch.where(valid, scores - denom, 0.0).sum(-1)


def rao_kupper_log_probs(diff: torch.Tensor, log_theta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rao-Kupper (1967) ``(log P(i≻j), log P(i=j))``, each shaped as ``diff = s_i - s_j``; ``θ = exp(log_theta)
    ≥ 1``: ``P(i≻j) = σ(d - log θ)``, ``P(i=j) = (θ² - 1)·σ(d - log θ)·σ(-d - log θ)`` (the three outcomes sum
    to 1). ``θ = 1`` is Bradley-Terry: ties get probability 0."""
    log_theta = torch.as_tensor(log_theta, dtype=diff.dtype, device=diff.device)
    win, lose = F.logsigmoid(diff - log_theta), F.logsigmoid(-diff - log_theta)
    return win, torch.log(torch.expm1(2 * log_theta)) + win + lose


def davidson_log_probs(diff: torch.Tensor, log_nu: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Davidson (1970) ``(log P(i≻j), log P(i=j))``, each shaped as ``diff = s_i - s_j``; ``ν = exp(log_nu) ≥ 0``:
    ``P(i≻j) = e^{s_i} / (e^{s_i} + e^{s_j} + ν·e^{(s_i+s_j)/2})`` and ``P(i=j) = ν·e^{(s_i+s_j)/2} / (same)``,
    written in ``d`` alone. ``ν = 0`` (``log_nu = -inf``) is Bradley-Terry: ties get probability 0."""
    log_nu = torch.as_tensor(log_nu, dtype=diff.dtype, device=diff.device)
    tie_term = log_nu - diff / 2  # log(ν·e^{(s_i+s_j)/2} / e^{s_i})
    win = -torch.logsumexp(torch.stack([torch.zeros_like(diff), -diff, tie_term.expand_as(diff)]), dim=0)
    return win, tie_term + win


TIE_MODELS = {"rao_kupper": rao_kupper_log_probs, "davidson": davidson_log_probs}


def tie_pair_losses(scores: torch.Tensor, ranks: torch.Tensor, loss: str,
                    log_param: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed pair loss [R], pair count [R])`` of each ranking under the tie model ``loss`` (``rao_kupper``:
    ``log_param = log θ``; ``davidson``: ``log ν``): ``-log P(i≻j)`` over its strict pairs plus ``-log P(i=j)``
    over its tied pairs (:func:`ranked_pairs`), all from one score per completion (``scores``, ``ranks`` [R, K])."""
    better, tied = ranked_pairs(ranks)
    win, tie = TIE_MODELS[loss](scores[:, :, None] - scores[:, None, :], log_param)  # [R, K, K]
    nll = -torch.where(better, win, torch.where(tied, tie, 0.0))
    return nll.sum((1, 2)), (better | tied).sum((1, 2))


def top1_hits(scores: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hit, counted)``, bool [R]: whether each ranking's highest-scored completion is one the labeler put
    first (any of a tie for first), and whether the ranking counts (it has more than one rank level, so the
    question is not trivially yes). Chance is ``|first group| / k`` per ranking."""
    valid = ranks > 0
    top = scores.masked_fill(~valid, float("-inf")).argmax(1)
    best = ranks.masked_fill(~valid, torch.iinfo(ranks.dtype).max).min(1).values
    return ranks.gather(1, top[:, None]).squeeze(1) == best, ranks.max(1).values > best


# -- data ----------------------------------------------------------------------------------------------------------


def encode_pairs(pairs: list[PreferencePair], tokenizer, max_len: int) -> list[dict]:
    """Token ids of ``prompt + chosen`` and ``prompt + rejected`` of each pair, at most ``max_len`` tokens.

    Long texts are truncated from the left (the tokenizer's special tokens are kept): the end of the response
    is what the score is read at and what differs between the two, so the prompt's start goes first.
    Returns ``[{"chosen": ids, "rejected": ids, "margin": float, "target": float}, ...]``.
    """
    if not pairs:
        raise LmcycleError("there are no preference pairs to encode", field="pairs")
    chosen = encode_texts([p.prompt + p.chosen for p in pairs], tokenizer, max_len)
    rejected = encode_texts([p.prompt + p.rejected for p in pairs], tokenizer, max_len)
    return [{"chosen": c, "rejected": r, "margin": float(p.margin), "target": float(p.target)}
            for c, r, p in zip(chosen, rejected, pairs, strict=True)]


def encode_texts(texts: list[str], tokenizer, max_len: int) -> list[list[int]]:
    """Token ids of each text, at most ``max_len`` tokens, cut from the left (see :func:`encode_pairs`)."""
    room = max_len - tokenizer.num_special_tokens_to_add()
    if room < 1:
        raise LmcycleError(f"max_len {max_len} leaves no room for any response token (the tokenizer adds "
                           f"{tokenizer.num_special_tokens_to_add()} special tokens)", field="max_len")
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # a per-call truncation side is ignored by transformers 5
    try:
        return tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def collate_pairs(encoded: list[dict], tokenizer) -> Batch:
    """A pair batch: ``input_ids``/``attention_mask`` [2B, T] (B chosen rows, then their B rejected rows),
    padded on ``tokenizer.padding_side`` (:func:`~lmcycle.data.batching.pad_id_of`), ``margin`` [B] and
    ``target`` [B] (the probability that chosen is better; 1.0 where an encoded pair has none)."""
    rows = [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    ids, mask = pad_rows(rows, pad_id_of(tokenizer), left=tokenizer.padding_side == "left")
    batch = {"input_ids": ids, "attention_mask": mask,
             "margin": torch.tensor([e["margin"] for e in encoded], dtype=torch.float32),
             "target": torch.tensor([e.get("target", 1.0) for e in encoded], dtype=torch.float32)}
    if encoded and all("weight" in e for e in encoded):  # labeler-weighted training (see unit_weights)
        batch["weight"] = torch.tensor([e["weight"] for e in encoded], dtype=torch.float32)
    return batch


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
    divides by the pair count, so the gradient is that of the mean pair loss. Each pair's loss is
    :func:`soft_bradley_terry_losses` with the batch's ``target`` [B] (1.0, the plain Bradley-Terry loss, where
    the batch has none). A batch with a ``weight`` [B] (:func:`unit_weights`) sums the weighted pair losses
    instead."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        r_chosen, r_rejected = score_pairs(model, batch)
        margin = batch["margin"] if use_margin else None
        target = batch.get("target")
        losses = pair_losses(r_chosen, r_rejected, margin) if target is None else \
            soft_bradley_terry_losses(r_chosen, r_rejected, target, margin)
        if "weight" in batch:
            losses = losses * batch["weight"]
        return losses.sum(), int(r_chosen.size(0))

    return loss_fn


def pair_metrics(model: RewardModel, batches: list[Batch], use_margin: bool = False) -> dict[str, float]:
    """``{"loss", "accuracy"}`` over pair batches (no gradients; the model's mode is left as it is)."""
    metrics = held_out_reward_metrics(model, batches, use_margin)
    return {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}


def train_reward_model(model: RewardModel, tokenizer, pairs: list[PreferencePair], cfg: TrainConfig,
                       out_dir: str | Path, log: Callable[..., None], margin: bool = False, max_len: int = 512,
                       eval_pairs: list[PreferencePair] | None = None, group_by_length: bool = True,
                       weights: dict[str, float] | None = None) -> TrainResult:
    """Train ``model`` in place on ``pairs`` with the pairwise loss (``margin``: subtract each pair's margin),
    soft where a pair's ``target`` is below 1 (:func:`soft_bradley_terry_losses`).

    Checkpoints go under ``out_dir`` (resumable). ``eval_pairs`` give ``eval_loss``/``eval_accuracy``. At the end
    ``model.stats`` is set to :func:`reward_stats` over the training pairs, so :meth:`RewardModel.save` keeps it.
    ``group_by_length``: batches of pairs of similar length (:func:`pair_step_indices`), so less padding.
    ``weights`` (labeler -> weight): each pair's loss is weighted by its labeler's (:func:`unit_weights`).
    """
    encoded = encode_pairs(pairs, tokenizer, max_len)
    if weights is not None:
        for e, w in zip(encoded, unit_weights([p.labeler for p in pairs], [1] * len(pairs), weights), strict=True):
            e["weight"] = w
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


# -- training on whole rankings ------------------------------------------------------------------------------------

RANKING_LOSSES = ("listwise", "rao_kupper", "davidson")
TIE_DEFAULTS = {"rao_kupper": 1.5, "davidson": 1.0}  # θ, ν
TIE_NAMES = {"rao_kupper": "theta", "davidson": "nu"}


def encode_rankings(rankings: list[Ranking], tokenizer, max_len: int) -> list[dict]:
    """Token ids of ``prompt + completion`` of each ranking's ranked completions, cut as :func:`encode_pairs`.

    Unranked completions are left out, and so are special rankings and those with fewer than two ranked
    completions (they order nothing). Returns ``[{"rows": [ids, ...], "ranks": [int, ...], "labeler": str}, ...]``.
    """
    usable = [r for r in rankings if r.special is None and sum(k is not None for k in r.ranks) >= 2]
    if not usable:
        raise LmcycleError("there are no rankings with two or more ranked completions to encode", field="rankings")
    kept = [[(c, k) for c, k in zip(r.completions, r.ranks, strict=True) if k is not None] for r in usable]
    ids = iter(encode_texts([r.prompt + c for r, row in zip(usable, kept, strict=True) for c, _ in row],
                            tokenizer, max_len))
    return [{"rows": [next(ids) for _ in row], "ranks": [k for _, k in row], "labeler": r.labeler}
            for r, row in zip(usable, kept, strict=True)]


def ranking_units(encoded: list[dict], loss: str) -> list[int]:
    """What each encoded ranking counts for in the mean loss: 1 for ``listwise`` (one observed order), its
    pairs, strict and tied, for a tie model (``m(m-1)/2`` over its ``m`` ranked completions), so that a tie model's
    loss is a mean per pair like the pairwise loss's."""
    if loss == "listwise":
        return [1] * len(encoded)
    return [len(e["rows"]) * (len(e["rows"]) - 1) // 2 for e in encoded]


def collate_rankings(encoded: list[dict], tokenizer, loss: str) -> Batch:
    """A ranking batch of ``R`` rankings: ``input_ids``/``attention_mask`` [N, T] (each distinct completion of
    each ranking once, ``N`` rows in all, padded as :func:`collate_pairs`), ``index`` [R, K] (each completion's
    row; 0 in padding), ``ranks`` [R, K] (0 in padding), ``weight`` [R] (1.0 unless weighted) and ``units``, a
    plain int: the batch's share of the mean (:func:`ranking_units`), known without a device sync."""
    rows = [ids for e in encoded for ids in e["rows"]]
    ids, mask = pad_rows(rows, pad_id_of(tokenizer), left=tokenizer.padding_side == "left")
    k = max(len(e["rows"]) for e in encoded)
    index = torch.zeros(len(encoded), k, dtype=torch.long)
    ranks = torch.zeros(len(encoded), k, dtype=torch.long)
    start = 0
    for r, e in enumerate(encoded):
        n = len(e["rows"])
        index[r, :n] = torch.arange(start, start + n)
        ranks[r, :n] = torch.tensor(e["ranks"])
        start += n
    return {"input_ids": ids, "attention_mask": mask, "index": index, "ranks": ranks,
            "weight": torch.tensor([e.get("weight", 1.0) for e in encoded], dtype=torch.float32),
            "units": sum(ranking_units(encoded, loss))}


def ranking_batches(encoded: list[dict], tokenizer, batch_size: int, loss: str) -> list[Batch]:
    """``encoded`` in order, as ranking batches of at most ``batch_size`` rankings (for evaluation)."""
    return [collate_rankings(encoded[i:i + batch_size], tokenizer, loss) for i in range(0, len(encoded), batch_size)]


def unit_weights(labelers: list[str], units: list[int], weights: dict[str, float]) -> list[float]:
    """Each item's loss weight (item ``i`` labelled by ``labelers[i]``, counting ``units[i]`` pairs or rankings):
    its labeler's weight, scaled so that the mean weight per unit over all items is 1.

    The loop divides a step's summed loss by its units, so over the training set the objective is the weighted
    mean ``Σ w·l / Σ w`` and each step an unbiased estimate of it (dividing by each batch's own ``Σ w`` would be a
    biased ratio). A labeler ``weights`` does not name gets the mean of the weights it does name. A negative or
    non-finite weight, or no weight at all on the data, is an :class:`LmcycleError`."""
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise LmcycleError(f"labeler '{name}' has weight {w!r}; a weight must be a finite number >= 0",
                               field="labeler_weights")
    default = sum(weights.values()) / len(weights) if weights else 1.0
    raw = [float(weights.get(name, default)) for name in labelers]
    total = sum(w * u for w, u in zip(raw, units, strict=True))
    if total <= 0:
        raise LmcycleError("every labeler of the training data has weight 0: nothing to train on",
                           field="labeler_weights")
    scale = sum(units) / total
    return [w * scale for w in raw]


class LearnedTie(nn.Module):
    """A reward model and the tie parameter learned with it, from ``init`` (θ or ν): ``rao_kupper`` keeps
    ``log θ = softplus(raw)`` (so θ > 1), ``davidson`` ``log ν = raw`` (so ν > 0). ``forward`` is the reward
    model's; the training loop checkpoints ``raw`` with the weights."""

    def __init__(self, reward: RewardModel, loss: str, init: float):
        super().__init__()
        self.reward, self.loss = reward, loss
        raw = math.log(math.expm1(math.log(init))) if loss == "rao_kupper" else math.log(init)
        # Shape [1], not a 0-d scalar: sharding engines split parameters along their first dimension.
        self.raw = nn.Parameter(torch.tensor([raw], dtype=torch.float32, device=next(reward.parameters()).device))

    def log_param(self) -> torch.Tensor:
        """``log θ`` or ``log ν``: a 0-d tensor."""
        raw = self.raw.squeeze(0)
        return F.softplus(raw) if self.loss == "rao_kupper" else raw

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward model's rewards [B] of ``input_ids`` [B, T] with ``attention_mask`` [B, T]."""
        return self.reward(input_ids, attention_mask)


def _reward_and_log_param(model: nn.Module, log_param: float | None) -> tuple[nn.Module, float | torch.Tensor | None]:
    if isinstance(model, LearnedTie):
        return model.reward, model.log_param()
    return model, log_param


def ranking_loss_fn(loss: str,
                    log_param: float | None = None) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]:
    """A ``loss_fn`` for :func:`lmcycle.train.loop.train` over ranking batches: ``(Σ weight · ranking loss,
    units)``, the ranking loss :func:`plackett_luce_losses` (``listwise``) or :func:`tie_pair_losses` with
    ``log_param`` (``log θ``, ``log ν``; a :class:`LearnedTie` model brings its own)."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        reward, lp = _reward_and_log_param(model, log_param)
        scores = reward(batch["input_ids"], batch["attention_mask"])[batch["index"]]  # [R, K]
        if loss == "listwise":
            per = plackett_luce_losses(scores, batch["ranks"])
        else:
            per, _ = tie_pair_losses(scores, batch["ranks"], loss, lp)
        return (per * batch["weight"]).sum(), int(batch["units"])

    return loss_fn


def train_ranking_reward_model(model: RewardModel, tokenizer, rankings: list[Ranking], cfg: TrainConfig,
                               out_dir: str | Path, log: Callable[..., None], loss: str = "listwise",
                               tie: float | None = None, learn_tie: bool = False, max_len: int = 512,
                               eval_pairs: list[PreferencePair] | None = None,
                               eval_rankings: list[Ranking] | None = None, group_by_length: bool = True,
                               weights: dict[str, float] | None = None) -> tuple[TrainResult, dict[str, Any]]:
    """Train ``model`` in place on whole ``rankings`` with ``loss``: ``listwise`` (Plackett-Luce, ties as
    groups), ``rao_kupper`` (``tie`` = θ > 1, default 1.5) or ``davidson`` (``tie`` = ν > 0, default 1.0);
    ``learn_tie``: θ or ν is trained with the model, from ``tie``.

    Each micro-batch holds ``cfg.batch_size`` whole rankings, each completion scored once; the loss is a mean per
    ranking (listwise) or per pair (:func:`ranking_units`), weighted by labeler with ``weights``
    (:func:`unit_weights`). Checkpoints go under ``out_dir`` (resumable, deterministic as
    :func:`train_reward_model`). ``eval_pairs`` give ``eval_loss``/``eval_accuracy`` (the pairwise numbers every
    loss shares), ``eval_rankings`` :func:`held_out_ranking_metrics`. ``model.stats`` is set over the training
    rankings' completions. Returns ``(result, loss parameters)``: ``{"ties": "breslow"}`` or ``{"theta" | "nu":
    the final value, "learned": bool}``.
    """
    if loss not in RANKING_LOSSES:
        raise LmcycleError(f"unknown ranking loss '{loss}' (known: {', '.join(RANKING_LOSSES)})", field="loss")
    if loss == "listwise" and (tie is not None or learn_tie):
        raise LmcycleError("the listwise loss has no tie parameter", field="loss")
    tie = TIE_DEFAULTS.get(loss) if tie is None else float(tie)
    if loss == "rao_kupper" and not tie > 1 or loss == "davidson" and not tie > 0:
        raise LmcycleError(f"{TIE_NAMES[loss]} must be {'> 1' if loss == 'rao_kupper' else '> 0'} (at "
                           f"{'θ = 1' if loss == 'rao_kupper' else 'ν = 0'} a tie has probability 0), got {tie}",
                           field=TIE_NAMES[loss])
    encoded = encode_rankings(rankings, tokenizer, max_len)
    if weights is not None:
        for e, w in zip(encoded, unit_weights([e["labeler"] for e in encoded], ranking_units(encoded, loss),
                                              weights), strict=True):
            e["weight"] = w
    log_param = None if loss == "listwise" else math.log(tie)
    trained = LearnedTie(model, loss, tie) if learn_tie else model
    seed = cfg.seed if cfg.seed is not None else 0
    lengths = [max(len(ids) for ids in e["rows"]) for e in encoded]

    def batch_at(step: int) -> list[Batch]:
        return [collate_rankings([encoded[i] for i in idx], tokenizer, loss)
                for idx in pair_step_indices(lengths, step, cfg, seed, group_by_length)]

    pair_eval = pair_batches(encode_pairs(eval_pairs, tokenizer, max_len), tokenizer, cfg.batch_size) \
        if eval_pairs else None
    ranking_eval = ranking_batches(encode_rankings(eval_rankings, tokenizer, max_len), tokenizer, cfg.batch_size,
                                   loss) if eval_rankings else None

    def eval_fn(m: nn.Module) -> dict[str, float]:
        out = {}
        if pair_eval:
            out.update(pair_metrics(_reward_and_log_param(m, None)[0], pair_eval))
        if ranking_eval:
            out.update(held_out_ranking_metrics(m, ranking_eval, loss, log_param))
        if isinstance(m, LearnedTie):
            out[TIE_NAMES[loss]] = m.log_param().exp().item()
        return {f"eval_{k}": v for k, v in out.items() if v is not None}

    result = train(trained, batch_at, ranking_loss_fn(loss, log_param), cfg, out_dir, log,
                   eval_fn=eval_fn if pair_eval or ranking_eval else None, desc="reward")
    model.stats = reward_stats(model, ranking_batches(encoded, tokenizer, cfg.batch_size, loss))
    if loss == "listwise":
        return result, {"ties": "breslow"}
    final = trained.log_param().exp().item() if learn_tie else tie
    return result, {TIE_NAMES[loss]: final, "learned": learn_tie}


def held_out_ranking_metrics(model: nn.Module, batches: list[Batch], loss: str,
                             log_param: float | None = None) -> dict[str, float | int | None]:
    """Over ranking batches (no gradients; ``model`` a :class:`RewardModel` or a :class:`LearnedTie`):
    ``ranking_loss``, the unweighted mean of ``loss`` per unit (:func:`ranking_units`), and ``rankings``; for
    ``listwise`` also ``top1_accuracy`` over the rankings with more than one rank level and their count
    ``top1_n`` (:func:`top1_hits`); for a tie model ``tie_loglik``, the mean ``log P(i=j)`` over the tied pairs
    (None when there is none), and their count ``tie_pairs``."""
    reward, lp = _reward_and_log_param(model, log_param)
    device = next(reward.parameters()).device
    total, units, rankings, hits, counted, tie_sum, tie_n = 0.0, 0, 0, 0, 0, 0.0, 0
    with torch.no_grad():
        for b in batches:
            ranks = b["ranks"].to(device)
            scores = reward(b["input_ids"].to(device), b["attention_mask"].to(device))[b["index"].to(device)]
            if loss == "listwise":
                per = plackett_luce_losses(scores, ranks)
                hit, count = top1_hits(scores, ranks)
                hits, counted = hits + int((hit & count).sum()), counted + int(count.sum())
            else:
                per, _ = tie_pair_losses(scores, ranks, loss, lp)
                tied = ranked_pairs(ranks)[1]
                log_tie = TIE_MODELS[loss](scores[:, :, None] - scores[:, None, :], lp)[1]
                tie_sum, tie_n = tie_sum + float(log_tie[tied].sum()), tie_n + int(tied.sum())
            total, units, rankings = total + float(per.sum()), units + int(b["units"]), rankings + ranks.size(0)
    out: dict[str, float | int | None] = {"ranking_loss": total / max(units, 1), "rankings": rankings}
    if loss == "listwise":
        out.update(top1_accuracy=hits / counted if counted else None, top1_n=counted)
    else:
        out.update(tie_loglik=tie_sum / tie_n if tie_n else None, tie_pairs=tie_n)
    return out
