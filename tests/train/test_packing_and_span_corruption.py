import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcycle.data.packing import pack_sequences
from lmcycle.data.span_corruption import span_corrupt

EOS = 1
SENTINELS = list(range(1000, 1100))
docs = st.lists(st.lists(st.integers(2, 500), max_size=40), max_size=12)


@given(docs, st.integers(1, 64))
def test_packing_is_the_eos_separated_stream_cut_into_blocks(token_lists, seq_len):
    blocks = pack_sequences(token_lists, seq_len, EOS)
    stream = [t for ids in token_lists for t in (*ids, EOS)]
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // seq_len, seq_len)
    # Every block is a real slice of the stream, in order; only the tail shorter than a block is dropped.
    assert blocks.flatten().tolist() == stream[:blocks.numel()]
    assert len(stream) - blocks.numel() < seq_len


def test_packing_a_corpus_shorter_than_one_block_gives_no_blocks():
    assert pack_sequences([[5, 6]], seq_len=8, eos_id=EOS).shape == (0, 8)


def reconstruct(inputs: list[int], labels: list[int]) -> list[int]:
    """Put each sentinel's span from the labels back where the sentinel stands in the input."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in labels[:-1]:
        if t in SENTINELS:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


@settings(max_examples=200)
@given(st.lists(st.integers(2, 999), min_size=2, max_size=300), st.floats(0.05, 0.5), st.floats(1.0, 8.0),
       st.integers(0, 2**32))
def test_span_corruption_input_and_labels_reconstruct_the_original(ids, density, span_len, seed):
    inputs, labels = span_corrupt(ids, SENTINELS, EOS, density, span_len, rng=random.Random(seed))
    assert inputs[-1] == EOS and labels[-1] == EOS
    assert reconstruct(inputs, labels) == ids
    used = [t for t in inputs if t in SENTINELS]
    assert used == SENTINELS[:len(used)]  # sentinels in order, each once
    assert [t for t in labels if t in SENTINELS] == used
    assert labels[0] == SENTINELS[0]  # labels start with the first sentinel
    n_noise = len(labels) - 1 - len(used)
    assert 1 <= n_noise <= len(ids) - 1  # something hidden, something visible
    assert abs(n_noise - len(ids) * density) <= 1  # T5 rounds the noise count


def test_noise_fraction_and_mean_span_length_follow_the_settings():
    rng = random.Random(0)
    noise = spans = total = 0
    for _ in range(200):
        ids = [rng.randint(2, 999) for _ in range(rng.randint(100, 400))]
        inputs, labels = span_corrupt(ids, SENTINELS, EOS, 0.15, 3.0, rng=rng)
        n_spans = sum(t in SENTINELS for t in labels)
        noise += len(labels) - 1 - n_spans
        spans += n_spans
        total += len(ids)
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.2


def test_span_corruption_is_deterministic_for_a_seed_and_varies_across_seeds():
    ids = list(range(2, 102))
    a = span_corrupt(ids, SENTINELS, EOS, rng=random.Random(7))
    assert a == span_corrupt(ids, SENTINELS, EOS, rng=random.Random(7))
    assert any(a != span_corrupt(ids, SENTINELS, EOS, rng=random.Random(s)) for s in range(8, 12))


def test_span_count_is_limited_by_the_sentinels_available():
    ids = list(range(2, 402))
    inputs, labels = span_corrupt(ids, SENTINELS[:3], EOS, 0.5, 1.0, rng=random.Random(0))
    assert sum(t in SENTINELS for t in inputs) == 3
    assert reconstruct(inputs, labels) == ids
