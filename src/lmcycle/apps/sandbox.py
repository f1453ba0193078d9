"""Running model-written Python (PAL programs, a ReAct "python" tool) without trusting it.

The security boundary is a separate, locked-down process; no in-process "restricted exec" has held (LangChain
PALChain, smolagents' local executor and LlamaIndex's safe_eval were all escaped, see the lmcycle design notes):

1. :func:`check_program`, an AST pre-filter, rejects the usual escape material (names or attributes starting with
   ``_``, frame/code attributes, ``getattr``/``eval``/``open``/``type``/..., ``.format``, ``attrgetter``,
   decorators, ``global``, imports outside a small allow-list). It only catches mistakes and cheap attacks early,
   with a line number; it is not the boundary.
2. The program runs in ``python -I -S`` with an empty environment, in a fresh working directory removed
   afterwards, in its own session; the parent kills the whole process group with SIGKILL at the wall-clock limit.
   A trusted bootstrap (``_BOOTSTRAP``, which the child runs before any model code) sets rlimits (CPU, address
   space, open files, file size, processes, no core dumps), pre-imports the allowed modules, drops root to
   ``nobody`` (65534, so that RLIMIT_NPROC and file permissions apply), and where the kernel allows applies
   Landlock (file contents: only the working directory; TCP: nothing; signals: own domain) and a seccomp
   filter (x86-64: no fork/clone/exec/socket/ptrace/unshare/mount/chroot/name_to_handle_at ...). As root the
   child first chroots into its working directory, so no host path exists for it, not even for ``stat``
   (Landlock does not cover metadata). Where ``unshare`` works the child also gets empty network and IPC
   namespaces and, as root, a mount namespace with a size-capped tmpfs as its working directory (a disk quota).
3. In-process, the bootstrap also removes fork/exec/kill functions and refuses imports outside the allow-list:
   defence in depth only (objects the program can reach undo it); the kernel layers are what hold. The
   bootstrap runs inside a function, so none of its objects (the real import, the result file) is a global of
   ``__main__``; the pre-filter bans the attribute names under which allowed modules hand out other modules
   (``statistics.sys``, ``re.enum``), also in ``from m import x`` and ``case C(x=...)`` patterns.

:func:`isolation_report` says which layers are active on this host, as measured by a probe child; tests skip,
rather than pretend, where a layer is missing. Not provided: a PID namespace (other processes are visible in
``/proc`` only without Landlock) and any limit on the child's kernel-side memory beyond RLIMIT_AS.

Results come back as JSON in a file the parent opened (never pickle); anything there that does not decode to a
well-formed report (a program that got hold of the descriptor can write anything) is a ``crashed`` result,
never an exception. The layers come on a second descriptor that the bootstrap closes before model code runs.
``solution()``'s value is converted to JSON: ``bool``/``int``/``float``/``str``/``None`` as is (NaN/inf as
JSON's NaN/Infinity), tuples/lists/sets as lists, dict keys as strings, ``Fraction`` as ``float``, ``Decimal``
as ``str`` (exact); anything else is an error of kind ``value``; a value over ``max_output_bytes`` as JSON is an
``output_limit`` error.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import math
import operator
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from lmcycle.config import Config
from lmcycle.errors import LmcycleError

# Small on purpose: pure computation only. `string` is left out (string.Formatter walks attributes), and so is
# anything touching files, processes, the network or the interpreter (os, sys, io, ctypes, importlib, ...).
DEFAULT_IMPORTS = ("math", "statistics", "fractions", "decimal", "itertools", "re", "datetime", "functools",
                   "collections", "operator", "random", "cmath")
# What allowed modules import only when a function of theirs first runs (Counter.most_common -> heapq,
# datetime.strptime -> _strptime). The bootstrap loads them up front (inside the empty root no file can be read
# later) and the import guard lets those calls through; the pre-filter still refuses them in a program's own imports.
IMPLIED_IMPORTS = {"collections": ("heapq",), "datetime": ("_strptime",)}

BANNED_NAMES = frozenset({
    "getattr", "setattr", "delattr", "hasattr", "vars", "globals", "locals", "dir", "eval", "exec", "compile",
    "open", "input", "breakpoint", "help", "exit", "quit", "memoryview", "type", "object", "super",
    "classmethod", "staticmethod", "property",
})
# Attributes that lead from an ordinary object to frames, code, globals or the class graph without an underscore.
BANNED_ATTRIBUTES = frozenset({
    "format", "format_map", "vformat", "mro", "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code",
    "cr_await", "ag_frame", "ag_code", "ag_await", "f_back", "f_globals", "f_locals", "f_builtins", "f_code",
    "tb_frame", "tb_next", "co_code", "co_consts", "co_names", "func_globals", "func_code", "attrgetter",
    "methodcaller",
})
# Modules that hand out the interpreter or the OS, banned as attribute names too (``statistics.sys``): a module an
# allowed one happens to import is as good as an import of it. _module_handles adds what the allowed modules hold.
INTERPRETER_MODULES = frozenset({"sys", "os", "posix", "builtins", "importlib", "gc", "io", "types", "inspect",
                                 "ctypes", "subprocess", "socket", "signal", "threading", "marshal"})
ERROR_KINDS = frozenset({"syntax", "violation", "timeout", "memory", "runtime", "output_limit", "value", "no_solution",
                         "crashed"})
NOBODY = 65534


class SandboxViolation(LmcycleError):
    """A program the pre-filter refuses (or cannot parse: ``kind == "syntax"``), with its line."""

    def __init__(self, message: str, *, line: int | None = None, kind: str = "violation"):
        self.kind = kind
        super().__init__(message, line=line)


class SandboxConfig(Config):
    """Limits of one execution.

    ``timeout_s`` is wall clock (parent, SIGKILL to the group), ``cpu_s`` RLIMIT_CPU, ``memory_mb`` RLIMIT_AS,
    ``max_output_bytes`` caps stdout, stderr and the JSON value, ``max_file_bytes`` one file (RLIMIT_FSIZE),
    ``max_disk_mb`` all files (only where a private tmpfs can be mounted, see :func:`isolation_report`).
    ``ast_filter=False`` skips the pre-filter (tests of the process layer alone). ``allow_unsafe_exec`` must be
    set for ``run_solution(..., in_process=True)``, which is plain ``exec`` with no protection at all."""

    type: Literal["sandbox"] = "sandbox"
    name: str | None = None
    timeout_s: float = Field(5.0, gt=0, le=600)
    cpu_s: int = Field(5, ge=1, le=600)
    memory_mb: int = Field(512, ge=64, le=65536)
    max_output_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_file_bytes: int = Field(8 * 1024 * 1024, ge=0, le=1024 * 1024 * 1024)
    max_disk_mb: int = Field(64, ge=1, le=65536)  # all files together, where a private tmpfs can be mounted
    max_code_bytes: int = Field(100_000, ge=100, le=10_000_000)
    allowed_imports: list[str] = Field(default_factory=lambda: list(DEFAULT_IMPORTS))
    ast_filter: bool = True
    allow_unsafe_exec: bool = False

    @field_validator("allowed_imports")
    @classmethod
    def _plain_module_names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not all(p.isidentifier() and not p.startswith("_") for p in n.split(".")):
                raise ValueError(f"'{n}' is not a public module name")
        return names


@dataclass(frozen=True)
class SandboxError:
    """Why a run failed: kind is one of syntax, violation, timeout, memory, runtime, output_limit, value,
    no_solution, crashed; ``line`` is the program's line where known."""

    kind: str
    message: str
    line: int | None = None


