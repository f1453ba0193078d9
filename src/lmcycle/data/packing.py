"""Sequence packing for causal-LM pre-training: documents back to back, cut into equal blocks.

Packing wastes no compute on padding. A block may hold the end of one document and the start of the next,
separated by EOS; attention crosses that boundary, as in GPT-style pre-training, and the model learns that
what follows EOS is unrelated.
"""

from __future__ import annotations

import torch


def pack_sequences(token_lists: list[list[int]], seq_len: int, eos_id: int) -> torch.LongTensor:
    """Concatenate ``doc_1 EOS doc_2 EOS ...`` and cut it into blocks of ``seq_len`` tokens.

    Returns a LongTensor ``[n_blocks, seq_len]`` with ``n_blocks = total_tokens // seq_len``. The tail (the last
    ``total_tokens % seq_len`` tokens, fewer than one block) is dropped rather than padded, so every position of
    every block is a real token; a corpus shorter than one block gives ``[0, seq_len]``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[:n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
