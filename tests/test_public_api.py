"""The package root: about a dozen names, each the real object of its module, imported on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lmcycle


def test_every_public_name_resolves_to_its_module_object():
    from lmcycle.adapt.lora import LoraConfig, add_lora
    from lmcycle.artifacts import load_model
    from lmcycle.errors import LmcycleError
    from lmcycle.evals.bleu import bleu
    from lmcycle.evals.rouge import rouge
    from lmcycle.evals.score import Score
    from lmcycle.models.generate import DecodingConfig, generate
    from lmcycle.stages.recipe import load_recipe, run_recipe
    from lmcycle.stages.report import write_run_report
    from lmcycle.train.loop import TrainConfig, train

    expected = {"load_model": load_model, "generate": generate, "DecodingConfig": DecodingConfig, "fit": train,
                "TrainConfig": TrainConfig, "add_lora": add_lora, "LoraConfig": LoraConfig,
                "load_recipe": load_recipe, "run_recipe": run_recipe, "rouge": rouge, "bleu": bleu,
                "Score": Score, "write_report": write_run_report, "LmcycleError": LmcycleError}
    for name, obj in expected.items():
        assert getattr(lmcycle, name) is obj, name
    assert set(expected) <= set(lmcycle.__all__) and set(expected) <= set(dir(lmcycle))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        lmcycle.load_modle  # noqa: B018


def test_the_public_face_works_end_to_end_on_text():
    score = lmcycle.rouge(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert isinstance(score, lmcycle.Score) and score.values["rougeL"] == pytest.approx(100.0)
    assert issubclass(lmcycle.LmcycleError, Exception)


def test_importing_the_package_imports_no_torch():
    code = "import sys, lmcycle; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
