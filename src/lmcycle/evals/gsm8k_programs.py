"""GSM8K worked solutions as PAL programs: each calculation in the text becomes a statement of ``solution()``.

:func:`program_from_solution` reads the calculations of a solution in text order: the calculator annotations
``<<48/2=24>>``, and the equations the annotators left unannotated, read in two ways -- letters as units
(``99 + 5 = $104``, ``60g * 4/5 = 240g/5``, chains such as ``X = 200/20 = 10``) and, failing that, letters as
unknowns of a linear equation (``2/3 * x = 12``, ``3r + 5(r + 2) = 42``), whose root is computed by the program.
A plain equation counts only if both sides evaluate to the same number (or, for an unknown, if it is linear with
one root), which is what tells arithmetic from prose; ``x = 18`` alone is not a calculation. Each calculation is
assigned to ``v<i>``; a number literal equal to the computed value of an earlier variable is replaced by that
variable (most recent first), so the program is a data-flow chain, and an annotation that only restates a
result (``<<15=15>>``) becomes a reference to the calculation before it. The program returns the last variable.
The ``#### answer`` line is never read, so the gold answer is not in the program; whether the program reaches
it is what :func:`evaluate_gsm8k_programs` measures, in the sandbox (495 of the first 500 test problems; the
misses are an ambiguous mixed number, a typo, a rounded percentage, a unit change and a subtraction written
around prose).
"""

from __future__ import annotations

import json
import re
import statistics
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tqdm import tqdm

from lmcycle.apps.sandbox import SandboxConfig, SandboxViolation, calculate, run_solution
from lmcycle.errors import LmcycleError
from lmcycle.evals.gsm8k import extract_answer

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_NUMBER = re.compile(r"(?<![\w.])\d*\.?\d+(?![\w.])")
_OPERATOR = re.compile(r"[\d)]\s*[+\-*/]")
_EXPLAINED = re.compile(r"=?\s*\$?\s*<<([^<>=]*)[^<>]*>>\s*\$?[\d.,]*")
_TOLERANCE = 1e-6


def program_from_solution(answer: str) -> str:
    """A Python program whose ``solution()`` recomputes a GSM8K solution's calculations; the last one is returned.

    ``answer`` is the solution text (``####`` line included or not). Raises :class:`LmcycleError` when the text
    holds no calculation that evaluates."""
    steps = _calculations(answer.split("####", 1)[0])
    if not steps:
        raise LmcycleError("the solution holds no calculation that evaluates")
    lines = ["def solution():"]
    if any(unknown for _, unknown in steps):
        lines += ["    def solve(f):", "        # the root of a linear f", "        return -f(0) / (f(1) - f(0))"]
    known: list[tuple[str, float]] = []  # (variable, computed value), most recent last
    for i, (expr, unknown) in enumerate(steps, 1):
        name = f"v{i}"
        if unknown is None:
            value = _value(expr)
            lines.append(f"    {name} = {_substitute(expr, known)}")
        else:
            value = _root(expr, unknown)
            lines.append(f"    {name} = solve(lambda {unknown}: {_substitute(expr, known)})")
        known.append((name, value))
    lines.append(f"    return {known[-1][0]}")
    return "\n".join(lines) + "\n"


def _calculations(text: str) -> list[tuple[str, str | None]]:
    """``(expression, unknown)`` in text order: the annotations and the unannotated equations around them.

    ``unknown`` is None for arithmetic; for a linear equation in one letter (``2/3 * x = 12``) it is the letter
    and the expression is ``(left) - (right)``, whose root is the step's value."""
    found: list[tuple[int, float, tuple[str, str | None]]] = []
    for index, line in enumerate(text.split("\n")):
        for m in _ANNOTATION.finditer(line):
            expr = _normalise(m.group(1))
            # "7.5 / .5 = <<15=15>>15": an annotation without an operator records a result; the calculation is
            # the written one before it (kept in the prose below), and the result refers to it by substitution.
            if _evaluates(expr):
                found.append((index, m.start() / max(1, len(line)), (expr, None)))
        # "16 - 3 - 4 = <<16-3-4=9>>9": the text around an annotation says the same again; blank it out.
        prose = _EXPLAINED.sub(_blank_explained, line)
        # Two readings of the line: letters as units (dropped: "60g * 4/5 = 240g/5") and as unknowns ("3r = 12").
        units = _normalise(_words_to_operators(_normalise(prose), keep_unknowns=False))
        algebra = _implicit_products(_normalise(_words_to_operators(_normalise(prose), keep_unknowns=True)))
        for pos, step in _equations(units, algebra):
            found.append((index, pos / max(1, len(units)), step))
    found.sort(key=lambda f: f[:2])
    return [step for *_, step in found]


