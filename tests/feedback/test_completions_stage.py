"""The completions stage: k sampled completions per prompt as a labeling project's items (a tiny model built by
the recipe, a served copy of a model through the OpenAI-compatible backend), repeats replaced by more draws,
the label database import, the report section with hostile model output, and the recipe errors."""

from __future__ import annotations

import json
import logging
import textwrap

import pytest
from loopback import running
from tiny_lm import make_tokenizer, save_tiny, tiny_llama

from lmcycle.cli.main import main
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.feedback.items import read_completions
from lmcycle.feedback.store import LabelStore
from lmcycle.models.generate import DecodingConfig
from lmcycle.report.rundir import Run
from lmcycle.stages import STAGES, report_sections
from lmcycle.stages.completions import (
    CompletionsStage,
    draw_seed,
    run_completions,
    sample_completions,
    section,
)
from lmcycle.stages.context import RunContext
from lmcycle.stages.recipe import load_recipe

PROMPTS = [{"id": "p1", "input": "the cat sees", "target": "the dog"},
           {"id": "p2", "input": "red green", "target": "blue"},
           {"id": "p3", "input": "the dog sees the moon and", "target": "sleeps"}]
DECODING = {"max_new_tokens": 5, "temperature": 1.5}


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


def _recipe(tmp_path, stage: str, name: str = "r.yaml"):
    text = f"""\
    name: c
    data:
      train: {{format: synthetic, n: 20, seed: 1}}
      prompts: {{format: jsonl, path: {_prompts_file(tmp_path)}, id_field: id}}
    stages:
      - {{type: build, arch: llama, size: 1m, corpus: [train], vocab_size: 320, max_len: 128}}
      - {stage}
      - {{type: report}}
    """
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


