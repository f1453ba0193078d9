"""T5 span corruption: the denoising objective T5 is pre-trained with.

Random spans of the input (``noise_density`` of its tokens, spans of ``mean_span_length`` on average) are each
replaced by one sentinel token; the target lists every sentinel followed by the tokens it hid::

    ids:     The cute dog walks in the park
    input:   The <X> walks in <Y> park </s>
    labels:  <X> cute dog <Y> the </s>
"""

from __future__ import annotations

import random


def span_corrupt(ids: list[int], sentinel_ids: list[int], eos_id: int, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, *, rng: random.Random) -> tuple[list[int], list[int]]:
    """Corrupt ``ids``; return ``(input_ids, labels)`` in T5's format, both ending with ``eos_id``.

    As in T5, the number of noise tokens is ``round(len(ids) * noise_density)`` (at least 1, and at least one
    token stays visible), the noise is split into ``round(noise / mean_span_length)`` spans (at least 1, at most
    ``len(sentinel_ids)``), and noise and non-noise spans alternate, the sequence starting with a non-noise span.
    Sequences shorter than 2 tokens are returned uncorrupted (``labels`` = ``[eos_id]``).
    """
    n = len(ids)
    if n < 2 or not sentinel_ids:
        return [*ids, eos_id], [eos_id]
    n_noise = min(max(round(n * noise_density), 1), n - 1)
    n_spans = max(1, round(n_noise / mean_span_length))
    n_spans = min(n_spans, n_noise, n - n_noise, len(sentinel_ids))
    noise_lengths = _random_partition(n_noise, n_spans, rng)
    keep_lengths = _random_partition(n - n_noise, n_spans, rng)

    inputs: list[int] = []
    labels: list[int] = []
    pos = 0
    for sentinel, keep, noise in zip(sentinel_ids, keep_lengths, noise_lengths, strict=False):
        inputs.extend(ids[pos:pos + keep])
        pos += keep
        inputs.append(sentinel)
        labels.append(sentinel)
        labels.extend(ids[pos:pos + noise])
        pos += noise
    return [*inputs, eos_id], [*labels, eos_id]


def _random_partition(total: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` positive integers summing to ``total``, uniformly among all such compositions."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
