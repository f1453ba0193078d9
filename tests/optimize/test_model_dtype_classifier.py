"""``model_dtype: bfloat16`` on the classifier stage (every parameter trains in bfloat16) and on a distillation
from a classifier teacher (the teacher in bfloat16, the student in float32)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_distill import LABEL_MAP, classifier_ctx, distill_stage, make_word_tokenizer, tiny_bert

from lmcycle.config import validate
from lmcycle.stages.classifier import ClassifierStage, run_classifier
from lmcycle.stages.distill import run_distill


def test_a_bfloat16_classifier_trains_and_a_distilled_student_is_float32(tmp_path):
    tokenizer = make_word_tokenizer()
    base = tmp_path / "base"
    tiny_bert(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    stage = validate(ClassifierStage, {"name": "clf", "model": str(base), "data": ["train"], "eval_data": ["dev"],
                                       "label_map": LABEL_MAP, "max_len": 16, "baseline": False,
                                       "model_dtype": "bf16",
                                       "train": {"max_steps": 30, "batch_size": 16, "lr": 3e-3, "log_every": 10}})
    ctx = classifier_ctx(tmp_path)
    produced = run_classifier(stage, ctx)
    assert {t.dtype for t in load_file(str(Path(produced["model"]) / "model.safetensors")).values()} == {
        torch.bfloat16}
    metrics = json.loads(Path(produced["eval"]).read_text())["metrics"]
    assert max(v for k, v in metrics.items() if k.endswith("macro_f1")) >= 0.8

    kd = run_distill(distill_stage(produced["model"], model_dtype="bfloat16", train={"max_steps": 10}), ctx)
    assert {t.dtype for t in load_file(str(Path(kd["model"]) / "model.safetensors")).values()} == {torch.float32}
