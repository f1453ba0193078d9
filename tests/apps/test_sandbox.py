"""The sandbox's contract: values as JSON data, captured output, error kinds and lines, config checks, honesty of
isolation_report, a fresh working directory that is removed, an empty environment, several threads at once."""

import os
import tempfile
import threading
from decimal import Decimal
from fractions import Fraction

import pytest

from lmcycle.apps.sandbox import (
    DEFAULT_IMPORTS,
    SandboxConfig,
    SandboxViolation,
    active_layers,
    calculate,
    check_program,
    isolation_report,
    run_snippet,
    run_solution,
)
from lmcycle.config import validate
from lmcycle.errors import LmcycleError

CFG = SandboxConfig(timeout_s=3)
RAW = SandboxConfig(timeout_s=3, ast_filter=False)
# The real import lives only in the guard's closure (nothing of the bootstrap's is in __main__'s globals).
REAL_IMPORT = ('g = __builtins__.__import__\n'
               'imp = dict(zip(g.__code__.co_freevars, [c.cell_contents for c in g.__closure__]))["real_import"]\n')
POSIX = REAL_IMPORT + 'posix = imp("posix")\n'


@pytest.mark.parametrize(("expr", "expected"), [
    ("48 / 2", 24.0), ("[1, (2, 3)]", [1, [2, 3]]), ("{1: 'a', 'b': None}", {"1": "a", "b": None}),
    ("True", True), ("{3, 1, 2}", [1, 2, 3]), ("fractions.Fraction(1, 4)", 0.25),
    ("decimal.Decimal('0.10')", "0.10"), ("math.factorial(25)", 15511210043330985984000000),
])
def test_values_come_back_as_json_data(expr, expected):
    code = f"import math, fractions, decimal\ndef solution():\n    return {expr}\n"
    r = run_solution(code, CFG)
    assert r.ok and r.error is None and r.value == expected
    assert r.value == _json_like(eval(expr, {"math": __import__("math"), "fractions": __import__("fractions"),
                                             "decimal": __import__("decimal")}))


def _json_like(v):
    if isinstance(v, Fraction):
        return float(v)
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, list | tuple):
        return [_json_like(x) for x in v]
    if isinstance(v, set):
        return sorted(v)
    if isinstance(v, dict):
        return {str(k): _json_like(x) for k, x in v.items()}
    return v


def test_stdout_is_captured_and_value_returned():
    r = run_solution("def solution():\n    print('step', 1)\n    return 7\n", CFG)
    assert r.ok and r.value == 7 and r.stdout == "step 1\n"


def test_non_ascii_identifiers_run_with_the_defaults():
    r = run_solution("π = 3.14\ndef solution():\n    größe = 2\n    return π * größe\n", CFG)
    assert r.ok and r.value == 6.28
    s = run_snippet("ｘ = 5\nprint(x + 1)\n", CFG)  # NFKC: the fullwidth ｘ is the same name as x
    assert s.ok and s.stdout == "6\n"


def test_functions_of_allowed_modules_that_import_lazily_work_with_the_defaults():
    # Counter.most_common(n) imports heapq and datetime.strptime imports _strptime the first time they run.
    program = ("import collections, datetime\ndef solution():\n"
               "    top = collections.Counter('abracadabra').most_common(2)\n"
               "    return [top, datetime.datetime.strptime('2024-03-05', '%Y-%m-%d').day]\n")
    r = run_solution(program, CFG)
    assert r.ok, r.error
    assert r.value == [[["a", 5], ["b", 2]], 5]
    refused = run_solution("import heapq\ndef solution():\n    return 1\n", CFG)
    assert refused.error.kind == "violation"  # the program itself still may not import them


def test_snippet_mode_returns_printed_output():
    r = run_snippet("import statistics\nprint(statistics.mean([1, 2, 3, 6]))\n", CFG)
    assert r.ok and r.stdout.strip() == "3" and r.value is None


