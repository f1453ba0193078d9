"""The command line, ``lmcycle``: main.py parses and runs recipes, single stages and reports; adapters.py, plan.py,
serve.py, apps.py and label.py each hold a family of commands. Heavy modules load inside the commands
(``lazy``), so ``lmcycle --help`` imports neither torch nor transformers."""

from lmcycle.cli.main import main

__all__ = ["main"]
