"""Baselines that need no model, to put model scores in perspective.

The extractive baseline is DialogSum's LONGEST-3: the three longest utterances of the dialogue.
"""

from __future__ import annotations

import re

# A speaker tag at the start of an utterance: "#Person1#: ", "#Person_2#: ".
_SPEAKER_TAG = re.compile(r"^\s*#[^#\n]+#\s*:\s*")


def extractive_baseline(dialogue: str, n: int = 3) -> str:
    """The ``n`` longest utterances of ``dialogue``, in dialogue order, one per line.

    An utterance is a non-empty line. Length is the number of characters of the utterance text *after* its
    speaker tag ("#Person1#: "), so that tags (whose length varies: #Person10#) do not decide; ties go to the
    earlier utterance. The selected lines are returned whole, tag included, because the tag says who said it.
    A dialogue with ``n`` or fewer utterances is returned as all of its lines.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lines = [line.strip() for line in dialogue.split("\n") if line.strip()]
    lengths = [len(_SPEAKER_TAG.sub("", line, count=1).strip()) for line in lines]
    longest = sorted(range(len(lines)), key=lambda i: (-lengths[i], i))[:n]
    return "\n".join(lines[i] for i in sorted(longest))
