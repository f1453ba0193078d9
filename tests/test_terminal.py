"""printable: untrusted text reaches a terminal with its controls shown as escapes, everything else as it was."""

import json

from lmcycle.cli.main import _print_outcome
from lmcycle.terminal import printable

HOSTILE = "a\x1b[31mred\x1b]0;title\x07\rb\nc\td\x9b2J\u202eevil\u2028\x7f\x00"


def test_controls_become_visible_escapes_and_layout_stays():
    assert printable(HOSTILE) == ("a\\u001b[31mred\\u001b]0;title\\u0007\\u000db\nc\td\\u009b2J\\u202eevil\\u2028"
                                  "\\u007f\\u0000")
    assert printable("x\ny\tz", layout=False) == "x\\u000ay\\u0009z"  # a name stays on its one line
    ordinary = "Tōkyō 東京 — «quote» émoji 😀 and a ZWJ family 👨\u200d👩\u200d👧 [1] \\ back"
    assert printable(ordinary) == ordinary == printable(ordinary, layout=False)


def test_printed_json_stays_json_with_the_same_strings():
    text = json.dumps({"text": HOSTILE, "name": "evil\n[7] x"}, ensure_ascii=False)
    shown = printable(text)
    assert "\x9b" not in shown and "\u202e" not in shown and "\x7f" not in shown
    assert json.loads(shown) == {"text": HOSTILE, "name": "evil\n[7] x"}


def test_generated_outputs_are_printed_inert(tmp_path, capsys):
    generations = tmp_path / "gen" / "generations.jsonl"
    generations.parent.mkdir()
    generations.write_text(json.dumps({"prompt": "p", "output": "out\x1b[2J\x9b1m"}) + "\n", encoding="utf-8")
    (tmp_path / "artifacts.json").write_text(json.dumps({"gen": {"generations": str(generations)}}))
    _print_outcome(tmp_path, "generate")
    out = capsys.readouterr().out
    assert "out\\u001b[2J\\u009b1m" in out and "\x1b" not in out and "\x9b" not in out