class Scripted:
    """``complete(prompts, decoding)`` answering each prompt with the next text of its script; records the calls."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = {p: list(texts) for p, texts in scripts.items()}
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, prompts: list[str], decoding: DecodingConfig) -> list[str]:
        self.calls.append((list(prompts), decoding.seed))
        return [self.scripts[p].pop(0) for p in prompts]


def test_repeats_and_blanks_are_replaced_by_more_draws_then_items_go_short_or_are_dropped():
    script = Scripted({"A": ["a1", "a2", "a3"],
                       "B": ["b1", "b1", " ", "b2", "b3"],  # a repeat and a blank, both replaced
                       "C": ["c", "c", "c", "c", "x"],  # two distinct after both extra draws: short
                       "D": ["d"] * 5})  # one distinct: nothing to rank
    decoding = DecodingConfig(do_sample=True)
    texts, counts = sample_completions(script, ["A", "B", "C", "D"], decoding, k=3, seed=7, resample=2)
    assert texts == [["a1", "a2", "a3"], ["b1", "b2", "b3"], ["c", "x"], ["d"]]
    # 3 draws of all 4 prompts, then 2 extra draws of B, C and D; 9 of the 18 draws were not kept
    assert [p for p, _ in script.calls] == [["A", "B", "C", "D"]] * 3 + [["B", "C", "D"]] * 2
    assert [s for _, s in script.calls] == [draw_seed(7, d) for d in range(5)]
    # the first 3 draws kept 3 + 1 + 1 + 1 = 6 texts of 12
    assert counts == {"draws": 18, "repeats": 9, "distinct_share": 0.5}


def test_draw_seeds_are_distinct_across_draws_and_stage_seeds():
    seeds = {draw_seed(s, d) for s in range(4) for d in range(8)}
    assert len(seeds) == 32 and all(0 <= s < 2**32 for s in seeds)
    assert draw_seed(3, 1) == draw_seed(3, 1)


def test_a_recipe_samples_k_completions_of_a_built_model_and_imports_them(tmp_path, capsys):
    stage = ("{type: completions, prompts: prompts, k: 3, decoding: {max_new_tokens: 5, temperature: 1.5}, "
             "label_db: labels.sqlite, project: fresh, overlap: 2}")
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, stage)), "--out", str(out)]) == 0
    items = read_completions(out / "completions" / "completions.jsonl")  # the format labeling reads
    assert [i.prompt_id for i in items] == ["p1", "p2", "p3"]
    assert [i.prompt for i in items] == [r["input"] for r in PROMPTS]
    for item, row in zip(items, PROMPTS, strict=True):
        assert [c.id for c in item.completions] == ["c0", "c1", "c2"]
        assert len({c.text for c in item.completions}) == 3
        assert {c.model for c in item.completions} == {"build"}  # the stage whose model it was
        assert item.completions[0].decoding["do_sample"] is True and item.completions[0].decoding["seed"] == 0
        assert item.meta == {"reference": row["target"], "model": "build"} and item.overlap == 2
    with LabelStore.open(str(tmp_path / "labels.sqlite")) as store:  # relative to the recipe's folder
        assert store.project("fresh").overlap == 2
        stored = store.snapshot("fresh").items
    assert [(i.prompt_id, [c.text for c in i.completions]) for i in stored] == \
        [(i.prompt_id, [c.text for c in i.completions]) for i in items]
    row = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("event") == "completions")
    assert (row["prompts"], row["k"], row["completions"], row["model"]) == (3, 3, 9, "build")
    assert row["draws"] == 9 + row["repeats"] and row["dropped_items"] == 0
    report = (out / "report.md").read_text()
    assert "## Human feedback" in report and "| completions | 3 | 3 | build | sample T=1.5, ≤ 5 tokens |" in report


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = make_tokenizer()
    return save_tiny(tiny_llama(tok), tok, tmp_path_factory.mktemp("tiny") / "llama")


def _ctx(tmp_path, name: str) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / name, recipe_file=str(tmp_path / "recipe.yaml"))
    ctx._datasets["prompts"] = [Example(r["input"], [r["target"]], id=r["id"]) for r in PROMPTS]
    return ctx


def test_a_served_model_through_the_openai_backend_writes_what_the_local_model_writes(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    from lmcycle.serve.app import create_app

    monkeypatch.setenv("LMCYCLE_TEST_KEY", "sk-k")
    local = run_completions(CompletionsStage(model=tiny_dir, prompts="prompts", k=3, decoding=DECODING),
                            _ctx(tmp_path, "local"))
    with running(create_app(tiny_dir, api_key="sk-k")) as url:
        remote = run_completions(CompletionsStage(backend=f"openai:{url}/v1#llama", api_key_env="LMCYCLE_TEST_KEY",
                                                  prompts="prompts", k=3, decoding=DECODING),
                                 _ctx(tmp_path, "remote"))
    local_items, remote_items = read_completions(local["completions"]), read_completions(remote["completions"])
    assert [[c.text for c in i.completions] for i in remote_items] == \
        [[c.text for c in i.completions] for i in local_items]
    assert len(local_items) == 3 and all(len(i.completions) >= 2 for i in local_items)
    assert {c.model for i in remote_items for c in i.completions} == {"llama"}  # the served model's name
    assert {c.model for i in local_items for c in i.completions} == {tiny_dir}  # no stage: the path as given
    monkeypatch.delenv("LMCYCLE_TEST_KEY")
    with pytest.raises(LmcycleError, match="environment variable LMCYCLE_TEST_KEY is not set"):
        run_completions(CompletionsStage(backend="openai:http://127.0.0.1:9/v1#m", api_key_env="LMCYCLE_TEST_KEY",
                                         prompts="prompts", decoding=DECODING), _ctx(tmp_path, "nokey"))


HOSTILE = ["<script>alert(1)</script>", "| a | b |\n# heading\n\n## Chapter", "[x](javascript:alert(1)) `tick`",
           "<img src=x onerror=alert(1)>", "*bold* _em_"]


def test_the_import_creates_the_project_and_the_report_escapes_model_output(tmp_path, monkeypatch, caplog, db_url):
    import lmcycle.stages.completions as stage_module

    prompts = {"the cat sees": HOSTILE[:3],
               "red green": [HOSTILE[3], HOSTILE[3], HOSTILE[4], HOSTILE[4]],  # 2 distinct in 4 draws: short
               "the dog sees the moon and": ["same"] * 4}  # 1 distinct in 4 draws: left out, with a warning
    script = Scripted(prompts)
    monkeypatch.setattr(stage_module, "_backend", lambda cfg, ctx: (script, "scripted"))
    ctx = _ctx(tmp_path, "run")
    cfg = CompletionsStage(name="cmp <b>", prompts="prompts", k=3, resample=1, label_db=db_url, project="new",
                           overlap=1, decoding=DECODING)
    with caplog.at_level(logging.WARNING, logger="lmcycle.stages.completions"):
        produced = run_completions(cfg, ctx)
    assert "left out 1 of 3 prompt(s)" in caplog.text
    items = read_completions(produced["completions"])
    assert [[c.text for c in i.completions] for i in items] == [HOSTILE[:3], HOSTILE[3:]]
    with LabelStore.open(db_url) as store:
        assert store.project("new").overlap == 1
        assert [i.prompt_id for i in store.snapshot("new").items] == ["p1", "p2"]
    ctx.add_artifacts("cmp <b>", produced)
    (ctx.run_dir / "config.yaml").write_text("stages:\n  - {type: completions, name: 'cmp <b>'}\n")
    text = section(Run.read(ctx.run_dir, ctx.artifacts))
    assert "| cmp \\<b\\> | 2 | 3 | scripted | sample T=1.5, ≤ 5 tokens |" in text
    assert "| 1 / 1 |" in text  # p2 is short of k after its extra draw, p3 was dropped
    for raw in ("<script>", "<img src=x onerror=alert(1)>", "`tick`", "*bold*", "| a | b |"):
        assert raw not in text
    assert "\\<script\\>alert(1)\\</script\\>" in text and "\\[x\\](javascript:alert(1)) \\`tick\\`" in text
    assert [line for line in text.splitlines() if line.startswith("#")] == ["### Completions for labeling"]
    page = "\n".join(part(Run.read(ctx.run_dir, ctx.artifacts)) for part in report_sections())
    assert "## Human feedback\n\n### Completions for labeling" in page


@pytest.mark.parametrize(("stage", "field", "words"), [
    ("{type: completions, prompts: prompts, k: 1}", "stages.1.k", "k = 1: a labeler ranks at least 2"),
    ("{type: completions, prompts: prompts, decoding: {do_sample: false}}", "stages.1.decoding",
     "do_sample: false gives 4 equal greedy completions"),
    ("{type: completions, prompts: prompts, model: build, backend: 'openai:http://x/v1#m'}", "stages.1.backend",
     "not both"),
    ("{type: completions, k: 2}", "stages.1.prompts", "required field is missing"),
    ("{type: completions, prompts: nope}", "stages.1.prompts", "unknown dataset 'nope'"),
    ("{type: completions, prompts: prompts, decoding: {seed: 3}}", "stages.1.decoding", "set the stage's 'seed'"),
    ("{type: completions, prompts: prompts, api_key_env: KEY}", "stages.1", "only applies with 'backend'"),
    ("{type: completions, prompts: prompts, project: p}", "stages.1", "only applies with 'label_db'"),
])
def test_bad_stage_configs_name_the_recipe_line_and_field(tmp_path, stage, field, words):
    path = _recipe(tmp_path, stage)
    with pytest.raises(LmcycleError) as e:
        load_recipe(path)
    assert e.value.file == str(path) and e.value.line == 7 and e.value.field == field, str(e.value)
    assert words in e.value.message


def test_the_stage_is_registered_and_samples_by_default(tmp_path):
    assert STAGES["completions"].config_class is CompletionsStage and not STAGES["completions"].data_parallel
    _, stages = load_recipe(_recipe(tmp_path, "{type: completions, prompts: prompts, decoding: {top_p: 0.9}}"))
    assert stages[1].decoding.do_sample is True and stages[1].decoding.top_p == 0.9 and stages[1].k == 4
    # config.yaml records decoding.seed 0; it loads again
    assert CompletionsStage.model_validate(stages[1].model_dump(mode="json")).decoding == stages[1].decoding
