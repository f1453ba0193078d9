"""The one padder and the one pad-id rule every batch of token rows goes through.

Padded positions are masked out of attention and loss, so their id only has to be a valid token: the
tokenizer's pad token, else its EOS, else 0 (a tokenizer with neither still gets batches).
"""

from __future__ import annotations

import torch


def pad_id_of(tokenizer) -> int:
    """The id padded positions hold: ``pad_token_id``, else ``eos_token_id``, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> ``(ids [B, T], attention_mask [B, T])``, both long, padded with ``pad_id``.

    ``T`` is the longest row (at least 1, so an empty row still makes a valid batch); ``left`` puts the
    padding before each row, as decoder-only generation needs so that every row ends at the same column.
    """
    width = max((len(r) for r in rows), default=0) or 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask
