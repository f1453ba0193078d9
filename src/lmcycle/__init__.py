"""lmcycle: a language model through the whole generative-AI lifecycle, one recipe and one report.

The public face, for a notebook or a script (the recipe runner and the CLI use the same functions)::

    import lmcycle
    model, tok = lmcycle.load_model("runs/quickstart-…/sft/model")      # any folder a stage writes
    lmcycle.generate(model, tok, ["Summarize: …"], lmcycle.DecodingConfig(max_new_tokens=40))
    lmcycle.rouge(predictions, [[ref] for ref in references])           # a Score: values + settings
    recipe, stages = lmcycle.load_recipe("recipes/quickstart.yaml")
    lmcycle.run_recipe(recipe, stages)

Each name is imported on first use (PEP 562), so ``import lmcycle`` and ``lmcycle --help`` stay fast.
"""

import importlib as _importlib
import logging as _logging

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "load_model": "lmcycle.artifacts",
    "generate": "lmcycle.models.generate",
    "DecodingConfig": "lmcycle.models.generate",
    "fit": "lmcycle.train.loop",
    "TrainConfig": "lmcycle.train.loop",
    "add_lora": "lmcycle.adapt.lora",
    "LoraConfig": "lmcycle.adapt.lora",
    "load_recipe": "lmcycle.stages.recipe",
    "run_recipe": "lmcycle.stages.recipe",
    "rouge": "lmcycle.evals.rouge",
    "bleu": "lmcycle.evals.bleu",
    "perplexity": "lmcycle.evals.perplexity",
    "Score": "lmcycle.evals.score",
    "write_report": "lmcycle.stages.report",
    "LmcycleError": "lmcycle.errors",
}
# `train` is the subpackage lmcycle.train, which Python binds on this package whenever one of its modules is
# imported, so the training loop is offered as `fit`; the public write_report is the whole page, with the
# sections of every stage kind (report/'s own write_report takes them as an argument).
_RENAMED = {"fit": "train", "write_report": "write_run_report"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lmcycle' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


# transformers imports torchao whenever it is installed; torchao then warns that its CUDA-only kernels
# (mxfp8, cutlass) do not load on this build, and torch's pytree warns about torchao's enum registrations.
# Neither affects anything lmcycle runs, and both would print before every command.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