def test_non_json_value_is_an_error():
    r = run_solution("def solution():\n    return print\n", CFG)
    assert not r.ok and r.error.kind == "value" and "builtin_function_or_method" in r.error.message


def test_missing_solution_and_runtime_error_line():
    assert run_solution("x = 1\n", CFG).error.kind == "no_solution"
    r = run_solution("def solution():\n    a = 1\n    return a / 0\n", CFG)
    assert not r.ok and r.error.kind == "runtime" and r.error.line == 3 and "ZeroDivisionError" in r.error.message


def test_syntax_error_kind_and_line():
    r = run_solution("def solution():\n    return (1 +\n\n", CFG)
    assert not r.ok and r.error.kind == "syntax" and r.error.line is not None and r.pid is None


@pytest.mark.parametrize(("code", "line"), [
    ("x = 1\ny = x.__class__\n", 2), ("import math\nimport os\n", 2), ("a = 1\nb = 2\nc = getattr(a, 'b')\n", 3),
    ("@print\ndef f():\n    pass\n", 1), ("def f():\n    global g\n", 2), ("s = '{}'.format(1)\n", 1),
    ("from statistics import _sum\n", 1), ("def f(_x):\n    return 1\n", 1),
])
def test_check_program_names_the_line(code, line):
    with pytest.raises(SandboxViolation) as e:
        check_program(code)
    assert e.value.line == line and e.value.kind == "violation" and isinstance(e.value, LmcycleError)


def test_check_program_accepts_ordinary_pal_code():
    code = ("import math\nfrom fractions import Fraction\n\nclass Box:\n    size = 2\n\n"
            "def solution():\n    items = [Fraction(1, 3) * n for n in range(4)]\n    total = sum(items)\n"
            "    label = f'{float(total):.2f}'\n    return math.floor(float(total) * Box.size), label\n")
    check_program(code)
    assert run_solution(code, CFG).value == [4, "2.00"]


def test_allowed_imports_is_configurable():
    code = "import math\ndef solution():\n    return math.pi > 3\n"
    assert run_solution(code, CFG).ok
    r = run_solution(code, SandboxConfig(allowed_imports=["statistics"]))
    assert r.error.kind == "violation" and "math" in r.error.message


def test_import_guard_in_child_follows_allowed_imports():
    r = run_solution("def solution():\n    import json\n    return 1\n", RAW)
    assert not r.ok and "not allowed" in r.error.message


def test_bad_config_raises_lmcycle_error():
    with pytest.raises(LmcycleError, match="timeout_s"):
        validate(SandboxConfig, {"timeout_s": -1})
    with pytest.raises(LmcycleError, match="allowed_imports"):
        validate(SandboxConfig, {"allowed_imports": ["_socket"]})
    with pytest.raises(LmcycleError, match="unknown key"):
        validate(SandboxConfig, {"timeout": 1})


def test_unsafe_in_process_needs_opt_in():
    code = "def solution():\n    return 6 * 7\n"
    with pytest.raises(LmcycleError, match="allow_unsafe_exec"):
        run_solution(code, CFG, in_process=True)
    r = run_solution(code, SandboxConfig(allow_unsafe_exec=True), in_process=True)
    assert r.ok and r.value == 42 and r.pid is None


def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("LMCYCLE_SECRET", "hunter2")
    r = run_solution(POSIX + "def solution():\n    return sorted(k.decode() for k in posix.environ)\n", RAW)
    # LC_CTYPE is set by the child interpreter itself (PEP 538 locale coercion), not passed by us
    assert r.ok and set(r.value) <= {"LC_CTYPE"} and "LMCYCLE_SECRET" not in r.value


def test_fresh_working_directory_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the sandbox's directories go here, nowhere else
    code = POSIX + ("def solution():\n    before = posix.listdir('.')\n    with open('note.txt', 'w') as f:\n"
                    "        f.write('x')\n    return [before, posix.listdir('.')]\n")
    first, second = run_solution(code, RAW), run_solution(code, RAW)
    assert first.ok and second.ok and first.value == [[], ["note.txt"]] == second.value
    assert list(tmp_path.iterdir()) == []


