"""PPO-RLHF with a KL leash to a frozen reference, for decoder-only and encoder-decoder policies.

One PPO iteration (a *rollout*) is::

    prompts ──policy samples──> responses ──reward fn (text)──> score s per response
    per response token t:   logπ_old, logπ_ref, V_old          (one no-grad forward each)
    reward      r_t  = −β·KL_t  (+ s at the last response token)
    advantage   A_t  = GAE(γ, λ) over r_t and V_old;  returns R_t = A_t + V_old_t;  A whitened
    then `ppo_epochs` passes over shuffled minibatches, each minimising (summed over response tokens)
        L = max(−A·ρ, −A·clip(ρ, 1±ε))  +  c1 · ½·max((V−R)², (V_clip−R)²)  −  c2 · entropy,   ρ = π/π_old

Conventions (see ``../shared/notes/ppo-conventions.md``), chosen and tested here:

- ``KL_t`` uses ``d = logπ − logπ_ref`` on the sampled token: ``k1 = d`` (the default penalty) or
  ``k3 = exp(−d) − 1 + d`` (never negative). Both are logged; k1's batch mean can dip below 0, which is noise.
- The score goes on the **last response token** (its EOS when it has one). A response cut by
  ``max_new_tokens`` has no EOS and can lose ``missing_eos_penalty``; scores are clipped to ±``score_clip``.
- **KL unit**: the adaptive controller (Ziegler et al. 2019) targets the *mean per-token* k1 KL in nats over the
  rollout's response tokens (as verl does), not the per-sequence sum of legacy TRL (whose target 6 over ~50 tokens is
  ~0.1 per token): ``β ← β·(1 + clip(KL/target − 1, ±0.2)·episodes/horizon)``.
- Log-probs and entropies use the sampling temperature (``logits / T``), as the sampling did.
- **Ratio guard**: a minibatch whose mean ratio ρ exceeds ``ratio_guard`` is skipped (its update would be garbage).
- Dropout is off in rollouts *and* updates, so ρ = 1 exactly on the first minibatch.
- **Reference**: with LoRA the reference is the same network with the adapter disabled (no second copy in
  memory); otherwise a frozen copy of the starting model.
- **Value head**: ``nn.Linear(hidden, 1)`` on the policy's last hidden state (decoder: the state that predicts the
  token; encoder-decoder: the decoder's state), zero-initialised, trained with the policy.

The functions below are the steps of that iteration; :mod:`lmcycle.stages.ppo` calls them in order, one rollout
after another, on the shared training loop (one optimizer step is one minibatch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lmcycle.adapt.lora import adapter_disabled
from lmcycle.align.guard import distinct_n, repetition
from lmcycle.config import Config
from lmcycle.data.batching import pad_rows
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import cut_at_stop, decode_rows, decoder_start_id, encode_prompts
from lmcycle.models.load import eval_mode, forward_accepts

Tensor = torch.Tensor


# -- the math ----------------------------------------------------------------------------------------------------
def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(token) [B, T] of ``tokens`` [B, T] under ``logits`` [B, T, V] divided by ``temperature``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy [B, T] of each position's distribution (``logits`` [B, T, V] / ``temperature``), in nats."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0, entropy_grad: bool = True
                         ) -> tuple[Tensor, Tensor]:
    """:func:`token_logprobs` and :func:`token_entropy` [B, T] from one log-softmax (at a 32k vocabulary the
    log-softmax is most of the head's cost). With ``entropy_grad=False`` the entropy is only measured: no graph."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_estimates(logp: Tensor, ref_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token KL estimators ``(k1, k3)`` [B, T] from log-probs of the sampled tokens under policy and reference.

    ``k1 = d`` and ``k3 = exp(−d) − 1 + d`` with ``d = logp − ref_logp``; both have expectation KL(π‖π_ref)
    under π, k3 is never negative and has lower variance.
    """
    d = logp - ref_logp
    return d, torch.expm1(-d) + d


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Rewards [B, T]: ``−β·kl`` at every response token, plus ``scores`` [B] at each row's last token.

    ``kl`` [B, T] is the chosen per-token estimator; ``mask`` [B, T] marks response tokens (contiguous from 0).
    """
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.device)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: ``(advantages, returns)``, both [B, T].

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``; returns ``R = A + V`` (before any whitening).
    Past a response's end rewards and values count as 0, so the last token bootstraps from nothing.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the positions where ``mask`` is 1 (others become 0)."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Clipped surrogate per token ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` [B, T] and whether clipping bit [B, T]."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> Tensor:
    """Clipped value loss per token ``½·max((V − R)², (V_clip − R)²)`` [B, T], ``V_clip = V_old ± clip``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def adaptive_beta(beta: float, kl: float, target: float, episodes: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: β moves toward keeping the per-token KL at ``target``."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * episodes / horizon)


# -- policy with a value head -----------------------------------------------------------------------------------
def response_logits(model: nn.Module, query: Tensor, query_mask: Tensor, response: Tensor, response_mask: Tensor,
                    hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """The logits [B, R, V] that predict each response token and, with ``hidden``, the last hidden state [B, R, H]
    each token is chosen in. Decoder queries are left-padded, encoder-decoder queries right-padded; responses are
    right-padded."""
    if getattr(model.config, "is_encoder_decoder", False):
        start = decoder_start_id(model, int(model.config.pad_token_id or 0))
        decoder_in = torch.cat([response.new_full((len(response), 1), start), response[:, :-1]], dim=1)
        out = model(input_ids=query, attention_mask=query_mask, decoder_input_ids=decoder_in,
                    output_hidden_states=hidden, use_cache=False)
        return out.logits, out.decoder_hidden_states[-1] if hidden else None
    ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    p, r = query.size(1), response.size(1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                output_hidden_states=hidden, **_last_logits(model, r + 1))
    logits = out.logits[:, -(r + 1):-1]  # position t predicts token t + 1
    return logits, out.hidden_states[-1][:, p - 1:p + r - 1] if hidden else None


class PolicyWithValue(nn.Module):
    """The policy LM and a scalar value head on its last hidden state; ``kl_beta`` rides in the checkpoint.

    ``forward(query [B, P], query_mask, response [B, R], response_mask) -> (logits [B, R, V], values [B, R])``:
    :func:`response_logits` of the policy and the value of the state each response token is chosen in.
    """

    def __init__(self, policy: nn.Module, beta: float):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.register_buffer("kl_beta", torch.tensor(float(beta), dtype=torch.float64))
        self.seq2seq = bool(getattr(policy.config, "is_encoder_decoder", False))

    def forward(self, query: Tensor, query_mask: Tensor, response: Tensor, response_mask: Tensor
                ) -> tuple[Tensor, Tensor]:
        logits, hidden = response_logits(self.policy, query, query_mask, response, response_mask, hidden=True)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values.float()


def _last_logits(model: nn.Module, k: int) -> dict:
    return {"logits_to_keep": k} if forward_accepts(type(model), "logits_to_keep") else {}


# -- rollouts ----------------------------------------------------------------------------------------------------
class PpoSettings(Config):
    """The PPO algorithm's settings (how rollouts are scored and how the policy is updated)."""

    rollout_size: int = Field(16, ge=1, description="episodes (prompts) per rollout")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_ratio: float = Field(0.2, gt=0)
    clip_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0, description="c1")
    entropy_coef: float = Field(0.0, ge=0, description="c2 (the loss subtracts c2 x entropy)")
    whiten_advantages: bool = True
    beta: float = Field(0.05, ge=0, description="KL coefficient (the start value when kl_target is set)")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL in the reward penalty")
    kl_target: float | None = Field(None, gt=0, description="adaptive β: target mean per-token KL in nats")
    kl_horizon: int = Field(10000, ge=1)
    score_clip: float | None = Field(10.0, gt=0)
    missing_eos_penalty: float | None = Field(None, ge=0, description="subtracted from the score of a response "
                                                                      "cut by max_new_tokens")
    ratio_guard: float = Field(10.0, gt=1, description="skip a minibatch whose mean ratio exceeds this")
    forward_batch_size: int = Field(16, ge=1, description="rows per no-grad forward when scoring a rollout")