def _blank_explained(m: re.Match) -> str:
    if _OPERATOR.search(m.group(1)):
        return " " * len(m.group())
    return re.sub(r"<<[^<>]*>>", lambda a: " " * len(a.group()), m.group())


def _words_to_operators(s: str, keep_unknowns: bool) -> str:
    """"83 plus 91 equals 174" -> "83 + 91 = 174"; other words (units: "7 puppies / 20 puppies") are dropped,
    except, with ``keep_unknowns``, single letters written as algebra."""
    for word, op in (("divided by", "/"), ("plus", "+"), ("minus", "-"), ("times", "*"), ("equals", "=")):
        s = re.sub(rf"\b{word}\b", f" {op} ", s)
    def keep_or_blank(m: re.Match) -> str:
        return m.group() if keep_unknowns and _is_unknown(s, m) else " " * len(m.group())

    return re.sub(r"[A-Za-z][\w'’]*", keep_or_blank, s)


def _is_unknown(s: str, m: re.Match) -> bool:
    """A single letter written as algebra: ``3r``, ``2 * x``, ``x = ``, ``(x/100)``; not an article like "a 5"."""
    if len(m.group()) != 1:
        return False
    before, after = s[: m.start()], s[m.end():]
    if before[-1:].isdigit() or before[-1:] == ")":
        return True
    return bool(re.search(r"[+\-*/(=]\s*$", before) or re.match(r"\s*[+\-*/)=]", after))


def _normalise(s: str) -> str:
    """Written arithmetic as Python: thousands commas, $, %, x/×/÷, dashes, 27(1/3), (1/4)24 and 3 1/2."""
    s = re.sub(r"(?<=\d)[, ](?=\d{3}(?![\d/]))", "", s)  # 1,080 and 12 000
    s = s.replace("$", "").replace("%", "").replace("×", "*").replace("÷", "/")
    s = re.sub(r"[−–—]", "-", s)
    s = re.sub(r"(?<=[\d)])\s*[xX]\s*(?=[\d(.])", " * ", s)
    s = re.sub(r"(?<![\d.])(\d+)\s+(\d+)/(\d+)(?![\d.])", r"(\1+\2/\3)", s)  # mixed numbers
    s = re.sub(r"(?<=\d)\s*\(", " * (", s)
    s = re.sub(r"\)\s*(?=[\d(])", ") * ", s)
    return s


def _implicit_products(s: str) -> str:
    """``3r`` -> ``3 * r``, ``r(`` -> ``r * (``: products with an unknown written without the operator."""
    s = re.sub(r"(?<=[\d)])(?=[A-Za-z]\b)", " * ", s)
    return re.sub(r"(?<=\b[A-Za-z])\s*(?=\()", " * ", s)


def _evaluates(expr: str) -> bool:
    return _value(expr) is not None


def _value(expr: str) -> float | None:
    """``expr``'s value as a float, or None when it is not plain arithmetic (or beyond floats)."""
    try:
        return float(calculate(expr))
    except (SandboxViolation, OverflowError):
        return None


def _equations(units: str, algebra: str) -> list[tuple[int, tuple[str, str | None]]]:
    """``(position, step)`` for each ``=``: arithmetic of equal value on both sides (one with an operator; the
    longest such stretches ending just before and starting just after the ``=``) in the ``units`` reading of the
    line, else a linear equation in one unknown in its ``algebra`` reading."""
    out = []
    parts, algebra_parts = units.split("="), algebra.split("=")
    offset = 0
    for k, (left, right) in enumerate(zip(parts, parts[1:], strict=False)):
        offset += len(left) + 1
        rights = _stretches(right, from_end=False)
        for lhs, lv in _stretches(left, from_end=True):
            match = next((r for r, rv in rights if abs(lv - rv) <= _TOLERANCE * max(1.0, abs(rv))
                          and (_OPERATOR.search(lhs) or _OPERATOR.search(r))), None)
            if match is not None:
                out.append((offset, (lhs if _OPERATOR.search(lhs) else match, None)))
                break
        else:
            linear = _linear(algebra_parts[k], algebra_parts[k + 1])
            if linear is not None:
                out.append((offset, linear))
    return out


def _linear(left: str, right: str) -> tuple[str, str] | None:
    """``("(lhs) - (rhs)", letter)`` for the longest stretches around an ``=`` that make a linear equation in one
    letter with a single root, where the letter's side is more than the bare letter (``x = 18`` is no step)."""
    lefts = _stretches(left, from_end=True, letters=True)
    rights = _stretches(right, from_end=False, letters=True)
    for lhs, _ in lefts:
        for rhs, _ in rights:
            letters = set(re.findall(r"[A-Za-z]", lhs + rhs))
            if len(letters) != 1 or re.fullmatch(r"[A-Za-z]", lhs) or re.fullmatch(r"[A-Za-z]", rhs):
                continue
            expr, letter = f"({lhs}) - ({rhs})", letters.pop()
            try:
                _root(expr, letter)
            except (SandboxViolation, ZeroDivisionError):
                continue
            return expr, letter
    return None


