"""Where an RL stage's rewards come from: a trained reward model, a text classifier, or any Python callable.

Every source becomes a :data:`RewardFn` ``(prompts, responses) -> FloatTensor [N]`` that works on *text*: the
policy's responses are decoded and re-tokenised with the scorer's own tokenizer, so policy and reward model
never need to share a vocabulary (users asked TRL for this in trl #1979).

- ``{kind: model, path}``: a reward model saved by the ``reward`` stage (:class:`RewardModel`); its scores are
  normalised with the mean/std saved beside it unless ``normalise: false``.
- ``{kind: classifier, path, label}``: a sequence classifier's probability of one class, the course's
  "probability of the not-hate class" (``label: not_toxic``); ``output: log_odds`` gives
  ``log p − log(1 − p)`` instead (for two classes: the difference of their logits, unbounded like the lab's
  logit reward, so a near-certain class still has a gradient to climb).
- ``{kind: python, function: "module:name"}``: any callable ``f(prompts, responses)`` returning one number per
  response (list, NumPy array or tensor). Its output is checked: right length, finite.

``text`` says what a scorer reads: the ``response`` alone or the ``full`` prompt + response text.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import Discriminator, Field, Tag

from lmcycle.align.reward import RewardModel
from lmcycle.align.reward import normalise as normalise_scores
from lmcycle.config import Config, ModelRef
from lmcycle.errors import LmcycleError
from lmcycle.models.classifier import TextClassifier
from lmcycle.models.device import resolve_device
from lmcycle.models.load import ensure_pad_token

RewardFn = Callable[[list[str], list[str]], torch.Tensor]
Prepare = Callable[[torch.nn.Module], torch.nn.Module]  # what to do with a loaded scoring model before use


class ModelReward(Config):
    """A reward model trained by the ``reward`` stage (an earlier stage's name or its folder)."""

    kind: Literal["model"] = "model"
    path: ModelRef
    normalise: bool = Field(True, description="subtract the saved mean, divide by the saved std")
    text: Literal["response", "full"] = "full"
    max_len: int = Field(512, ge=8)
    batch_size: int = Field(32, ge=1)


class ClassifierReward(Config):
    """A sequence classifier: the probability (or log-odds) of ``label`` is the reward."""

    kind: Literal["classifier"] = "classifier"
    path: ModelRef
    label: str
    output: Literal["probability", "log_odds"] = "probability"
    text: Literal["response", "full"] = "response"
    max_len: int = Field(128, ge=8)
    batch_size: int = Field(64, ge=1)


class PythonReward(Config):
    """Any importable callable ``f(prompts: list[str], responses: list[str]) -> one number per response``."""

    kind: Literal["python"] = "python"
    function: str = Field(description="'package.module:function'")


def _kind(value) -> str:
    return value.get("kind", "model") if isinstance(value, dict) else getattr(value, "kind", "model")


RewardSpec = Annotated[Annotated[ModelReward, Tag("model")] | Annotated[ClassifierReward, Tag("classifier")]
                       | Annotated[PythonReward, Tag("python")], Discriminator(_kind)]


def describe_reward(spec: ModelReward | ClassifierReward | PythonReward) -> dict:
    """The settings that define a reward, for logs and reports."""
    return spec.model_dump()


def _texts(prompts: list[str], responses: list[str], text: str) -> list[str]:
    return list(responses) if text == "response" else [p + r for p, r in zip(prompts, responses, strict=True)]


def check_rewards(values, n: int, source: str) -> torch.Tensor:
    """``values`` as a float32 tensor [n]; a clear error when the count is wrong or a value is not finite."""
    try:
        rewards = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise LmcycleError(f"reward {source} returned {type(values).__name__}, not numbers: {e}",
                           field="reward") from None
    if rewards.dim() == 2 and rewards.size(1) == 1:
        rewards = rewards[:, 0]
    if rewards.dim() != 1 or rewards.numel() != n:
        raise LmcycleError(f"reward {source} returned shape {tuple(rewards.shape)} for {n} responses; it must "
                           f"return one number per response", field="reward")
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise LmcycleError(f"reward {source} returned {rewards[bad[0]].item()} for response {bad[0]} "
                           f"({len(bad)} non-finite of {n})", field="reward")
    return rewards


def python_reward(function: str | Callable) -> RewardFn:
    """A reward from a callable, or from ``"module:name"`` naming one; its outputs are checked on every call."""
    fn = _import_callable(function) if isinstance(function, str) else function
    if not callable(fn):
        raise LmcycleError(f"reward function {function!r} is not callable", field="reward.function")
    name = function if isinstance(function, str) else getattr(fn, "__name__", repr(fn))

    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return check_rewards(fn(list(prompts), list(responses)), len(responses), repr(name))

    return score


def _import_callable(spec: str) -> Callable:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LmcycleError(f"reward function {spec!r} must look like 'package.module:function'",
                           field="reward.function")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise LmcycleError(f"cannot import {module_name!r} for reward function {spec!r}: {e}",
                           field="reward.function") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise LmcycleError(f"{module_name!r} has no {attr!r} (reward function {spec!r})",
                               field="reward.function")
        target = getattr(target, part)
    return target


def classifier_reward(path: str, label: str, output: str = "probability", text: str = "response",
                      max_len: int = 128, batch_size: int = 64, device: str | torch.device = "auto",
                      prepare: Prepare | None = None) -> RewardFn:
    """The probability (or log-odds) that a sequence classifier on ``device`` (``auto``: CUDA when present) gives
    class ``label``, per response (a float32 tensor [N] on the CPU). ``prepare`` is applied to the loaded model
    (e.g. sharding it over the ranks)."""
    clf = TextClassifier.load(path, device=device)
    if prepare is not None:
        clf.model = prepare(clf.model)
    index = clf.label_index(label)

    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = _texts(prompts, responses, text)
        p = clf.probabilities(texts, batch_size=batch_size, max_len=max_len)[:, index].double()
        p = p.clamp(1e-7, 1 - 1e-7)  # a saturated class keeps finite log-odds
        values = p if output == "probability" else torch.log(p) - torch.log1p(-p)
        return check_rewards(values, len(responses), f"classifier {path}")

    return score


def model_reward(path: str, normalise: bool = True, text: str = "full", max_len: int = 512,
                 batch_size: int = 32, device: str | torch.device = "auto", prepare: Prepare | None = None) -> RewardFn:
    """Scores of a saved :class:`~lmcycle.align.reward.RewardModel` on ``device`` (``auto``: CUDA when present),
    normalised by its saved mean/std: a float32 tensor [N] on the CPU. ``prepare`` is applied to the loaded
    model (e.g. sharding it over the ranks)."""
    from transformers import AutoTokenizer

    device = resolve_device(device)
    model = RewardModel.load(path).to(device).eval()
    if prepare is not None:
        model = prepare(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    if normalise and not model.stats:
        raise LmcycleError(f"reward model {path} has no saved mean/std; set normalise: false",
                           field="reward.normalise")

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = _texts(prompts, responses, text)
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_len,
                            padding=True, return_tensors="pt")
            out.append(model(enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu())
        rewards = torch.cat(out) if out else torch.zeros(0)
        if normalise:
            rewards = normalise_scores(rewards, model.stats)
        return check_rewards(rewards, len(responses), f"model {path}")

    return score


def build_reward(spec: ModelReward | ClassifierReward | PythonReward, resolve: Callable[[str], str] = str,
                 device: str | torch.device = "auto", prepare: Prepare | None = None) -> RewardFn:
    """The :data:`RewardFn` a spec describes; ``resolve`` maps a stage name to its folder (``ctx.model_path``);
    a reward model or classifier runs on ``device`` (``auto``: CUDA when present, else CPU), after ``prepare``
    (applied to the loaded model, e.g. sharding it over the ranks)."""
    if isinstance(spec, PythonReward):
        return python_reward(spec.function)
    if isinstance(spec, ClassifierReward):
        return classifier_reward(resolve(spec.path), spec.label, spec.output, spec.text, spec.max_len,
                                 spec.batch_size, device, prepare)
    return model_reward(resolve(spec.path), spec.normalise, spec.text, spec.max_len, spec.batch_size, device,
                        prepare)

