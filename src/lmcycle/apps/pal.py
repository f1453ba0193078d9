"""PAL, program-aided language models (Gao et al., 2023): the model writes a Python ``solution()``, the sandbox
runs it, and its return value is the answer — the model reasons, the interpreter does the arithmetic.

The prompt shows worked problems as programs (:data:`PAL_EXEMPLARS`, in the paper's style: one variable per
quantity, the question as the docstring) and ends where the model writes the next program. :func:`extract_program`
takes the code out of what the model wrote (a fenced block, or from ``def solution`` on); the code then runs
only in :mod:`lmcycle.apps.sandbox` (separate process, AST pre-filter, limits) — never in this process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmcycle.apps.sandbox import SandboxConfig, SandboxResult, run_solution
from lmcycle.models.generate import DecodingConfig

PAL_EXEMPLARS = [
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     '''def solution():
    """Olivia has $23. She bought five bagels for $3 each. How much money does she have left?"""
    money_initial = 23
    bagels = 5
    bagel_cost = 3
    money_spent = bagels * bagel_cost
    money_left = money_initial - money_spent
    return money_left'''),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     '''def solution():
    """Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?"""
    golf_balls_initial = 58
    golf_balls_lost_tuesday = 23
    golf_balls_lost_wednesday = 2
    golf_balls_left = golf_balls_initial - golf_balls_lost_tuesday - golf_balls_lost_wednesday
    return golf_balls_left'''),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     '''def solution():
    """There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?"""
    computers_initial = 9
    computers_per_day = 5
    num_days = 4  # 4 days between monday and thursday
    computers_added = computers_per_day * num_days
    computers_total = computers_initial + computers_added
    return computers_total'''),
]

STOP = ["\nQ:", "\n\n\n\n"]
_FENCED = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def pal_prompt(question: str, exemplars: list[tuple[str, str]] = PAL_EXEMPLARS) -> str:
    """Worked problems as programs, then ``question`` and the start of its program's heading."""
    shots = "".join(f"Q: {q}\n\n# solution in Python:\n\n{code}\n\n\n\n" for q, code in exemplars)
    return f"{shots}Q: {question}\n\n# solution in Python:\n\n"


def extract_program(text: str) -> str | None:
    """The program in a model's output: a fenced code block if there is one, else everything from
    ``def solution`` on (up to a next ``Q:``); None when it holds no ``solution`` function."""
    fenced = _FENCED.search(text)
    code = fenced.group(1) if fenced else text
    start = code.find("def solution")
    if start < 0:
        return None
    code = code[start:].split("\nQ:", 1)[0]  # a model that goes on with the next question
    return code.rstrip() + "\n"


@dataclass(frozen=True)
class PalAnswer:
    answer: str | None  # the solution's return value as text (numbers without a trailing .0), None on failure
    program: str | None
    result: SandboxResult | None
    completion: str


def format_value(value) -> str | None:
    """A returned value as an answer string: integral floats without ``.0``, other floats to 6 decimals."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):  # 6 decimals: float noise such as 0.1 + 0.2 does not change the answer
        return f"{round(value, 6):f}".rstrip("0").rstrip(".")
    return str(value)


def answer_with_program(llm, question: str, cfg: DecodingConfig | None = None,
                        sandbox: SandboxConfig | None = None) -> PalAnswer:
    """Ask ``llm`` for a program, run it in the sandbox, return its value (or why there is none)."""
    cfg = (cfg or DecodingConfig(max_new_tokens=256)).model_copy(update={"stop": STOP})
    return run_program(llm.complete([pal_prompt(question)], cfg)[0], sandbox)


def run_program(completion: str, sandbox: SandboxConfig | None = None) -> PalAnswer:
    """Take the program out of a model's ``completion`` and run it in the sandbox."""
    program = extract_program(completion)
    if program is None:
        return PalAnswer(None, None, None, completion)
    result = run_solution(program, sandbox or SandboxConfig())
    return PalAnswer(format_value(result.value) if result.ok else None, program, result, completion)
