"""Single-stage commands: fields as key=value, datasets from --data, a run directory like a recipe's."""

import json

import pytest

from lmcycle.cli.main import dataset_from_arg, main
from lmcycle.errors import LmcycleError


def test_dataset_argument_guesses_the_format(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"input": "x", "target": "y"}\n')
    assert dataset_from_arg(f"d={f}") == ("d", {"format": "jsonl", "path": str(f)})
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dialogsum.test.jsonl").write_text("")
    assert dataset_from_arg(f"t={ds}@test") == ("t", {"format": "dialogsum", "path": str(ds), "split": "test"})
    with pytest.raises(LmcycleError, match="cannot tell the format"):
        dataset_from_arg(f"d={tmp_path / 'x.txt'}")
    with pytest.raises(LmcycleError, match="NAME=PATH"):
        dataset_from_arg("nonsense")


def test_build_then_generate_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"hello world number {i}", "target": f"n{i}"}) + "\n"
                            for i in range(30)))
    out = tmp_path / "b"
    code = main(["build", "arch=llama", "size=1m", "corpus=[d]", "vocab_size=300", "max_len=128",
                 "--data", f"d={data}", "--out", str(out)])
    assert code == 0
    model_dir = json.loads((out / "artifacts.json").read_text())["build"]["model"]
    assert (out / "DONE").exists()
    capsys.readouterr()
    code = main(["generate", f"model={model_dir}", "prompts=[hello world, number]", "decoding.max_new_tokens=5",
                 "--out", str(tmp_path / "g")])
    printed = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "g" / "generate" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello world", "number"]
    for r in rows:
        assert f"--- {r['prompt']!r}\n{r['output']}" in printed


def test_single_stage_errors_name_the_field(tmp_path, capsys):
    code = main(["build", "arch=llama", "size=huge", "corpus=[]", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1 and "field 'stages.0.size': unknown size 'huge'" in err and "1m" in err
    assert not (tmp_path / "x").exists()


def test_quantize_then_compare_from_the_command_line(tmp_path, capsys):
    from tiny_lm import examples, make_tokenizer, save_tiny, tiny_llama

    tok = make_tokenizer()
    original = save_tiny(tiny_llama(tok, seed=3), tok, tmp_path / "original")
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"input": ex.input, "target": ex.targets[0]}) + "\n"
                            for ex in examples(8, seed=4)))
    assert main(["quantize", f"model={original}", "method=bf16", "--out", str(tmp_path / "q")]) == 0
    quantized = json.loads((tmp_path / "q" / "artifacts.json").read_text())["quantize"]["model"]
    assert main(["compare", f"models=[{original}, {quantized}]", "labels=[fp32, bf16]", "eval_data=[dev]",
                 "max_len=32", "latency_runs=5", "warmup=1", "batch_size=4", "throughput_batches=1", "threads=1",
                 "--data", f"dev={data}", "--out", str(tmp_path / "c")]) == 0
    result = json.loads((tmp_path / "c" / "compare" / "compare.json").read_text())
    fp32, bf16 = result["rows"]
    assert (fp32["label"], bf16["label"]) == ("fp32", "bf16")
    assert bf16["size_ratio"] == pytest.approx(0.5, abs=0.02)  # two bytes a weight instead of four
    assert bf16["quality"]["dev.perplexity"] == pytest.approx(fp32["quality"]["dev.perplexity"], rel=0.02)
    assert "## Optimization" in (tmp_path / "c" / "report.md").read_text()