def test_isolation_report_matches_what_the_child_applied():
    report = isolation_report()
    child = run_solution("def solution():\n    return 0\n", CFG).layers
    assert report["separate_process"] is True and report["empty_env"] is True
    assert bool(report["seccomp"]) == bool(child.get("seccomp"))
    assert bool(report["landlock_filesystem"]) == bool(child.get("landlock_filesystem"))
    assert bool(report["disk_quota"]) == bool(child.get("disk_quota"))
    assert bool(report["empty_root"]) == bool(child.get("empty_root")) == (os.geteuid() == 0)
    assert report["pid_namespace"] is False  # not used: claiming it would be a lie
    if os.geteuid() == 0:
        # as root the child must have dropped to nobody, or RLIMIT_NPROC would not hold
        assert child["uid"] == 65534 and report["dropped_privileges"] == "uid 65534"
    if not report["landlock_filesystem"] and not report["empty_root"]:
        assert "no filesystem isolation" in report["filesystem_read"]
    active = active_layers()
    assert {"separate_process", "empty_env"} <= set(active) and "pid_namespace" not in active
    assert ("landlock_filesystem" in active) == bool(report["landlock_filesystem"])
    assert ("filesystem_read" in active) == bool(report["landlock_filesystem"] or report["empty_root"])


def test_child_runs_as_nobody_when_parent_is_root():
    if os.geteuid() != 0:
        pytest.skip(reason="only meaningful when the tests run as root")
    r = run_solution(POSIX + "def solution():\n    return [posix.getuid(), posix.geteuid(), posix.getgid()]\n", RAW)
    assert r.ok and r.value == [65534, 65534, 65534]


def test_several_threads_at_once():
    results: dict[int, object] = {}

    def go(i):
        results[i] = run_solution(f"def solution():\n    print({i})\n    return {i} * {i}\n", CFG)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i].ok and results[i].value == i * i and results[i].stdout == f"{i}\n" for i in range(6))
    assert len({results[i].pid for i in range(6)}) == 6


@pytest.mark.parametrize(("expr", "expected"), [("48/2", 24.0), ("2 ** 10 - 3 * (4 + 1)", 1009), ("-7 // 2", -4),
                                                ("10 % 4 + 0.5", 2.5), ("+3", 3)])
def test_calculator_arithmetic(expr, expected):
    assert calculate(expr) == expected


def test_calculator_reports_math_errors():
    with pytest.raises(SandboxViolation, match="math error"):
        calculate("1 / 0")


def test_default_imports_are_small_and_pure():
    assert not {"os", "sys", "io", "ctypes", "importlib", "subprocess", "socket", "string", "builtins"} & set(
        DEFAULT_IMPORTS)


@pytest.mark.parametrize("code", ["x = 1\0\n", "x = " + "-" * 50_000 + "1\n", "(" * 5000 + ")" * 5000 + "\n"],
                         ids=["nul_byte", "deep_unary", "deep_parens"])
def test_unparsable_programs_are_results_not_exceptions(code):
    r = run_solution(code, CFG)
    assert not r.ok and r.error.kind == "syntax" and r.pid is None


@pytest.mark.parametrize("expr", ["-" * 1999 + "1", "(" * 900 + "1" + ")" * 900, "1\0"])
def test_calculator_refuses_deep_or_binary_input(expr):
    with pytest.raises(SandboxViolation):
        calculate(expr)


def test_oversized_or_unencodable_values_are_errors():
    cfg = SandboxConfig(max_output_bytes=4096)
    big = run_solution("def solution():\n    return 'a' * 100000\n", cfg)
    assert not big.ok and big.error.kind == "output_limit" and big.value is None
    huge = run_solution("def solution():\n    return 10 ** 5000\n", cfg)
    assert not huge.ok and huge.error.kind == "value"
    inf = run_solution("import fractions\ndef solution():\n    return fractions.Fraction(10 ** 400, 3)\n", cfg)
    assert not inf.ok and inf.error.kind == "value"
