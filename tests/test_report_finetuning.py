"""The report's "Fine-tuning compared" table: one row per sft stage, every value taken from the run directory."""

import json

import torch
import yaml
from safetensors.torch import save_file

from lmcycle.report import write_report
from lmcycle.stages import report_sections

# Saved shapes of the fully fine-tuned model: 10*4 + 4 + 3*3 = 53 parameters.
FULL_SHAPES = {"embed.weight": (10, 4), "norm.weight": (4,), "proj.weight": (3, 3)}
FULL_PARAMS = 53


def _make_run(run_dir, move: bool = False):
    """Build a run with a full sft stage, a LoRA sft stage and one eval of each (plus one of the base model)."""
    config = {"name": "ft", "stages": [
        {"type": "build"},
        {"type": "sft", "data": [{"dataset": "train"}]},
        {"type": "eval", "name": "fine_tuned"},
        {"type": "sft", "name": "sft_lora", "model": "build", "data": [{"dataset": "train"}],
         "peft": {"method": "lora", "r": 4, "alpha": 8}},
        {"type": "eval", "name": "lora_fine_tuned"},
        {"type": "eval", "name": "base"},
        {"type": "report"}]}
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    full_model = run_dir / "sft" / "model"
    full_model.mkdir(parents=True)
    save_file({k: torch.zeros(shape) for k, shape in FULL_SHAPES.items()}, str(full_model / "model.safetensors"))
    (full_model / "tokenizer.json").write_bytes(b"t" * 1000)
    lora_model, adapter = run_dir / "sft_lora" / "model", run_dir / "sft_lora" / "adapter"
    lora_model.mkdir(parents=True)
    adapter.mkdir()
    (lora_model / "model.safetensors").write_bytes(b"m" * 99_999)  # the merged model is not the checkpoint
    (adapter / "adapter.safetensors").write_bytes(b"a" * 2500)
    (adapter / "adapter_config.json").write_bytes(b"c" * 500)

    rows = [{"stage": "sft", "event": "train_end", "step": 10, "wall_time": 42.5, "tokens_per_s": 100.0,
             "peak_rss_mb": 812.4, "rss_growth_mb": 95.2},
            {"stage": "sft", "event": "stage_end", "type": "sft", "seconds": 44.0},
            {"stage": "sft_lora", "event": "peft", "method": "lora", "trainable_params": 1234,
             "total_params": 98765, "trainable_percent": 1.2494},
            {"stage": "sft_lora", "event": "train_end", "step": 10, "wall_time": 75.0, "tokens_per_s": 80.0,
             "peak_rss_mb": 640.0},
            {"stage": "sft_lora", "event": "stage_end", "type": "sft", "seconds": 77.0}]
    artifacts = {"build": {"model": "build/model"}, "sft": {"model": str(full_model)},
                 "sft_lora": {"model": str(lora_model), "adapter": str(adapter)}}
    for stage, model, rouge_l in [("fine_tuned", full_model, 31.25), ("lora_fine_tuned", lora_model, 27.5),
                                  ("base", run_dir / "build" / "model", 5.0)]:
        (run_dir / stage).mkdir()
        (run_dir / stage / "eval.json").write_text(json.dumps(
            {"metrics": {"rouge1": rouge_l + 10, "rouge2": rouge_l - 20, "rougeL": rouge_l, "n": 3}, "settings": {"model": str(model)}}))
        artifacts[stage] = {"eval": str(run_dir / stage / "eval.json")}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "artifacts.json").write_text(json.dumps(artifacts))


def _comparison(text: str) -> dict[str, dict[str, str]]:
    section = text.split("## Fine-tuning compared", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells, strict=True))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}


def test_full_and_lora_sft_side_by_side(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    rows = _comparison(write_report(run, sections=report_sections()).read_text(encoding="utf-8"))
    assert list(rows) == ["sft", "sft_lora"]

    full, lora = rows["sft"], rows["sft_lora"]
    full_bytes = sum(p.stat().st_size for p in (run / "sft" / "model").iterdir())
    assert full["Method"] == "full" and lora["Method"] == "lora r=4"
    assert full["Trainable params"] == f"{FULL_PARAMS:,}" and full["% of total"] == "100.00%"
    assert lora["Trainable params"] == "1,234" and lora["% of total"] == "1.25%"
    assert full["Wall time"] == "42.5 s" and lora["Wall time"] == "1m 15s"
    col = "Peak RSS (+ added by training), MiB"  # growth is shown only when the stage logged it
    assert full[col] == "812 (+95)" and lora[col] == "640"
    # The LoRA checkpoint is the adapter folder (3000 bytes), not the 99,999-byte merged model.
    assert full["Checkpoint (MB)"] == f"{full_bytes / 1e6:.3f}" and lora["Checkpoint (MB)"] == "0.003"
    # Each row scores only the evals of its own model; the base model's eval belongs to neither.
    assert full["ROUGE-1/2/L"] == "41.25/11.25/31.25 (fine_tuned)"
    assert lora["ROUGE-1/2/L"] == "37.50/7.50/27.50 (lora_fine_tuned)"


def test_comparison_survives_a_moved_run_directory(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    moved = tmp_path / "moved"
    run.rename(moved)  # every recorded path now points to a folder that is gone
    rows = _comparison(write_report(moved, sections=report_sections()).read_text(encoding="utf-8"))
    assert rows["sft"]["Trainable params"] == f"{FULL_PARAMS:,}"
    assert rows["sft_lora"]["Checkpoint (MB)"] == "0.003"
    assert rows["sft"]["ROUGE-1/2/L"].startswith("41.25/11.25/31.25")
    assert rows["sft_lora"]["ROUGE-1/2/L"].startswith("37.50/7.50/27.50")


def test_no_sft_stage_means_no_comparison(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "x", "stages": [{"type": "pretrain"}]}))
    (run / "artifacts.json").write_text(json.dumps({"pretrain": {"model": "pretrain/model"}}))
    assert "Fine-tuning compared" not in write_report(run, sections=report_sections()).read_text(encoding="utf-8")


def test_scores_by_model_and_dataset_show_forgetting(tmp_path):
    """Two models scored on two datasets: one row per dataset with its headline metric, one column per model."""

    run_dir = tmp_path / "run"
    artifacts = {}
    scores = {("before", "summaries", "rougeL"): 30.0, ("before", "tweets", "macro_f1"): 60.0,
              ("after", "summaries", "rougeL"): 35.0, ("after", "tweets", "macro_f1"): 20.0}
    for (model, data, metric), value in scores.items():
        (run_dir / model / "model").mkdir(parents=True, exist_ok=True)
        stage = f"{model}_{data}"
        (run_dir / stage).mkdir()
        (run_dir / stage / "eval.json").write_text(json.dumps(
            {"metrics": {metric: value, "perplexity": value / 10, "n": 4},
             "settings": {"model": str(run_dir / model / "model"), "data": data}}))
        artifacts[stage] = {"eval": str(run_dir / stage / "eval.json")}
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "artifacts.json").write_text(json.dumps(artifacts))
    text = write_report(run_dir, sections=report_sections()).read_text()
    section = text.split("## Scores by model and dataset")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == "| Dataset (metric) | before | after |"
    assert table[1] == "| summaries (ROUGE-L) | 30.00 | 35.00 |"
    assert table[2] == "| tweets (Macro-F1) | 60.00 | 20.00 |"
    assert table[3] == "| Dataset | before | after |" and table[5] == "| tweets | 6.00 | 2.00 |"
