"""The extractive baseline keeps the n longest utterances, measured without the speaker tag, in order."""

import pytest

from lmcycle.evals.baselines import extractive_baseline

DIALOGUE = "\n".join([
    "#Person1#: Hi.",
    "#Person2#: Hello, nice to see you again after so long.",   # 41 chars of text
    "#Person1#: Yes, it has been years.",                     # 24
    "#Person2#: What have you been doing all this time, then?",  # 45
    "#Person10#: Nothing much.",                               # 13 (long tag, short text)
    "#Person1#: I moved to Paris and opened a small bakery.",  # 43
])


def test_three_longest_in_dialogue_order():
    lines = DIALOGUE.split("\n")
    assert extractive_baseline(DIALOGUE) == "\n".join([lines[1], lines[3], lines[5]])


def test_length_ignores_the_speaker_tag():
    dialogue = "#Person10#: abcdefgh\n#Person1#: abcdefghij\n#Person2#: abcdefghi"
    # With the tag counted, '#Person10#: abcdefgh' (20 chars) would beat '#Person2#: abcdefghi' (20) on ties.
    assert extractive_baseline(dialogue, n=2) == "#Person1#: abcdefghij\n#Person2#: abcdefghi"


def test_ties_go_to_the_earlier_utterance_and_short_dialogues_are_kept_whole():
    assert extractive_baseline("#Person1#: aaa\n#Person2#: bbb\n#Person1#: ccc", n=2) == \
        "#Person1#: aaa\n#Person2#: bbb"
    assert extractive_baseline("#Person1#: only one\n\n", n=3) == "#Person1#: only one"
    assert extractive_baseline("no tags here\nsecond much longer line", n=1) == "second much longer line"
    with pytest.raises(ValueError):
        extractive_baseline(DIALOGUE, n=0)