def _root(expr: str, letter: str) -> float:
    """The root of ``expr`` as a function of ``letter``; SandboxViolation unless it is linear with a non-zero slope."""
    f0, f1, f2 = (_value(re.sub(rf"\b{letter}\b", f"({t})", expr)) for t in (0, 1, 2))
    if f0 is None or f1 is None or f2 is None:
        raise SandboxViolation("not arithmetic in the unknown")
    slope = f1 - f0
    if abs(slope) < 1e-12 or abs((f2 - f1) - slope) > _TOLERANCE * max(1.0, abs(slope)):
        raise SandboxViolation("not a linear equation")
    return -f0 / slope


def _stretches(text: str, from_end: bool, letters: bool = False) -> list[tuple[str, float]]:
    """The stretches at the end (or start) of ``text`` that are plain arithmetic, longest first, with values
    (``letters``: also those with single-letter unknowns, valued with each letter set to 1)."""
    text = text.rstrip() if from_end else text.lstrip()
    cuts = range(len(text)) if from_end else range(len(text), 0, -1)
    found = []
    ends = "(.-" + ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if letters else "")
    for cut in cuts:
        piece = (text[cut:] if from_end else text[:cut]).strip().rstrip(".").strip()
        if not piece or not (piece[0].isdigit() or piece[0] in ends):
            continue
        if not (piece[-1].isdigit() or piece[-1] == ")" or (letters and piece[-1].isalpha())):
            continue
        if found and found[-1][0] == piece:
            continue
        value = _value(re.sub(r"\b[A-Za-z]\b", "(1)", piece) if letters else piece)
        if value is not None:
            found.append((piece, value))
    return found


def _substitute(expr: str, known: list[tuple[str, float]]) -> str:
    def ref(m: re.Match) -> str:
        literal = float(m.group())
        for name, value in reversed(known):
            if abs(value - literal) <= 1e-9 * max(1.0, abs(literal)):
                return name
        return m.group()

    return _NUMBER.sub(ref, expr)


def answer_matches(value: object, gold: str | float | int) -> bool:
    """Whether a program's value equals the gold answer numerically (relative tolerance 1e-6; ``$`` and thousands
    commas ignored; ``gold`` may be a whole solution ending in ``#### N``)."""
    want = extract_answer(str(gold).replace("$", ""))
    if want is None or isinstance(value, bool):
        return False
    try:
        got = Decimal(str(value).replace(",", "").replace("$", "").strip())
    except (InvalidOperation, ValueError):
        return False
    if not got.is_finite():
        return False
    return abs(got - want) <= Decimal("1e-6") * max(Decimal(1), abs(want))


def evaluate_gsm8k_programs(path: str | Path, cfg: SandboxConfig | None = None, limit: int | None = None) -> dict:
    """Run the program of every solution in a GSM8K JSON Lines file in the sandbox and compare with ``#### N``.

    Returns ``{"accuracy", "n", "correct", "failures": [{"line", "reason", ...}], "latency_p50_s",
    "latency_p95_s"}`` (latency: sandbox start to result, per program)."""
    path = Path(path)
    if not path.is_file():
        raise LmcycleError("GSM8K file not found", file=path)
    cfg = cfg or SandboxConfig()
    rows = path.read_text(encoding="utf-8").splitlines()[:limit]
    failures, latencies, correct = [], [], 0
    for line_no, raw in enumerate(tqdm(rows, desc="gsm8k programs", leave=False), 1):
        try:
            answer = json.loads(raw)["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LmcycleError("not a GSM8K record with an 'answer'", file=path, line=line_no) from None
        gold = answer.split("####")[-1].strip()
        try:
            program = program_from_solution(answer)
        except LmcycleError as e:
            failures.append({"line": line_no, "reason": "no program", "detail": e.message, "gold": gold})
            continue
        result = run_solution(program, cfg)
        latencies.append(result.duration_s)
        if not result.ok:
            failures.append({"line": line_no, "reason": result.error.kind, "detail": result.error.message,
                             "gold": gold})
        elif not answer_matches(result.value, gold):
            failures.append({"line": line_no, "reason": "wrong value", "value": result.value, "gold": gold})
        else:
            correct += 1
    n = len(rows)
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19 or [float("nan")] * 19
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct, "failures": failures,
            "latency_p50_s": statistics.median(latencies) if latencies else float("nan"), "latency_p95_s": q[18]}
