"""The few-shot prompt builder: token budgets (counted with a real tokenizer), shot choice, truncation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcycle.data.examples import Example
from lmcycle.data.fewshot import build_prompt, build_prompts, count_tokens, pick_shots
from lmcycle.data.synthetic import synthetic_dialogues
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError

POOL = synthetic_dialogues(30, seed=1)
QUERY = synthetic_dialogues(1, seed=2)[0]
TEMPLATE = get_template("summarize")


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def test_counts_include_special_tokens(tokenizer):
    assert count_tokens(tokenizer, "Summary:") == len(tokenizer("Summary:", add_special_tokens=False)["input_ids"]) + 1


def test_all_shots_fit_in_a_roomy_budget(tokenizer):
    p = build_prompt("summarize", QUERY, POOL, 3, tokenizer, max_tokens=4096, reserve=64, seed=0)
    chosen = pick_shots(QUERY, POOL, 3, seed=0)
    assert p.shots_used == 3 and p.shot_ids == [e.id for e in chosen] and not p.truncated
    assert p.text == TEMPLATE.render(QUERY, chosen)
    assert p.n_tokens == tokens(tokenizer, p.text)


def test_budget_is_counted_in_tokens_not_characters(tokenizer):
    chosen = pick_shots(QUERY, POOL, 3, seed=0)
    full = TEMPLATE.render(QUERY, chosen)
    need = tokens(tokenizer, full)
    assert len(full) > need + 100  # a character count would have dropped shots
    p = build_prompt(TEMPLATE, QUERY, POOL, 3, tokenizer, max_tokens=need + 10, reserve=10, seed=0)
    assert p.shots_used == 3 and p.n_tokens == need
    p = build_prompt(TEMPLATE, QUERY, POOL, 3, tokenizer, max_tokens=need + 9, reserve=10, seed=0)
    assert p.shots_used == 2


def test_drops_the_last_shots_first(tokenizer):
    chosen = pick_shots(QUERY, POOL, 4, seed=7)
    for k in range(4, -1, -1):
        budget = tokens(tokenizer, TEMPLATE.render(QUERY, chosen[:k]))
        p = build_prompt(TEMPLATE, QUERY, POOL, 4, tokenizer, max_tokens=budget + 32, reserve=32, seed=7)
        assert p.shots_used == k
        assert p.shot_ids == [e.id for e in chosen[:k]]
        assert p.n_tokens <= budget and not p.truncated


def test_never_picks_the_query_by_identity_or_id(tokenizer):
    pool = POOL[:4]
    for i in range(20):
        picked = pick_shots(pool[0], pool, 3, seed=0, query_index=i)
        assert pool[0] not in picked and len(picked) == 3
    twin = Example(input="a different text", targets=["x"], id=pool[1].id)
    for i in range(20):
        p = build_prompt(TEMPLATE, twin, pool, 3, tokenizer, 4096, 0, seed=0, query_index=i)
        assert pool[1].id not in p.shot_ids and p.shots_used == 3
    duplicate = Example(input=pool[2].input, targets=pool[2].targets, id="elsewhere")
    for i in range(20):
        assert pool[2] not in pick_shots(duplicate, pool, 3, seed=0, query_index=i)
    # A pool smaller than the number of shots gives what there is.
    assert build_prompt(TEMPLATE, pool[0], pool, 10, tokenizer, 4096, 0, seed=0).shots_used == 3


def test_seeded_determinism(tokenizer):
    a = build_prompts(TEMPLATE, POOL[:5], POOL, 2, tokenizer, 2048, 32, seed=3)
    b = build_prompts(TEMPLATE, POOL[:5], POOL, 2, tokenizer, 2048, 32, seed=3)
    assert [p.text for p in a] == [p.text for p in b]
    # query_index and seed both change the draw
    assert len({tuple(p.shot_ids) for p in a}) > 1
    c = build_prompts(TEMPLATE, POOL[:5], POOL, 2, tokenizer, 2048, 32, seed=4)
    assert [p.shot_ids for p in a] != [p.shot_ids for p in c]
    single = build_prompt(TEMPLATE, POOL[3], POOL, 2, tokenizer, 2048, 32, seed=3, query_index=3)
    assert single.text == a[3].text


def test_truncates_the_query_input_when_zero_shot_is_too_long(tokenizer):
    long_query = Example(input=" ".join(e.input for e in POOL[:6]) + " café 🙂 naïve", targets=["x"], id="long")
    zero_shot = tokens(tokenizer, TEMPLATE.render(long_query, []))
    budget = zero_shot // 2
    p = build_prompt(TEMPLATE, long_query, POOL, 2, tokenizer, max_tokens=budget + 16, reserve=16, seed=0)
    assert p.truncated and p.shots_used == 0
    assert p.n_tokens == tokens(tokenizer, p.text) <= budget
    assert p.n_tokens >= budget - 8  # it keeps (almost) as much as fits
    shown = p.text.removeprefix(TEMPLATE.instruction + TEMPLATE.example_separator).removesuffix("\nSummary:")
    assert long_query.input.startswith(shown) and len(shown) < len(long_query.input)
    assert "\ufffd" not in p.text


def test_cut_inside_multibyte_characters_stays_decodable(tokenizer):
    query = Example(input="🙂" * 40, targets=["x"], id="emoji")
    overhead = tokens(tokenizer, TEMPLATE.render(Example(input="", targets=["x"]), []))
    for extra in range(0, 12):
        p = build_prompt(TEMPLATE, query, [], 0, tokenizer, max_tokens=overhead + extra, reserve=0, seed=0)
        assert p.n_tokens <= overhead + extra and "\ufffd" not in p.text
        assert set(p.text.removeprefix(TEMPLATE.instruction).strip().removesuffix("Summary:").strip()) <= {"🙂"}


def test_budget_errors(tokenizer):
    with pytest.raises(LmcycleError) as e:
        build_prompt(TEMPLATE, QUERY, POOL, 1, tokenizer, max_tokens=64, reserve=64, seed=0)
    assert e.value.field == "max_tokens"
    with pytest.raises(LmcycleError) as e:
        build_prompt(TEMPLATE, QUERY, POOL, 1, tokenizer, max_tokens=70, reserve=64, seed=0)
    assert "template alone" in e.value.message


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_tokens=st.integers(min_value=1, max_value=700), reserve=st.integers(min_value=0, max_value=64),
       shots=st.integers(min_value=0, max_value=4), query_index=st.integers(min_value=0, max_value=29))
def test_prompt_never_exceeds_the_budget(tokenizer, max_tokens, reserve, shots, query_index):
    query = POOL[query_index]
    budget = max_tokens - reserve
    overhead = tokens(tokenizer, TEMPLATE.render(Example(input="", targets=["x"]), []))
    try:
        p = build_prompt(TEMPLATE, query, POOL, shots, tokenizer, max_tokens, reserve, seed=1,
                         query_index=query_index)
    except LmcycleError:
        assert budget < overhead  # only refused when not even the template with an empty input fits
        return
    assert p.n_tokens == tokens(tokenizer, p.text) <= budget
    assert p.shots_used <= shots and query.id not in p.shot_ids
    assert p.truncated == (p.shots_used == 0 and query.input not in p.text)