@dataclass(frozen=True)
class SandboxResult:
    """What one run gave: ``value`` (JSON data, solution mode) and captured output when ``ok``, else ``error``."""

    ok: bool
    value: Any = None
    stdout: str = ""
    stderr: str = ""
    error: SandboxError | None = None
    duration_s: float = 0.0
    pid: int | None = None  # the child's pid (its process group id too), so callers can check it is gone
    layers: dict = field(default_factory=dict)  # what the bootstrap applied, sent before any model code ran


# --------------------------------------------------------------------------------------------- AST pre-filter


def check_program(code: str, allowed_imports: list[str] | tuple[str, ...] = DEFAULT_IMPORTS) -> None:
    """Raise :class:`SandboxViolation` (with the line) if ``code`` uses anything outside the pre-filter's rules."""
    try:
        tree = ast.parse(code, "<program>")
    except SyntaxError as e:
        raise SandboxViolation(f"syntax error: {e.msg}", line=e.lineno, kind="syntax") from None
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes, absurd nesting
        raise SandboxViolation(f"not a program Python can parse: {type(e).__name__}", kind="syntax") from None
    allowed = set(allowed_imports)
    banned = BANNED_ATTRIBUTES | _module_handles(tuple(sorted(allowed)))
    for node in ast.walk(tree):
        line = getattr(node, "lineno", None)
        if getattr(node, "decorator_list", None):
            line = node.decorator_list[0].lineno  # the def's own line comes after its decorators
        problem = _node_problem(node, allowed, banned)
        if problem:
            raise SandboxViolation(problem, line=line)


