"""Activation checkpointing per transformer block: trade one extra forward pass of each block for its activations.

Without it, autograd keeps every tensor each block saves for backward until backward reaches that block, so the
activation memory grows with the number of blocks. With it, a block keeps only its inputs (the hidden states
that enter it, plus the masks and position tensors the model shares between blocks); during backward the block's
forward runs once more, with the same random state (dropout draws the same masks), and its activations live only
while that block's backward runs. Peak activation memory becomes the blocks' inputs plus one block's activations.

How it is done, and why so:

- torch's *non-reentrant* checkpoint (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``), the one
  torch recommends: it needs no input that requires grad, so a frozen base with LoRA adapters (or a prompt-tuned
  model, or a QLoRA base) checkpoints as is, with no ``enable_input_require_grads`` trick; it accepts keyword
  arguments and non-tensor inputs (T5's position bias, Llama's rotary cos/sin) and it keeps the RNG state.
- Each block's ``forward`` is replaced on the instance, not the module by a wrapper (torch's
  ``checkpoint_wrapper``, which torchtitan and torchtune use): the module tree and its parameter names stay as
  they were, so ``state_dict()``, ``save_pretrained``, lmcycle's LoRA file keys (built from ``named_modules``)
  and training checkpoints carry no ``_checkpoint_wrapped_module`` prefix. Hooks on the block's ``__call__``
  stay outside the recomputation: FSDP2's ``fully_shard(block)`` unshards the block's parameters before its
  forward and before its backward, and the recomputation runs inside that backward, so the two compose in
  either order (the same arrangement as Hugging Face's ``GradientCheckpointingLayer`` in transformers 5).
- Hugging Face's ``model.gradient_checkpointing_enable()`` is not used: it only reaches a ``PreTrainedModel``,
  while lmcycle trains wrappers around one (the PPO policy with its value head, the reward model, the prompt-tuned
  model, distillation's student), and it works through a per-model flag each model family implements.
- Blocks are found generically: the items of every ``nn.ModuleList`` whose items are all of one class, outermost
  first (Llama/Qwen/Mistral ``model.layers``, GPT-2 ``transformer.h``, T5's encoder and decoder ``block`` lists,
  BERT's ``encoder.layer``); a block's own lists (T5's ``layer``) are not searched.
- Only forwards that record gradients are checkpointed: evaluation, generation and PPO's rollouts run under
  ``no_grad`` and take the plain path, key/value cache included.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmcycle.errors import LmcycleError

# The names a block's key/value-cache argument has had across transformers versions and model families.
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Instance attributes a checkpointed block carries: its own forward and the positions of its cache arguments.
_INNER = "_lmcycle_unchecked_forward"
_CACHE_POSITIONS = "_lmcycle_cache_positions"
_OWN_FORWARD = "_lmcycle_had_own_forward"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the items of each ``nn.ModuleList`` whose items share one class, not
    looking inside a block once found (so T5's ``block[i].layer`` list is not taken). A block reached twice (a
    module shared by two wrappers) is listed once, in the order of the first visit.

    Llama: ``model.layers`` (L); GPT-2: ``transformer.h``; T5: ``encoder.block`` then ``decoder.block``;
    BERT: ``encoder.layer``.
    """
    found: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) and len({type(m) for m in child}) == 1:
                for block in child:
                    found.setdefault(id(block), block)
            else:
                visit(child)

    visit(model)
    return list(found.values())


def apply_activation_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Checkpoint every block of :func:`transformer_blocks` in place; return the blocks it checkpointed now.

    A block checkpointed already is left as it is (so applying it twice changes nothing);
    :func:`remove_activation_checkpointing` undoes it. A model without repeated blocks is refused: there would
    be nothing to checkpoint, and no memory saved.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise LmcycleError(f"activation checkpointing found no transformer blocks in {type(model).__name__} (no "
                           "nn.ModuleList of repeated layers): set it to false for this model",
                           field="train.activation_checkpointing")
    patched = [b for b in blocks if not is_checkpointed(b)]
    for block in patched:
        _patch(block)
    return patched


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Give every checkpointed block of ``model`` its own forward back."""
    for block in transformer_blocks(model):
        if is_checkpointed(block):
            _restore(block)


def is_checkpointed(block: nn.Module) -> bool:
    """Whether ``block``'s forward is checkpointed by :func:`apply_activation_checkpointing`."""
    return _INNER in block.__dict__


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Checkpoint ``model``'s blocks (and turn the configs' ``use_cache`` default off) inside the ``with``.

    ``use_cache`` is off by default inside: a training forward that does not say ``use_cache=False`` (a user's
    ``loss_fn`` calling ``model(**batch)``) would otherwise build a key/value cache, which the recomputation in
    backward would write a second time. On exit, the blocks checkpointed here and the configs are restored
    (before the trainer saves the model); blocks checkpointed before stay so.
    """
    if not enabled:
        yield
        return
    patched = apply_activation_checkpointing(model)
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", None) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True
        for block in patched:
            _restore(block)


def _patch(block: nn.Module) -> None:
    inner = block.forward  # bound: the class's forward, or one a library set on the instance before us
    block.__dict__[_OWN_FORWARD] = "forward" in block.__dict__
    block.__dict__[_CACHE_POSITIONS] = _cache_positions(inner)
    block.__dict__[_INNER] = inner
    # A method bound to the block, not a closure: copy.deepcopy of the model rebinds it to the copy.
    block.forward = MethodType(_checkpointed_forward, block)


def _restore(block: nn.Module) -> None:
    inner = block.__dict__.pop(_INNER)
    del block.__dict__["forward"]
    if block.__dict__.pop(_OWN_FORWARD):
        block.forward = inner
    del block.__dict__[_CACHE_POSITIONS]


def _cache_positions(forward) -> tuple[tuple[str, int | None], ...]:
    """``(name, positional index or None)`` of each cache argument of ``forward``."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: only keyword caches can be seen
        return tuple((name, None) for name in CACHE_ARGS)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple((name, positional.index(name) if name in positional else None) for name in CACHE_ARGS)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's forward under non-reentrant checkpointing when gradients are recorded; else as it was."""
    inner = self.__dict__[_INNER]
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    for name, index in self.__dict__[_CACHE_POSITIONS]:
        value = kwargs.get(name) if index is None or index >= len(args) else args[index]
        if value is not None:
            raise LmcycleError(f"{type(self).__name__} got a key/value cache ('{name}') in a forward that records "
                               "gradients: activation checkpointing replays the block in backward and would write "
                               "the cache twice; call the model with use_cache=False when training",
                               field="train.activation_checkpointing")
    # preserve_rng_state (the default) replays dropout with the masks of the first pass.
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)
