"""The one padder (data/batching.py): shapes, sides, masks and the pad-id rule."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given
from hypothesis import strategies as st

from lmcycle.data.batching import pad_id_of, pad_rows

rows_strategy = st.lists(st.lists(st.integers(1, 50), max_size=6), min_size=1, max_size=5)


@given(rows_strategy, st.booleans())
def test_padding_keeps_every_row_and_masks_exactly_the_padding(rows, left):
    ids, mask = pad_rows(rows, pad_id=0, left=left)
    width = max(max(len(r) for r in rows), 1)
    assert ids.shape == mask.shape == (len(rows), width)
    assert ids.dtype == mask.dtype == torch.long
    for b, row in enumerate(rows):
        kept = ids[b][mask[b].bool()].tolist()
        assert kept == row
        assert int(mask[b].sum()) == len(row)
        if row:  # the padding sits on the requested side
            assert bool(mask[b, -1] if left else mask[b, 0])
        assert (ids[b][~mask[b].bool()] == 0).all()


def test_left_padding_ends_every_row_in_the_last_column():
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=9, left=True)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_id_is_pad_else_eos_else_zero():
    assert pad_id_of(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id_of(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # 0 is a real id, not "unset"
