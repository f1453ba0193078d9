"""Direct Preference Optimization (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023): the core math.

With ``logπ(y)`` the log-probability of a response *summed* over its tokens (prompt tokens excluded) and
``h = (logπ(y_c) − logπ_ref(y_c)) − (logπ(y_r) − logπ_ref(y_r))``:

- ``sigmoid`` (DPO): ``−log σ(β·h)``; with label smoothing ε (conservative DPO, as in TRL):
  ``−(1−ε)·log σ(β·h) − ε·log σ(−β·h)``.
- ``ipo``: ``(h − 1/(2β))²``. Here ``h`` uses the same *summed* log-probs as DPO (TRL averages them per token
  for IPO; with summed log-probs the target margin 1/(2β) is per response, not per token).

The implicit rewards are ``β·(logπ(y) − logπ_ref(y))``. The reference is a separate frozen model, or, for a LoRA
policy, the same model with its adapter switched off (no second copy in memory). Reference log-probs are
precomputed once per pair (:func:`precompute_reference_logps`), so training never reruns the reference.

A DPO batch (:func:`collate_dpo`) stacks the ``B`` chosen rows over the ``B`` rejected rows, like
:func:`lmcycle.align.reward.collate_pairs`, so one forward pass scores both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmcycle.adapt.lora import adapter_disabled, lora_layers
from lmcycle.align.reward import pair_step_indices
from lmcycle.data.preferences import PreferencePair
from lmcycle.data.sft import collate_sft, prompt_completion_item
from lmcycle.errors import LmcycleError
from lmcycle.models.load import eval_mode
from lmcycle.train.loop import Batch, TrainConfig, TrainResult, sequence_logps, train

LOSS_TYPES = ("sigmoid", "ipo")


# -- data ----------------------------------------------------------------------------------------------------------


def encode_dpo_pairs(pairs: list[PreferencePair], tokenizer, max_len: int, seq2seq: bool) -> list[dict]:
    """Tokenize each pair into ``{"chosen": item, "rejected": item}``, items as in ``encode_sft``.

    - decoder: ``input_ids = prompt + response + EOS``, ``labels`` the same with the prompt set to -100.
      Too long: the prompt loses tokens from its left (a leading BOS is kept); the response is cut on the right
      only when it alone does not fit.
    - encoder-decoder: ``input_ids = prompt`` (the tokenizer's special tokens included), ``labels = response +
      EOS``; each cut to ``max_len`` (the prompt from its left, the response on its right).
    """
    if not pairs:
        raise LmcycleError("there are no preference pairs to encode", field="pairs")
    if max_len < 2:
        raise LmcycleError(f"max_len must be at least 2, got {max_len}", field="max_len")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise LmcycleError("the tokenizer has no eos token; set one", field="tokenizer")
    prompts = tokenizer([p.prompt for p in pairs], verbose=False)["input_ids"]
    chosen = tokenizer([p.chosen for p in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    rejected = tokenizer([p.rejected for p in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    return [{"chosen": prompt_completion_item(p, [*c, eos], max_len, seq2seq, bos),
             "rejected": prompt_completion_item(p, [*r, eos], max_len, seq2seq, bos)}
            for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def collate_dpo(encoded: list[dict], pad_id: int) -> Batch:
    """A DPO batch: ``input_ids``/``attention_mask`` [2B, T] and ``labels`` [2B, L] (B chosen rows, then their B
    rejected rows; right padding, labels -100 on padding), plus ``ref_logps`` [2B] when every item has them."""
    batch = collate_sft([e["chosen"] for e in encoded] + [e["rejected"] for e in encoded], pad_id)
    if all("ref_logps" in e for e in encoded):
        batch["ref_logps"] = torch.tensor([e["ref_logps"][0] for e in encoded] +
                                          [e["ref_logps"][1] for e in encoded], dtype=torch.float32)
    return batch


def dpo_pair_length(item: dict) -> int:
    """What a pair adds to its batch's width: the longest of its chosen/rejected ``input_ids`` and ``labels``."""
    return max(len(item[k][f]) for k in ("chosen", "rejected") for f in ("input_ids", "labels"))


def dpo_batches(encoded: list[dict], pad_id: int, batch_size: int) -> list[Batch]:
    """``encoded`` in order, as DPO batches of at most ``batch_size`` pairs."""
    return [collate_dpo(encoded[i:i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]


# -- log-probs -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    # The reference is a fixed function: no dropout, no gradients, and the caller's mode comes back.
    with eval_mode(model), torch.no_grad():
        yield


def reference_logps(model: nn.Module, batch: Batch, ref_model: nn.Module | None = None) -> torch.Tensor:
    """Reference log-probs [N] of a batch (no gradients, eval mode): ``ref_model``'s when given, else those of
    ``model`` with its LoRA adapter disabled. A model without adapters and no ``ref_model`` is an error (the
    policy cannot be its own moving reference; use :func:`precompute_reference_logps` before training)."""
    if ref_model is not None:
        with _frozen_eval(ref_model):
            return sequence_logps(ref_model, batch)
    if not lora_layers(model):
        raise LmcycleError("DPO needs a reference: pass a reference model, add a LoRA adapter to the policy (the "
                           "base is then the reference), or precompute the reference log-probs", field="ref_model")
    with _frozen_eval(model), adapter_disabled(model):
        return sequence_logps(model, batch)


def precompute_reference_logps(model: nn.Module, encoded: list[dict], pad_id: int, batch_size: int = 8,
                               ref_model: nn.Module | None = None) -> torch.Tensor:
    """Reference log-probs of every pair, [P, 2] (chosen, rejected), also cached in each item as ``ref_logps``
    so :func:`collate_dpo` carries them and training never reruns the reference.

    The reference is ``ref_model`` if given, else ``model`` with its LoRA adapter disabled, else (no adapter)
    ``model`` as it is now: computed before training, that is the frozen initial policy.
    """
    use_reference = ref_model is not None or bool(lora_layers(model))
    device = next((ref_model if ref_model is not None else model).parameters()).device
    rows = []
    for batch in dpo_batches(encoded, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items() if k != "ref_logps"}
        if use_reference:
            logps = reference_logps(model, batch, ref_model)
        else:
            with _frozen_eval(model):
                logps = sequence_logps(model, batch)
        rows.append(logps.view(2, -1).T.cpu())
    out = torch.cat(rows)
    for item, (c, r) in zip(encoded, out.tolist(), strict=True):
        item["ref_logps"] = (c, r)
    return out


# -- loss ----------------------------------------------------------------------------------------------------------


def check_dpo_settings(beta: float, loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise :class:`LmcycleError` on a beta that is not positive, an unknown loss type or a bad smoothing."""
    if not beta > 0:
        raise LmcycleError(f"beta must be > 0, got {beta}", field="beta")
    if loss_type not in LOSS_TYPES:
        raise LmcycleError(f"unknown DPO loss_type '{loss_type}' (one of {', '.join(LOSS_TYPES)})",
                           field="loss_type")
    if not 0.0 <= label_smoothing < 0.5:
        raise LmcycleError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}", field="label_smoothing")
    if loss_type == "ipo" and label_smoothing > 0:
        raise LmcycleError("label_smoothing applies to the sigmoid loss only, not to ipo", field="label_smoothing")


def dpo_loss(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss [B] and implicit rewards ``β·(logπ − logπ_ref)`` (detached) of chosen [B] and rejected [B].

    All inputs are summed response log-probs [B]: policy chosen/rejected, reference chosen/rejected.
    """
    check_dpo_settings(beta, loss_type, label_smoothing)
    h = (pol_c - ref_c) - (pol_r - ref_r)
    if loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # logsigmoid stays finite where log(sigmoid(x)) underflows to -inf
        loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, (beta * (pol_c - ref_c)).detach(), (beta * (pol_r - ref_r)).detach()


def _batch_losses(model: nn.Module, batch: Batch, beta: float, loss_type: str, label_smoothing: float,
                  ref_model: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "ref_logps"}
    ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(model, inputs, ref_model)
    pol = sequence_logps(model, inputs)
    n = pol.size(0) // 2
    return dpo_loss(pol[:n], pol[n:], ref[:n].to(pol), ref[n:].to(pol), beta, loss_type, label_smoothing)


def dpo_loss_fn(beta: float, loss_type: str = "sigmoid", ref_model: nn.Module | None = None,
                label_smoothing: float = 0.0) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]:
    """A ``loss_fn`` for :func:`lmcycle.train.loop.train`: ``(summed pair loss, number of pairs)``; the loop
    divides by the pair count, so the gradient is that of the mean pair loss. The batch's ``ref_logps`` [2B]
    are used when present, else the reference is run (see :func:`reference_logps`)."""
    check_dpo_settings(beta, loss_type, label_smoothing)

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        loss, _, _ = _batch_losses(model, batch, beta, loss_type, label_smoothing, ref_model)
        return loss.sum(), int(loss.size(0))

    return loss_fn


def dpo_metrics(model: nn.Module, batches: list[Batch], beta: float, loss_type: str = "sigmoid",
                ref_model: nn.Module | None = None, label_smoothing: float = 0.0) -> dict[str, float]:
    """``{"loss", "accuracy", "margin", "chosen_reward", "rejected_reward"}`` means over DPO batches (no
    gradients; the model's mode is left as it is). Accuracy: the chosen implicit reward is strictly higher."""
    device = next(model.parameters()).device
    losses, chosen, rejected = [], [], []
    with torch.no_grad():
        for batch in batches:
            loss, c, r = _batch_losses(model, {k: v.to(device) for k, v in batch.items()}, beta, loss_type,
                                       label_smoothing, ref_model)
            losses.append(loss.cpu())
            chosen.append(c.cpu())
            rejected.append(r.cpu())
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"loss": float(torch.cat(losses).mean()), "accuracy": float((c > r).float().mean()),
            "margin": float((c - r).mean()), "chosen_reward": float(c.mean()), "rejected_reward": float(r.mean())}


# -- training ------------------------------------------------------------------------------------------------------


def train_dpo(model: nn.Module, tokenizer, pairs: list[PreferencePair], cfg: TrainConfig, out_dir: str | Path,
              log: Callable[..., None], beta: float = 0.1, loss_type: str = "sigmoid",
              ref_model: nn.Module | None = None, max_len: int = 512, label_smoothing: float = 0.0,
              eval_pairs: list[PreferencePair] | None = None, precompute_reference: bool = True,
              group_by_length: bool = True) -> TrainResult:
    """Train ``model`` in place on ``pairs`` with the DPO (or IPO) loss; checkpoints under ``out_dir``.

    The reference is ``ref_model``, else the base of a LoRA ``model`` (adapter disabled), else ``model`` as it is
    before training. With ``precompute_reference`` its log-probs are computed once, before the first step;
    without, the reference runs on every batch (then a ``model`` without LoRA needs ``ref_model``).
    ``eval_pairs`` give ``eval_loss``/``eval_accuracy``/``eval_margin``/``eval_chosen_reward``/
    ``eval_rejected_reward``. ``group_by_length``: batches of pairs of similar length
    (:func:`lmcycle.align.reward.pair_step_indices`), so less padding.
    """
    check_dpo_settings(beta, loss_type, label_smoothing)
    if not precompute_reference and ref_model is None and not lora_layers(model):
        raise LmcycleError("without precomputed reference log-probs DPO needs a reference: pass ref_model or add "
                           "a LoRA adapter to the policy", field="precompute_reference")
    if tokenizer.pad_token_id is None:
        raise LmcycleError("the tokenizer has no pad token; set one (e.g. pad_token = eos_token)", field="tokenizer")
    seq2seq = bool(model.config.is_encoder_decoder)
    pad_id = tokenizer.pad_token_id
    encoded = encode_dpo_pairs(pairs, tokenizer, max_len, seq2seq)
    if precompute_reference:
        precompute_reference_logps(model, encoded, pad_id, cfg.batch_size, ref_model)
    seed = cfg.seed if cfg.seed is not None else 0
    lengths = [dpo_pair_length(e) for e in encoded]

    def batch_at(step: int) -> list[Batch]:
        return [collate_dpo([encoded[i] for i in idx], pad_id)
                for idx in pair_step_indices(lengths, step, cfg, seed, group_by_length)]

    eval_fn = None
    if eval_pairs:
        eval_encoded = encode_dpo_pairs(eval_pairs, tokenizer, max_len, seq2seq)
        if precompute_reference:
            precompute_reference_logps(model, eval_encoded, pad_id, cfg.batch_size, ref_model)
        eval_batches = dpo_batches(eval_encoded, pad_id, cfg.batch_size)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            metrics = dpo_metrics(m, eval_batches, beta, loss_type, ref_model, label_smoothing)
            return {f"eval_{k}": v for k, v in metrics.items()}

    loss_fn = dpo_loss_fn(beta, loss_type, ref_model, label_smoothing)
    return train(model, batch_at, loss_fn, cfg, out_dir, log, eval_fn=eval_fn, desc="dpo")