@functools.lru_cache(maxsize=16)
def _module_handles(allowed: tuple[str, ...]) -> frozenset[str]:
    """Attribute names that lead from an allowed module (or a class in one) to a module outside the allow-list,
    e.g. ``sys`` (statistics, fractions, datetime) or ``enum`` (re's, which holds builtins as ``bltns``), plus
    :data:`INTERPRETER_MODULES`; allowed modules themselves stay reachable. Measured on this interpreter, which
    is the one the child runs (``sys.executable``)."""
    names, seen = set(INTERPRETER_MODULES), set()
    todo = []
    for name in allowed:
        try:
            todo.append(importlib.import_module(name))
        except Exception:  # noqa: BLE001 - the child cannot import it either
            pass
    while todo:
        module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        holders = [vars(module)] + [vars(v) for v in vars(module).values() if isinstance(v, type)]
        for key, value in ((k, v) for holder in holders for k, v in holder.items()):
            if not isinstance(value, types.ModuleType) or key.startswith("_"):
                continue
            if _import_allowed(value.__name__, set(allowed)):
                todo.append(value)
            else:
                names.add(key)
    return frozenset(names - {a.split(".")[0] for a in allowed})


def _node_problem(node: ast.AST, allowed: set[str], banned: frozenset[str]) -> str | None:
    if not isinstance(node, ast.Constant):
        # Every identifier-valued field (Name.id, Attribute.attr, arg, alias, keyword, def/class names, match
        # attributes, ...) is a str or a list of str: one rule covers them all.
        for _field, value in ast.iter_fields(node):
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v.startswith("_"):
                    return f"names starting with '_' are not allowed ({v!r})"
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes) and "__" in str(node.value):
        return "strings containing '__' are not allowed"
    if isinstance(node, ast.Name) and node.id in BANNED_NAMES:
        return f"'{node.id}' is not allowed"
    if isinstance(node, ast.Attribute) and node.attr in banned:
        return f"attribute '.{node.attr}' is not allowed"
    if isinstance(node, ast.MatchClass):  # `case C(gi_frame=f)` reads the attribute too
        for attr in node.kwd_attrs:
            if attr in banned:
                return f"attribute '{attr}=' in a class pattern is not allowed"
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.decorator_list:
        return "decorators are not allowed"
    if isinstance(node, ast.ClassDef) and node.keywords:
        return "class keywords (metaclass=...) are not allowed"
    if isinstance(node, ast.Global | ast.Nonlocal):
        return "'global' and 'nonlocal' are not allowed"
    if isinstance(node, ast.Import):
        for alias in node.names:
            if not _import_allowed(alias.name, allowed):
                return f"import of '{alias.name}' is not allowed (allowed: {', '.join(sorted(allowed))})"
    if isinstance(node, ast.ImportFrom):
        if node.level or not node.module or not _import_allowed(node.module, allowed):
            return f"import from '{node.module}' is not allowed (allowed: {', '.join(sorted(allowed))})"
        for alias in node.names:
            if alias.name in BANNED_NAMES | banned:
                return f"importing '{alias.name}' is not allowed"
    return None