@dataclass
class Responses:
    """Step 1's output: one sampled response per prompt."""

    prompt_ids: list[list[int]]  # the encoded prompts
    ids: list[list[int]]  # each response, with the EOS the policy chose as its last id (that choice is scored too)
    content_ids: list[list[int]]  # the same without the EOS: what the diversity statistics count
    endings: list[str]  # "eos", "stop" or "length" (max_new_tokens ran out)
    texts: list[str]  # decoded and cut at the stop strings: what the reward reads


def sample_responses(agent: PolicyWithValue, tokenizer, prompts: list[str], decoding) -> Responses:
    """Sample one response per prompt with ``decoding`` (a :class:`~lmcycle.models.generate.DecodingConfig`, its
    seed already set for this rollout); dropout off, as in the updates."""
    rows = encode_prompts(agent.policy, tokenizer, prompts, decoding)
    with eval_mode(agent):
        ids, endings = decode_rows(agent.policy, tokenizer, rows, decoding, keep_eos=True)
    content = [r[:-1] if end == "eos" else r for r, end in zip(ids, endings, strict=True)]
    texts = [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), decoding.stop) for r in content]
    return Responses(rows, ids, content, endings, texts)


def finish_scores(scores: Tensor, endings: list[str], cfg: PpoSettings) -> Tensor:
    """Apply the missing-EOS penalty (responses that ran out of tokens) and the score clip to ``scores`` [N]."""
    scores = scores.clone()
    if cfg.missing_eos_penalty is not None:
        scores -= cfg.missing_eos_penalty * torch.tensor([e == "length" for e in endings], dtype=scores.dtype,
                                                         device=scores.device)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores


