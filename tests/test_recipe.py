"""Recipes: validation before anything is created, artifacts flow between stages, resume, clear failures."""

import json
import textwrap
from pathlib import Path

import pytest

from lmcycle.cli import main
from lmcycle.errors import LmcycleError
from lmcycle.stages.context import load_datasets
from lmcycle.stages.recipe import load_recipe

TINY = """\
name: tiny
seed: 0
data:
  train: {format: synthetic, n: 40, seed: 1}
  test: {format: synthetic, n: 4, seed: 2}
stages:
  - {type: build, arch: llama, size: 1m, corpus: [train], vocab_size: 320, max_len: 256}
  - type: pretrain
    corpus: [train]
    seq_len: 64
    train: {max_steps: 4, batch_size: 4, lr: 1.0e-3, log_every: 1}
  - {type: eval, name: zero_shot, data: test, decoding: {max_new_tokens: 8}}
  - type: sft
    data: [{dataset: train}]
    max_len: 256
    train: {max_steps: 3, batch_size: 4, lr: 1.0e-3, log_every: 1}
  - {type: eval, name: after_sft, data: test, decoding: {max_new_tokens: 8}}
  - {type: report}
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_unknown_stage_type_names_file_line_and_key(tmp_path):
    p = write(tmp_path, TINY.replace("type: sft", "type: sftt"))
    with pytest.raises(LmcycleError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}:13: field 'stages.3.type': unknown stage type 'sftt'")


def test_wrong_type_inside_a_stage_names_its_line(tmp_path):
    p = write(tmp_path, TINY.replace("lr: 1.0e-3, log_every: 1}\n  - {type: eval, name: zero", "lr: fast, log_every: 1}\n  - {type: eval, name: zero"))
    with pytest.raises(LmcycleError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}:11: field 'stages.1.train.lr'"), str(e.value)


def test_unknown_key_missing_field_and_duplicate_names(tmp_path):
    with pytest.raises(LmcycleError, match=r":7: field 'stages.0.vocab_sizee': unknown key"):
        load_recipe(write(tmp_path, TINY.replace("vocab_size: 320", "vocab_sizee: 320")))
    with pytest.raises(LmcycleError, match=r"field 'name': required field is missing"):
        load_recipe(write(tmp_path, TINY.replace("name: tiny\n", "")))
    with pytest.raises(LmcycleError, match="two stages are named 'zero_shot'"):
        load_recipe(write(tmp_path, TINY.replace("name: after_sft", "name: zero_shot")))


def test_vars_are_substituted_and_unknown_vars_are_errors(tmp_path):
    text = TINY.replace("n: 40", "n: '${n_train}'").replace("arch: llama,", "arch: '${arch}',")
    text = text.replace("seed: 0\n", "vars: {n_train: 40, arch: llama}\nseed: 0\n", 1)
    recipe, stages = load_recipe(write(tmp_path, text))
    assert recipe.data["train"].n == 40 and stages[0].arch == "llama"
    recipe, stages = load_recipe(write(tmp_path, text), ["vars.n_train=12"])
    assert recipe.data["train"].n == 12
    with pytest.raises(LmcycleError, match=r"unknown variable '\$\{nope\}'"):
        load_recipe(write(tmp_path, text.replace("${arch}", "${nope}")))


def test_bad_data_file_stops_before_the_run_directory_exists(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": \n')
    text = TINY.replace("test: {format: synthetic, n: 4, seed: 2}", f"test: {{format: jsonl, path: {bad}}}")
    out = tmp_path / "run"
    code = main(["run", str(write(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err
    assert not out.exists()


def test_bad_model_path_fails_cleanly_without_looking_complete(tmp_path, capsys):
    text = """\
    name: t
    data: {test: {format: synthetic, n: 2}}
    stages:
      - {type: eval, data: test, model: /nonexistent/model/dir}
      - {type: report}
    """
    out = tmp_path / "run"
    code = main(["run", str(write(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "/nonexistent/model/dir" in err
    assert (out / "FAILED").exists() and not (out / "DONE").exists() and not (out / "report.md").exists()


@pytest.mark.slow
def test_tiny_recipe_end_to_end_then_resume_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, TINY)), "--out", str(out)]) == 0
    artifacts = json.loads((out / "artifacts.json").read_text())
    assert list(artifacts) == ["build", "pretrain", "zero_shot", "sft", "after_sft", "report"]
    # each stage read the previous stage's model, never a hand-wired path
    zero = json.loads((out / "zero_shot" / "eval.json").read_text())
    after = json.loads((out / "after_sft" / "eval.json").read_text())
    assert zero["settings"]["model"] == artifacts["pretrain"]["model"]
    assert after["settings"]["model"] == artifacts["sft"]["model"]
    assert (out / "DONE").exists() and not (out / "FAILED").exists()
    report = (out / "report.md").read_text()
    assert "zero_shot" in report and "after_sft" in report
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["stage"] == "pretrain" and "loss" in r]
    assert len(losses) >= 4
    # a finished run directory is never overwritten
    capsys.readouterr()
    assert main(["run", str(write(tmp_path, TINY)), "--out", str(out)]) == 1
    assert "already holds a finished run" in capsys.readouterr().err


def test_interrupted_run_resumes_and_skips_finished_stages(tmp_path, capsys):
    text = """\
    name: t
    data: {train: {format: synthetic, n: 20, seed: 1}}
    stages:
      - {type: build, arch: gpt2, size: 1m, corpus: [train], vocab_size: 300, max_len: 128}
      - {type: eval, data: train, limit: 2, model: /missing/on/first/try, decoding: {max_new_tokens: 4}}
    """
    p = write(tmp_path, text)
    out = tmp_path / "run"
    assert main(["run", str(p), "--out", str(out)]) == 1
    assert (out / "FAILED").exists()
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "stages.1.model=build"]) == 0
    printed = capsys.readouterr().out
    assert "build: done earlier, skipped" in printed
    assert (out / "DONE").exists() and not (out / "FAILED").exists()


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe, stages = load_recipe(path)
    assert stages and stages[-1].type == "report"
    names = [s.stage_name for s in stages]
    assert len(names) == len(set(names))


def test_dialogsum_recipe_finds_the_shared_data_by_default():
    if not (SHARED_DATA / "dialogsum").is_dir():
        pytest.skip(reason=f"DialogSum not found at {SHARED_DATA / 'dialogsum'} (../shared/data beside the repo)")
    recipe, _ = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "dialogsum.yaml")
    datasets = load_datasets({k: v for k, v in recipe.data.items() if k != "train"},
                             Path(__file__).resolve().parents[1] / "recipes" / "dialogsum.yaml")
    assert len(datasets["test"]) == 500 and all(len(ex.targets) == 3 for ex in datasets["test"])
    assert len(datasets["dev"]) == recipe.data["dev"].limit


# -- references and data checked before anything runs ---------------------------------------------------------

def run_fails_before_anything_runs(tmp_path, capsys, text) -> str:
    """Run ``text`` as a recipe; it must fail with one error line and leave no run directory behind."""
    out = tmp_path / "run"
    code = main(["run", str(write(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert not out.exists(), "a stage ran (or the run directory was created) before the error"
    return err.removeprefix("lmcycle: error: ")


def line_of(text: str, needle: str) -> int:
    lines = textwrap.dedent(text).splitlines()
    hits = [i for i, line in enumerate(lines, 1) if needle in line]
    assert len(hits) == 1, needle
    return hits[0]


def test_misspelt_stage_reference_names_line_and_the_stage_meant(tmp_path, capsys):
    text = TINY.replace("  - type: sft\n", "  - type: sft\n    model: pretrainn\n")
    err = run_fails_before_anything_runs(tmp_path, capsys, text)
    assert err.startswith(f"{tmp_path / 'r.yaml'}:{line_of(text, 'pretrainn')}: field 'stages.3.model': "), err
    assert "did you mean 'pretrain'?" in err and "org/name" in err


@pytest.mark.parametrize("ref, words", [("after_sft", "runs after this one"), ("sft", "is this stage itself"),
                                        ("lastest", "did you mean 'latest'?")])
def test_a_model_from_a_later_stage_or_itself_is_an_error(tmp_path, capsys, ref, words):
    text = TINY.replace("  - type: sft\n", f"  - type: sft\n    model: {ref}\n")
    err = run_fails_before_anything_runs(tmp_path, capsys, text)
    assert f":{line_of(text, f'model: {ref}')}: field 'stages.3.model': " in err and words in err, err


def test_hub_ids_and_existing_paths_are_not_taken_for_typos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrainn").mkdir()  # a local model folder one edit away from a stage name
    for ref in ("gpt2", "org/pretrainn", "pretrainn", "build", "latest"):
        stages = load_recipe(write(tmp_path, TINY.replace("  - type: sft\n", f"  - type: sft\n    model: {ref}\n")))[1]
        assert stages[3].model == ref


UNKNOWN_DATASETS = [  # (text in TINY, the same naming an unknown dataset, that name, the field named)
    ("size: 1m, corpus: [train]", "size: 1m, corpus: [trian]", "trian", "stages.0.corpus.0"),
    ("    corpus: [train]\n", "    corpus: [train, tset]\n", "tset", "stages.1.corpus.1"),
    ("name: zero_shot, data: test", "name: zero_shot, data: nope", "nope", "stages.2.data"),
    ("name: zero_shot, data: test", "name: zero_shot, data: test, shot_pool: tran", "tran", "stages.2.shot_pool"),
    ("data: [{dataset: train}]", "data: [{dataset: train}, {dataset: missing}]", "missing", "stages.3.data.1.dataset"),
    ("    max_len: 256\n", "    max_len: 256\n    eval_data: held\n", "held", "stages.3.eval_data"),
]


@pytest.mark.parametrize("old, new, name, field", UNKNOWN_DATASETS, ids=[f for *_, f in UNKNOWN_DATASETS])
def test_unknown_dataset_names_the_key_line_and_field(tmp_path, capsys, old, new, name, field):
    assert TINY.count(old) == 1
    text = TINY.replace(old, new)
    err = run_fails_before_anything_runs(tmp_path, capsys, text)
    line = line_of(text, "eval_data: held" if name == "held" else new.strip())
    assert err.startswith(f"{tmp_path / 'r.yaml'}:{line}: field '{field}': unknown dataset '{name}'"), err
    assert "data section has: train, test" in err


def test_dataset_names_nested_in_a_stage_are_checked(tmp_path):
    text = """\
    name: t
    data: {train: {format: synthetic, n: 4}}
    stages:
      - {type: build, arch: llama, size: 1m, corpus: [train], vocab_size: 300}
      - type: prune
        heal:
          data: [train, trainn]
          train: {max_steps: 2}
    """
    with pytest.raises(LmcycleError) as e:
        load_recipe(write(tmp_path, text))
    assert (e.value.line, e.value.field) == (7, "stages.1.heal.data.1") and "did you mean 'train'?" in str(e.value)


def test_warmup_longer_than_the_run_is_an_error_on_the_field(tmp_path, capsys):
    text = TINY.replace("train: {max_steps: 4, batch_size: 4,", "train: {max_steps: 4, warmup_steps: 5, batch_size: 4,")
    err = run_fails_before_anything_runs(tmp_path, capsys, text)
    assert err.startswith(f"{tmp_path / 'r.yaml'}:{line_of(text, 'warmup_steps: 5')}: "
                          "field 'stages.1.train.warmup_steps': warmup_steps (5) is more than max_steps (4)"), err
    equal = TINY.replace("train: {max_steps: 4, batch_size: 4,", "train: {max_steps: 4, warmup_steps: 4, batch_size: 4,")
    assert load_recipe(write(tmp_path, equal))[1][1].train.warmup_steps == 4


@pytest.mark.parametrize("content, words", [("", "no records: the file is empty"),
                                            ("input,target\n", "no records after the header")])
def test_an_empty_build_corpus_stops_before_a_model_is_built(tmp_path, capsys, content, words):
    corpus = tmp_path / ("corpus.jsonl" if not content else "corpus.csv")
    corpus.write_text(content)
    fmt = "csv" if content else "jsonl"
    text = TINY.replace("train: {format: synthetic, n: 40, seed: 1}", f"train: {{format: {fmt}, path: {corpus}}}")
    err = run_fails_before_anything_runs(tmp_path, capsys, text)
    assert err == f"{corpus}:1: {words}"


def test_an_empty_sft_file_names_the_file(tmp_path, capsys):
    empty = tmp_path / "sft.jsonl"
    empty.write_bytes(b"")
    text = TINY.replace("  test: {format: synthetic, n: 4, seed: 2}\n",
                        f"  test: {{format: synthetic, n: 4, seed: 2}}\n  chat: {{format: jsonl, path: {empty}}}\n")
    text = text.replace("data: [{dataset: train}]", "data: [{dataset: chat}]")
    assert run_fails_before_anything_runs(tmp_path, capsys, text) == f"{empty}:1: no records: the file is empty"


def test_an_all_tied_rankings_file_names_the_file(tmp_path, capsys):
    ranks = tmp_path / "ranks.jsonl"
    ranks.write_text("".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"p{i}", "completions": ["a", "b", "c"],
                                         "ranks": [2, 2, 2]}) + "\n" for i in range(5)))
    text = TINY.replace("  test: {format: synthetic, n: 4, seed: 2}\n",
                        f"  test: {{format: synthetic, n: 4, seed: 2}}\n"
                        f"  prefs: {{format: rankings, path: {ranks}, split: all}}\n")
    text = text.replace("  - {type: report}\n", "  - {type: dpo, data: prefs, eval_data: prefs, train: {max_steps: 2}}\n"
                        "  - {type: report}\n")
    err = run_fails_before_anything_runs(tmp_path, capsys, text)
    assert err.startswith(f"{ranks}: field 'ranks': no preference pair can be formed"), err


DATASET_KEYS = {"corpus", "data", "eval_data", "shot_pool", "prompts", "calibration", "dataset"}
MODEL_KEYS = {"model", "models", "teacher", "reference_model", "toxicity_classifier"}
NOT_REFERENCES = {("GenerateStage", "prompts"), ("ModelReward", "model"), ("ClassifierReward", "model")}


def config_fields(cls, seen=None):
    """(class name, field name, what the field refers to) for a config class and every config nested in it;
    a field holding nested configs (sft's ``data``) is left to their own fields."""
    from typing import get_args

    from pydantic import BaseModel

    from lmcycle.config import refers_to

    seen = set() if seen is None else seen
    if cls in seen:
        return
    seen.add(cls)
    for name, info in cls.model_fields.items():
        todo, nested = [info.annotation], []
        while todo:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                nested.append(t)
            todo.extend(get_args(t))
        if not nested:
            yield cls.__name__, name, refers_to(info.annotation, info.metadata)
        for t in nested:
            yield from config_fields(t, seen)


def test_every_stage_field_that_names_a_dataset_or_model_is_checked():
    from lmcycle.stages import KINDS

    fields = [f for kind in KINDS for f in config_fields(kind.config_class)]
    for cls, name, refers in fields:
        if (cls, name) in NOT_REFERENCES:
            continue
        if name in DATASET_KEYS:
            assert refers == "dataset", f"{cls}.{name} names a dataset but is not a DatasetName"
        elif name in MODEL_KEYS:
            assert refers == "model", f"{cls}.{name} names a model but is not a ModelRef"
    assert ("ModelReward", "path", "model") in fields and ("HealConfig", "data", "dataset") in fields


def test_ppo_warmup_longer_than_its_rollouts_is_an_error(tmp_path):
    text = """\
    name: t
    data: {p: {format: synthetic, n: 40}}
    stages:
      - {type: build, arch: llama, size: 1m, corpus: [p], vocab_size: 300}
      - type: ppo
        prompts: p
        reward: {kind: python, function: "os:getcwd"}
        rollouts: 2
        ppo: {rollout_size: 16, ppo_epochs: 1}
        train: {batch_size: 8, warmup_steps: 5}
    """
    with pytest.raises(LmcycleError) as e:
        load_recipe(write(tmp_path, text))
    assert (e.value.line, e.value.field) == (10, "stages.1.train")
    assert "warmup_steps (5) is more than the 4 optimizer steps of 2 rollouts" in e.value.message
    assert load_recipe(write(tmp_path, text.replace("warmup_steps: 5", "warmup_steps: 4")))[1][1].train.warmup_steps == 4


def test_a_global_batch_the_ranks_cannot_split_is_an_error_on_its_field(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets before the recipe loads
    text = TINY.replace("train: {max_steps: 4, batch_size: 4,", "train: {max_steps: 4, global_batch_size: 12, batch_size: 4,")
    with pytest.raises(LmcycleError) as e:
        load_recipe(write(tmp_path, text))
    assert (e.value.line, e.value.field) == (line_of(text, "global_batch_size: 12"), "stages.1.train.global_batch_size")
    assert "not a multiple of batch_size 4 x 2 rank(s) = 8" in e.value.message
    fits = text.replace("global_batch_size: 12", "global_batch_size: 16")
    assert load_recipe(write(tmp_path, fits))[1][1].train.grad_accum == 2  # 16 = 4 x 2 ranks x 2
    both = text.replace("global_batch_size: 12", "global_batch_size: 16, grad_accum: 1")
    with pytest.raises(LmcycleError, match="grad_accum 1 contradicts global_batch_size 16"):
        load_recipe(write(tmp_path, both))


@pytest.mark.parametrize("world, section, field, words", [
    (2, "distributed: {strategy: fsdp, cpu_offload: true}", "distributed.cpu_offload", "this run is on cpu"),
    (4, "distributed: {strategy: fsdp, replicas: 3}", "distributed.replicas", "(3) does not divide the 4 ranks"),
])
def test_engine_settings_this_launch_cannot_run_stop_the_recipe_when_it_loads(tmp_path, monkeypatch, world, section,
                                                                             field, words):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    text = TINY.replace("seed: 0\n", f"seed: 0\ndevice: cpu\n{section}\n", 1)
    with pytest.raises(LmcycleError) as e:
        load_recipe(write(tmp_path, text))
    assert (e.value.line, e.value.field) == (line_of(text, section), field) and words in e.value.message
    # A stage's own train.distributed is checked where it is written.
    own = TINY.replace("lr: 1.0e-3, log_every: 1}\n  - {type: eval, name: after",
                       f"lr: 1.0e-3, log_every: 1, {section}}}\n  - {{type: eval, name: after")
    with pytest.raises(LmcycleError) as e:
        load_recipe(write(tmp_path, own))
    assert e.value.field == f"stages.3.train.{field}" and e.value.line == line_of(own, section)
    # One process, or ddp, ignores these settings.
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert load_recipe(write(tmp_path, text))[0].distributed.strategy == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert load_recipe(write(tmp_path, text.replace("strategy: fsdp", "strategy: ddp")))