def _import_allowed(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


# --------------------------------------------------------------------------------------------- calculator

_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
            ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_MAX_DIGITS = 1000  # of any intermediate integer: no pow or multiplication bombs


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic (numbers, + - * / // % **, unary +/-, parentheses) without exec; a tool for agents.

    Raises :class:`SandboxViolation` for anything else, for results over ~1000 digits and for math errors."""
    if len(expression) > 2000:
        raise SandboxViolation("expression too long (2000 characters at most)")
    try:
        tree = ast.parse(expression.strip(), "<expression>", mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise SandboxViolation(f"not an arithmetic expression: {getattr(e, 'msg', type(e).__name__)}") from None
    try:
        return _calc(tree.body)
    except (ZeroDivisionError, OverflowError, ValueError) as e:
        raise SandboxViolation(f"math error: {e}") from None
    except RecursionError:
        raise SandboxViolation("expression nested too deeply") from None


def _calc(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        v = _calc(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        a, b = _calc(node.left), _calc(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(a, b)
        if isinstance(node.op, ast.Mult) and isinstance(a, int) and isinstance(b, int):
            if _digits(a) + _digits(b) > _MAX_DIGITS:
                raise SandboxViolation("result too large")
        return _BIN_OPS[type(node.op)](a, b)
    raise SandboxViolation(f"'{ast.unparse(node)}' is not plain arithmetic")


def _digits(x: int) -> int:
    return max(1, math.ceil(abs(x).bit_length() * 0.30103))


def _check_power(base: int | float, exp: int | float) -> None:
    if abs(exp) > 10_000:
        raise SandboxViolation("exponent too large")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and _digits(base) * exp > _MAX_DIGITS:
        raise SandboxViolation("result too large")


# --------------------------------------------------------------------------------------------- the child

# Read by `python -I -S -c` before any model code. Runs as root (when the parent is root) until the privilege drop.
_BOOTSTRAP = r'''
def bootstrap():
    import sys, json, posix, resource, builtins
    # Nothing of ours stays in __main__'s globals: the program could reach them through sys.modules["__main__"]
    # (the real import, the result file, the layers). What the program needs later lives in this frame only.
    for name in [n for n in globals() if not n.startswith("__")]:
        del globals()[name]
    job = json.loads(sys.stdin.read())
    layers = {}
    # unicodedata: the parser imports it to normalise non-ASCII identifiers, and later no file can be read.
    for name in [*job["imports"], *job["implied"], "unicodedata"]:
        try:
            __import__(name)
        except Exception:
            pass
    import ctypes, fractions, decimal
    lim = job["limits"]
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, lim["cpu"]), (resource.RLIMIT_AS, lim["as"]),
                       (resource.RLIMIT_FSIZE, lim["fsize"]), (resource.RLIMIT_NOFILE, lim["nofile"])):
        resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))
    layers["rlimits"] = True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if job["tmpfs_kb"] and posix.getuid() == 0:
        # We are alone in a fresh mount namespace (unshare -m, private propagation): a size-capped tmpfs over the
        # working directory bounds what the program can write in total (RLIMIT_FSIZE bounds one file only).
        here = posix.getcwd().encode()
        opts = f"size={job['tmpfs_kb']}k,nr_inodes=4096,mode=0700,uid={job['uid']},gid={job['uid']}".encode()
        if libc.mount(b"tmpfs", here, b"tmpfs", 2 | 4 | 8, opts) == 0:  # nosuid, nodev, noexec
            posix.chdir(here)
            layers["disk_quota"] = job["tmpfs_kb"]
    if posix.getuid() == 0:
        # Landlock guards file contents but not metadata (stat, name_to_handle_at work on any path): with the
        # working directory as its root no host path exists for the program at all. Without CAP_SYS_CHROOT
        # (dropped below, and chroot is in the seccomp filter) there is no way back out. Everything the
        # interpreter needs from disk is loaded by now.
        try:
            posix.chroot(".")
            posix.chdir("/")
            layers["empty_root"] = True
        except OSError:  # uid 0 without CAP_SYS_CHROOT (a user namespace): the report then says metadata shows
            pass
        posix.setgroups([])
        posix.setgid(job["uid"])
        posix.setuid(job["uid"])
    layers["uid"] = posix.getuid()
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: required for Landlock and seccomp without privileges

    def landlock():
        abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
        if abi < 1:
            return {}
        fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
        attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        fd = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if fd < 0:
            return {}
        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
        here = posix.open(".", posix.O_PATH | posix.O_CLOEXEC)
        rule = PathBeneath(fs & ~1, here)  # everything but EXECUTE (bit 0) inside the working directory
        if libc.syscall(445, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            return {}
        if libc.syscall(446, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            return {}
        posix.close(here)
        posix.close(fd)
        return {"landlock_abi": abi, "landlock_filesystem": True, "landlock_network": abi >= 4,
                "landlock_signal_scope": abi >= 6}

    def seccomp():
        if posix.uname().machine != "x86_64":
            return False
        # fork vfork clone clone3 execve execveat socket socketpair ptrace unshare setns mount umount2 pivot_root
        # chroot bpf userfaultfd perf_event_open keyctl add_key request_key io_uring_setup process_vm_readv/writev
        # kexec_load init_module finit_module name_to_handle_at open_by_handle_at
        deny = [57, 58, 56, 435, 59, 322, 41, 53, 101, 272, 308, 165, 166, 155, 161, 321, 323, 298, 250, 248, 249,
                425, 310, 311, 246, 175, 313, 303, 304]
        class Insn(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                        ("k", ctypes.c_uint32)]
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
        n = len(deny)
        ERRNO, ALLOW, KILL = 0x00050001, 0x7FFF0000, 0x80000000
        code = [(0x20, 0, 0, 4), (0x15, 1, 0, 0xC000003E), (0x06, 0, 0, KILL), (0x20, 0, 0, 0),
                (0x35, n + 1, 0, 0x40000000)]  # x32 syscalls: deny
        for i, nr in enumerate(deny):
            code.append((0x15, n - i, 0, nr))
        code += [(0x06, 0, 0, ALLOW), (0x06, 0, 0, ERRNO)]
        insns = (Insn * len(code))(*[Insn(*c) for c in code])
        prog = Prog(len(code), insns)
        return libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0

    layers.update(landlock())
    layers["seccomp"] = seccomp()
    # Defence in depth only (objects reachable from the program can undo it): no fork/exec/kill functions, no
    # imports outside the allow-list, no socket or ctypes modules in sys.modules.
    for mod in [posix] + [m for m in (sys.modules.get("os"),) if m is not None]:
        for name in ("fork", "forkpty", "vfork", "system", "popen", "kill", "killpg", "execv", "execve", "execvp",
                     "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "posix_spawn",
                     "posix_spawnp", "setuid", "setgid", "setsid", "putenv", "unsetenv"):
            if hasattr(mod, name):
                delattr(mod, name)
    for name in list(sys.modules):
        if name.split(".")[0] in ("ctypes", "_ctypes", "socket", "_socket", "subprocess", "platform", "resource"):
            del sys.modules[name]
    del ctypes, libc, resource, landlock, seccomp
    try:
        program = compile(job["code"], "<program>", "exec")  # before the guard: parsing may import unicodedata
    except BaseException as e:  # raised below, where the program's own errors are reported
        program = e
    allowed = (*job["imports"], *job["implied"])
    real_import = builtins.__import__
    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or not any(name == a or name.startswith(a + ".") for a in allowed):
            raise ImportError(f"import of '{name}' is not allowed in the sandbox")
        return real_import(name, globals, locals, fromlist, level)
    builtins.__import__ = guarded_import
    layers["import_guard"] = True
    # The layers go out, and their descriptor is closed, before any model code runs: a program that gets hold
    # of a descriptor can forge its result, but not what the bootstrap applied.
    with open(job["layers_fd"], "w") as f:
        f.write(json.dumps(layers))
    out = open(job["result_fd"], "w")

    def to_json(v, depth=0):
        if depth > 50:
            raise ValueError("value nested too deeply")
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, fractions.Fraction):
            return float(v)
        if isinstance(v, decimal.Decimal):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [to_json(x, depth + 1) for x in v]
        if isinstance(v, (set, frozenset)):
            return sorted((to_json(x, depth + 1) for x in v), key=repr)
        if isinstance(v, dict):
            return {str(k): to_json(x, depth + 1) for k, x in v.items()}
        raise ValueError(f"solution() returned a {type(v).__name__}, which is not JSON data")

    def program_line(tb):
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<program>":
                line = tb.tb_lineno
            tb = tb.tb_next
        return line

    report = {}
    try:
        if isinstance(program, BaseException):
            raise program
        ns = {"__name__": "__sandbox__", "__builtins__": builtins}
        exec(program, ns)
        if job["mode"] == "solution":
            fn = ns.get("solution")
            if not callable(fn):
                report["error"] = {"kind": "no_solution", "message": "the program defines no solution() function"}
            else:
                value = fn()
                try:
                    report["value"] = to_json(value)
                    size = len(json.dumps(report["value"]))
                except (ValueError, TypeError, OverflowError, RecursionError) as e:
                    report.pop("value", None)
                    report["error"] = {"kind": "value", "message": str(e)[:500]}
                else:
                    if size > job["result_cap"]:
                        del report["value"]
                        report["error"] = {"kind": "output_limit",
                                           "message": f"solution()'s value is over {job['result_cap']} bytes as JSON"}
    except MemoryError:
        report["error"] = {"kind": "memory", "message": "out of memory (address-space limit)"}
    except BaseException as e:
        report["error"] = {"kind": "runtime", "message": f"{type(e).__name__}: {e}"[:2000],
                           "line": program_line(e.__traceback__)}
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    out.write(json.dumps(report))
    out.flush()

bootstrap()
'''


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """``unshare -n -i -m`` (network, IPC, mount namespaces) when the tool exists and the kernel lets us use it
    (root, or unprivileged user namespaces -- then without the mount namespace's tmpfs, which needs root)."""
    tool = shutil.which("unshare")
    if tool is None:
        return ()
    for prefix in ((tool, "-n", "-i", "-m"), (tool, "-n", "-i")):
        try:
            if subprocess.run([*prefix, "true"], env={}, capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


def _run_child(code: str, mode: str, cfg: SandboxConfig) -> SandboxResult:
    start = time.perf_counter()
    root = os.geteuid() == 0
    base = tempfile.mkdtemp(prefix="lmcycle-sandbox-")  # 0700, ours; the child only sees work/
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    if root:
        os.chown(work, NOBODY, NOBODY)
    prefix = _unshare_prefix()
    implied = [m for a in cfg.allowed_imports for m in IMPLIED_IMPORTS.get(a, ())]
    job = {"code": code, "mode": mode, "imports": list(cfg.allowed_imports), "implied": implied, "uid": NOBODY,
           "tmpfs_kb": cfg.max_disk_mb * 1024 if root and "-m" in prefix else 0, "result_cap": cfg.max_output_bytes,
           "limits": {"cpu": cfg.cpu_s, "as": cfg.memory_mb * 1024 * 1024, "nofile": 32,
                      "fsize": max(cfg.max_file_bytes, cfg.max_output_bytes + 1, 1024 * 1024)}}
    cmd = [*prefix, sys.executable, "-I", "-S", "-c", _BOOTSTRAP]
    proc = None
    timed_out = False
    try:
        with (open(os.path.join(base, "stdout"), "w+b") as out, open(os.path.join(base, "stderr"), "w+b") as err,
              open(os.path.join(base, "result"), "w+b") as res, open(os.path.join(base, "layers"), "w+b") as lay):
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    pass_fds=(res.fileno(), lay.fileno()), cwd=work, env={},
                                    start_new_session=True, close_fds=True)
            # pass_fds keeps the descriptors' numbers; the bootstrap learns them from the job on stdin (which it
            # reads whole before anything else, so this write cannot block on a stuck child).
            payload = json.dumps({**job, "result_fd": res.fileno(), "layers_fd": lay.fileno()})
            try:
                proc.stdin.write(payload.encode())
                proc.stdin.close()
            except OSError:  # the child died before reading: its exit status tells
                pass
            timed_out = not _exited(proc.pid, cfg.timeout_s - (time.perf_counter() - start))
            _kill_group(proc)
            duration = time.perf_counter() - start
            stdout, over = _read_capped(out, cfg.max_output_bytes)
            stderr, _ = _read_capped(err, cfg.max_output_bytes)
            res.seek(0)
            raw = res.read(cfg.max_output_bytes + 1024 * 1024)
            lay.seek(0)
            layers = _decode(lay.read(1024 * 1024)) or {}
        return _result(proc, raw, layers, stdout, stderr, over, timed_out, duration, cfg)
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
        shutil.rmtree(base, ignore_errors=True)


def _exited(pid: int, timeout: float) -> bool:
    """Wait until the child has exited, without reaping it: while it is an unreaped zombie its pid (= its process
    group id) cannot be reused, so the SIGKILL to the group afterwards cannot hit an unrelated process."""
    deadline = time.monotonic() + max(0.0, timeout)
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        finally:
            os.close(fd)
    while True:  # kernels before 5.3: poll without reaping
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the child's process group (it is its own session leader), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_capped(f, cap: int) -> tuple[str, bool]:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    return f.read(cap).decode("utf-8", "replace"), size > cap


_MAX_REPORT_DEPTH = 64  # the child's to_json stops at 50 levels; anything deeper was not written by it


def _decode(raw: bytes) -> dict | None:
    """A JSON object the child wrote, or None for anything else. A program that reaches the descriptor can write
    whatever it likes there (deep nesting, 5000-digit numbers, ...): no input may make the caller raise."""
    try:
        report = json.loads(raw.decode("utf-8")) if raw else None
    except Exception:  # noqa: BLE001 - RecursionError, ValueError (int digit limit), MemoryError, decode errors
        return None
    return report if isinstance(report, dict) and _depth_within(report, _MAX_REPORT_DEPTH) else None


def _depth_within(value: Any, limit: int) -> bool:
    todo = [(value, 1)]  # iterative: the value's depth must not cost the parent its stack
    while todo:
        v, depth = todo.pop()
        if depth > limit:
            return False
        if isinstance(v, dict | list):
            todo.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _result(proc, raw: bytes, layers: dict, stdout: str, stderr: str, over: bool, timed_out: bool,
            duration: float, cfg: SandboxConfig) -> SandboxResult:
    # layers come from their own descriptor, closed before the program ran; the result channel's are ignored
    common = {"stdout": stdout, "stderr": stderr, "duration_s": duration, "pid": proc.pid, "layers": layers}
    report = _decode(raw)
    if timed_out:
        return SandboxResult(False, error=SandboxError("timeout", f"wall-clock limit of {cfg.timeout_s}s"), **common)
    rc = proc.returncode
    if rc in (-signal.SIGXCPU, -signal.SIGKILL) and report is None:
        return SandboxResult(False, error=SandboxError("timeout", f"CPU limit of {cfg.cpu_s}s"), **common)
    if over:
        return SandboxResult(False, error=SandboxError("output_limit", f"output over {cfg.max_output_bytes} bytes"),
                             **common)
    if report is None:
        return SandboxResult(False, error=SandboxError("crashed", f"the child exited with {rc} and no result"),
                             **common)
    err = report.get("error")
    if isinstance(err, dict):
        line = err.get("line") if isinstance(err.get("line"), int) else None
        kind = err.get("kind") if err.get("kind") in ERROR_KINDS else "crashed"
        return SandboxResult(False, error=SandboxError(kind, str(err.get("message", ""))[:2000], line), **common)
    return SandboxResult(True, value=report.get("value"), **common)


# --------------------------------------------------------------------------------------------- public entry points


def run_solution(code: str, cfg: SandboxConfig | None = None, *, in_process: bool = False) -> SandboxResult:
    """Run a PAL program (it defines ``solution()``) and return ``solution()``'s value as JSON data.

    Bad model code never raises: it gives ``ok=False`` and an :class:`SandboxError`. ``in_process=True`` runs
    plain ``exec`` here (no isolation, no timeout) and raises :class:`LmcycleError` unless
    ``cfg.allow_unsafe_exec``."""
    return _run(code, cfg or SandboxConfig(), "solution", in_process)


def run_snippet(code: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run a plain snippet (a ReAct ``python`` tool) in the sandbox; what it printed is ``result.stdout``."""
    return _run(code, cfg or SandboxConfig(), "snippet", False)


def _run(code: str, cfg: SandboxConfig, mode: str, in_process: bool) -> SandboxResult:
    if not isinstance(cfg, SandboxConfig):
        raise LmcycleError("the sandbox needs a SandboxConfig")
    if in_process and not cfg.allow_unsafe_exec:
        raise LmcycleError("in-process exec is not a sandbox: set allow_unsafe_exec: true to use it",
                           field="allow_unsafe_exec")
    start = time.perf_counter()
    if len(code.encode("utf-8", "replace")) > cfg.max_code_bytes:
        return SandboxResult(False, error=SandboxError("violation", f"program over {cfg.max_code_bytes} bytes"))
    if cfg.ast_filter:
        try:
            check_program(code, cfg.allowed_imports)
        except SandboxViolation as e:
            return SandboxResult(False, error=SandboxError(e.kind, e.message, e.line),
                                 duration_s=time.perf_counter() - start)
    if in_process:
        return _run_in_process(code, mode, start)
    return _run_child(code, mode, cfg)


def _run_in_process(code: str, mode: str, start: float) -> SandboxResult:
    ns: dict[str, Any] = {"__name__": "__unsafe__"}
    try:
        exec(compile(code, "<program>", "exec"), ns)  # noqa: S102 - explicit opt-in, see allow_unsafe_exec
        value = ns["solution"]() if mode == "solution" else None
        return SandboxResult(True, value=value, duration_s=time.perf_counter() - start)
    except Exception as e:  # the model's code: report, never raise
        return SandboxResult(False, error=SandboxError("runtime", f"{type(e).__name__}: {e}"),
                             duration_s=time.perf_counter() - start)


_REPORT_LOCK = threading.Lock()
_REPORT: dict[str, bool | str] | None = None


def isolation_report() -> dict[str, bool | str]:
    """Which isolation layers are active on this host, as measured by one probe child (cached)."""
    global _REPORT
    with _REPORT_LOCK:
        if _REPORT is None:
            probe = _run_child("def solution():\n    return 1\n", "solution", SandboxConfig())
            got = probe.layers
            root = os.geteuid() == 0
            _REPORT = {
                "separate_process": True,
                "isolated_interpreter": "python -I -S",
                "empty_env": True,
                "fresh_workdir": True,
                "process_group_kill": True,
                "rlimits": bool(got.get("rlimits")) and "cpu, address space, open files, file size, no core",
                "dropped_privileges": f"uid {got['uid']}" if root and got.get("uid") == NOBODY else False,
                "rlimit_nproc": bool(got.get("uid")) and "0 processes (enforced: not root)",
                "seccomp": bool(got.get("seccomp"))
                and "no fork/clone/exec/socket/ptrace/unshare/mount/chroot/name_to_handle_at",
                "no_fork": " + ".join(x for x, on in (("seccomp", got.get("seccomp")),
                                                       ("rlimit_nproc", bool(got.get("uid"))),
                                                       ("in-process removal (bypassable)", True)) if on),
                "network_namespace": bool(_unshare_prefix()),
                "ipc_namespace": bool(_unshare_prefix()),
                "landlock_filesystem": bool(got.get("landlock_filesystem"))
                and "read/write only inside the working directory",
                "landlock_network": bool(got.get("landlock_network")) and "no TCP bind/connect",
                "landlock_signal_scope": bool(got.get("landlock_signal_scope")),
                "socket_blocked": " + ".join(x for x, on in (("seccomp", got.get("seccomp")),
                                                              ("network_namespace", bool(_unshare_prefix())),
                                                              ("landlock_network", got.get("landlock_network")),
                                                              ("in-process removal (bypassable)", True)) if on),
                "filesystem_read": _filesystem_claim(got),
                "empty_root": bool(got.get("empty_root")) and "chroot into the working directory: no host path "
                "exists for the child, not even for stat()",
                "pid_namespace": False,
                "disk_quota": bool(got.get("disk_quota")) and "private tmpfs over the working directory "
                "(max_disk_mb, 4096 files)",
                "mount_namespace": "-m" in _unshare_prefix(),
                "ast_prefilter": "pre-filter only, not a boundary",
            }
            if probe.error is not None:
                _REPORT["probe_error"] = f"{probe.error.kind}: {probe.error.message}"
        return dict(_REPORT)


def _filesystem_claim(got: dict) -> str:
    # Landlock guards contents (read, write, list) but not metadata: stat() on a host path still answers unless
    # the child's root is its own working directory.
    if got.get("empty_root"):
        where = "working directory only (empty root" + (", landlock)" if got.get("landlock_filesystem") else ")")
        return f"file contents and metadata: {where}"
    if got.get("landlock_filesystem"):
        return "file contents: working directory only (landlock); file metadata (stat) visible on the host"
    return "whatever the child's uid may read on the host (no filesystem isolation)"


def active_layers() -> list[str]:
    """The names of the isolation layers in effect on this host (the ones :func:`isolation_report` shows on)."""
    report = isolation_report()
    return sorted(name for name, value in report.items()
                  if value and name != "probe_error"
                  and not (name == "filesystem_read" and "no filesystem isolation" in str(value)))