def pad_episodes(responses: Responses, pad_id: int, seq2seq: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(query [N, P], query_mask, response [N, R], response_mask)``: queries left-padded for a decoder
    (right-padded for an encoder-decoder), responses right-padded; masks are long, 1 on real tokens."""
    query, query_mask = pad_rows(responses.prompt_ids, pad_id, left=not seq2seq)
    response, response_mask = pad_rows(responses.ids, pad_id)
    return query, query_mask, response, response_mask


@torch.no_grad()
def score_tokens(agent: PolicyWithValue, query: Tensor, query_mask: Tensor, response: Tensor,
                 response_mask: Tensor, temperature: float, batch_size: int,
                 ref: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """Old log-probs, values, entropies and reference log-probs [N, R] of a rollout, in no-grad chunks."""
    parts: dict[str, list[Tensor]] = {"logp": [], "values": [], "entropy": [], "ref_logp": []}
    device = agent.value_head.weight.device
    with eval_mode(agent):
        for s in range(0, len(query), batch_size):
            q, qm, r, rm = (t[s:s + batch_size].to(device) for t in (query, query_mask, response, response_mask))
            logits, values = agent(q, qm, r, rm)
            logp, entropy = logprobs_and_entropy(logits, r, temperature)
            parts["logp"].append(logp.cpu())
            parts["entropy"].append(entropy.cpu())
            parts["values"].append(values.cpu())
            parts["ref_logp"].append(ref(q, qm, r, rm).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def reference_scorer(agent: PolicyWithValue, ref_model: nn.Module | None, temperature: float
                     ) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Reference log-probs of the response tokens: ``ref_model``'s, or the policy's with its LoRA adapter off.
    Only logits: no hidden states, no value head."""
    if ref_model is not None:
        ref_model.requires_grad_(False).eval()  # a fixed function: no dropout, no gradients

    def ref(q, qm, r, rm):
        if ref_model is not None:
            return token_logprobs(response_logits(ref_model, q, qm, r, rm)[0], r, temperature)
        with adapter_disabled(agent.policy):
            return token_logprobs(response_logits(agent.policy, q, qm, r, rm)[0], r, temperature)

    return ref


def rollout_stats(raw_scores: Tensor, scores: Tensor, rewards: Tensor, k1: Tensor, k3: Tensor,
                  old: dict[str, Tensor], mask: Tensor, beta: float, responses: Responses) -> dict[str, float]:
    """What a rollout row logs: scores [N] before and after :func:`finish_scores`, the summed ``rewards`` [N, R],
    KL (``k1``, ``k3`` [N, R]), :func:`score_tokens`' entropies and values, lengths and diversity."""
    n_tokens = mask.sum().clamp(min=1)
    endings, ids = responses.endings, responses.content_ids
    return {
        "score": float(raw_scores.mean()),
        "score_final": float(scores.mean()),  # after the missing-EOS penalty and the clip
        "reward": float(rewards.sum(1).mean()),  # score - β·KL summed over the response
        "kl": float((k1 * mask).sum() / n_tokens),  # mean per-token, nats: the controller's unit
        "kl_k3": float((k3 * mask).sum() / n_tokens),
        "kl_seq": float((k1 * mask).sum(1).mean()),  # per-sequence sum, legacy TRL's unit
        "beta": beta,
        "entropy": float((old["entropy"] * mask).sum() / n_tokens),
        "response_len": float(mask.sum(1).mean()),
        "eos_fraction": sum(e == "eos" for e in endings) / len(endings),
        "distinct_1": distinct_n(ids, 1),
        "distinct_2": distinct_n(ids, 2),
        "repetition": repetition(ids),
        "value_mean": float((old["values"] * mask).sum() / n_tokens),
    }


@dataclass
class Rollout:
    """One rollout's episodes as padded tensors (all [N, ...]): what the PPO updates read."""

    query: Tensor  # [N, P]
    query_mask: Tensor
    response: Tensor  # [N, R]
    response_mask: Tensor  # [N, R] long (1 = response token)
    old_logp: Tensor  # [N, R]
    old_values: Tensor
    advantages: Tensor
    returns: Tensor

    def minibatch(self, index: list[int]) -> dict[str, Tensor]:
        idx = torch.tensor(index, device=self.query.device)
        return {k: getattr(self, k)[idx] for k in ("query", "query_mask", "response", "response_mask", "old_logp",
                                                    "old_values", "advantages", "returns")}


# -- the update --------------------------------------------------------------------------------------------------
@dataclass
class UpdateStats:
    """Sums over the minibatches of one rollout's updates, logged as means when the next rollout starts."""

    sums: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    minibatches: int = 0
    skipped: int = 0
    ratio_max: float = 0.0

    def add(self, tokens: float, **sums: float) -> None:
        self.tokens += tokens
        self.minibatches += 1
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        out = {f"ppo_{k}": v / max(self.tokens, 1) for k, v in self.sums.items()}
        return {**out, "ppo_minibatches": self.minibatches, "ppo_skipped": self.skipped,
                "ppo_ratio_max": self.ratio_max}


def ppo_loss(agent: PolicyWithValue, batch: dict[str, Tensor], cfg: PpoSettings, temperature: float,
             stats: UpdateStats | None = None) -> tuple[Tensor, int]:
    """``(L summed over response tokens, token count)`` of one minibatch; ``(0, 0)`` when the ratio guard skips it.

    ``L = policy loss + c1·value loss − c2·entropy`` (per token; the loop divides by the token count).
    """
    mask = batch["response_mask"].float()
    with eval_mode(agent):
        logits, values = agent(batch["query"], batch["query_mask"], batch["response"], batch["response_mask"])
    logp, entropy = logprobs_and_entropy(logits, batch["response"], temperature,
                                         entropy_grad=cfg.entropy_coef > 0)
    n = mask.sum()
    log_ratio = ((logp - batch["old_logp"]) * mask).detach()
    ratio = torch.exp(log_ratio) * mask
    ratio_mean = float(ratio.sum() / n.clamp(min=1))
    if stats is not None:
        stats.ratio_max = max(stats.ratio_max, float(ratio.max()))
    if ratio_mean > cfg.ratio_guard:
        if stats is not None:
            stats.skipped += 1
        return torch.zeros((), device=logits.device), 0
    pg, clipped = policy_loss(logp, batch["old_logp"], batch["advantages"], cfg.clip_ratio)
    vf = value_loss(values, batch["old_values"], batch["returns"], cfg.clip_value)
    loss = ((pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy) * mask).sum()
    if stats is not None:
        with torch.no_grad():
            stats.add(float(n), policy_loss=float((pg * mask).sum()), value_loss=float((vf * mask).sum()),
                      entropy=float((entropy * mask).sum()), clipfrac=float((clipped * mask).sum()),
                      approx_kl=float((0.5 * log_ratio ** 2).sum()))
    return loss, int(n)


def steps_per_rollout(cfg: PpoSettings, batch_size: int, grad_accum: int, world: int = 1) -> int:
    """Optimizer steps one rollout gives: ``ppo_epochs × rollout_size / (batch_size · grad_accum · world)``
    (``world`` ranks train on one global minibatch per step)."""
    per_step = batch_size * grad_accum * world
    if cfg.rollout_size % per_step:
        ranks = f" x {world} ranks" if world > 1 else ""
        raise LmcycleError(f"rollout_size ({cfg.rollout_size}) must be a multiple of train.batch_size x "
                           f"train.grad_accum{ranks} ({per_step}): each PPO epoch splits the rollout into "
                           "minibatches", field="ppo.rollout_size")
    return cfg.ppo_epochs * cfg.rollout_size // per_step

