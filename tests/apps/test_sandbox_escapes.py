"""Escape attempts against the sandbox: each must be blocked, the harm must not happen, and the result must say so.

Two layers are tested. ``FILTERED`` attacks go through the default config (AST pre-filter + process). ``RAW``
attacks switch the pre-filter off and first give themselves everything in-process code can reach: the real
``__import__``, a fresh ``posix`` module (``_imp.create_builtin``, so the bootstrap's removals are undone) and raw
libc calls through ``_ctypes`` found with ``gc``. What still holds against them is the kernel: seccomp, Landlock,
the dropped uid, rlimits and namespaces -- the real boundary. Each RAW program raises when its attempt fails,
so a blocked attempt shows up as an error in the result.
"""

import os
import signal
import socket
import threading
import uuid
from pathlib import Path

import pytest

from lmcycle.apps.harness import gsm8k_harness
from lmcycle.apps.pal import run_program
from lmcycle.apps.sandbox import (
    SandboxConfig,
    SandboxViolation,
    calculate,
    check_program,
    isolation_report,
    run_snippet,
    run_solution,
)
from lmcycle.data.examples import Example

FAST = SandboxConfig(timeout_s=2, cpu_s=2, memory_mb=256)
RAW = SandboxConfig(timeout_s=2, cpu_s=2, memory_mb=256, ast_filter=False, max_file_bytes=1024 * 1024)
REPO_FILE = str(Path(__file__).resolve())

# Full in-process power: real import, a fresh posix module, libc functions via _ctypes.
GRAB = '''
g = __builtins__.__import__
imp = dict(zip(g.__code__.co_freevars, [c.cell_contents for c in g.__closure__]))["real_import"]
gc = imp("gc")
mods = {m.__name__: m for m in gc.get_objects() if type(m).__name__ == "module"}
machinery = imp("_frozen_importlib")
_i = imp("_imp")
posix = _i.create_builtin(machinery.ModuleSpec("posix", machinery.BuiltinImporter, origin="built-in"))
_i.exec_builtin(posix)
C = mods["_ctypes"]
class Int(C._SimpleCData):
    _type_ = "i"
class Fn(C.CFuncPtr):
    _flags_ = 1 | 8
    _restype_ = Int
class Lib:
    _handle = C.dlopen(None, 2)
def libc(name, *args):
    r = Fn((name, Lib))(*args)
    if r < 0:
        raise OSError(C.get_errno(), name.decode() + " failed")
    return r
posix.write(1, b"armed\\n")
'''


def _target() -> str:
    return f"/tmp/lmcycle-escape-{uuid.uuid4().hex}"


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _no_connection(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _kernel(*layers: str):
    """Skip unless at least one of ``layers`` is active here: the test is about that layer, not a pretence."""
    report = isolation_report()
    if not any(report.get(layer) for layer in layers):
        pytest.skip(reason=f"none of {layers} is active on this host (see isolation_report())")


# ------------------------------------------------------------------ caught by the pre-filter (default config)

FILTERED = {
    "read_etc_passwd": "def solution():\n    return open('/etc/passwd').read()\n",
    "read_repo_file_pathlib": f"import pathlib\ndef solution():\n    return pathlib.Path({REPO_FILE!r}).read_text()\n",
    "import_socket": "import socket\ndef solution():\n    return socket.create_connection(('127.0.0.1', 1))\n",
    "import_subprocess": "import subprocess\ndef solution():\n    return subprocess.run(['id']).returncode\n",
    "os_system": "import os\ndef solution():\n    return os.system('id')\n",
    "os_fork": "import os\ndef solution():\n    return os.fork()\n",
    "pty_spawn": "import pty\ndef solution():\n    return pty.spawn('/bin/sh')\n",
    "ctypes": "import ctypes\ndef solution():\n    return ctypes.CDLL(None).system(b'id')\n",
    "subclasses_walk": "def solution():\n    return ().__class__.__base__.__subclasses__()\n",
    "format_traversal": "def solution():\n    return '{0.__class__}'.format(1)\n",
    "format_without_dunder_literal": "def solution():\n    f = 'x'.format\n    return f\n",
    "format_map": "def solution():\n    return '{a}'.format_map({'a': 1})\n",
    "computed_getattr": "def solution():\n    n = '_' + '_class' + '__'\n    return getattr(1, n)\n",
    "exec_decorator": "@exec\n@str.lower\ndef solution():\n    pass\n",
    "setattr_dunder": "def f():\n    pass\ndef solution():\n    setattr(f, 'x', 1)\n    return 1\n",
    "augassign_dunder": "class A:\n    pass\ndef solution():\n    a = A()\n    a.__dict__ |= {'x': 1}\n    return 1\n",
    "import_builtins": "import builtins\ndef solution():\n    return builtins.open('/etc/passwd').read()\n",
    "builtins_name": "def solution():\n    return __builtins__\n",
    "import_dunder": "def solution():\n    return __import__('os').system('id')\n",
    "sys_modules": "import sys\ndef solution():\n    return list(sys.modules)\n",
    "importlib": "import importlib\ndef solution():\n    return importlib.import_module('os').getcwd()\n",
    "eval_call": "def solution():\n    return eval('1+1')\n",
    "generator_frame_walk": ("def solution():\n    g = (x for x in [1])\n"
                             "    return g.gi_frame.f_back.f_globals\n"),
    "lambda_frame_walk": "def solution():\n    f = lambda: 1\n    return f.func_globals\n",
    "traceback_frame_walk": ("def solution():\n    try:\n        1 / 0\n    except Exception as e:\n"
                             "        return e.with_traceback(None).args, e.tb_frame\n"),
    "type_class_creation": "def solution():\n    return type('X', (), {'y': 1})\n",
    "attrgetter_dunder": "from operator import attrgetter\ndef solution():\n    return attrgetter('mro')(int)\n",
    "fstring_dunder": "def solution():\n    return f'{(1).__class__}'\n",
    "global_statement": "x = 1\ndef solution():\n    global x\n    x = 2\n    return x\n",
    "relative_import": "from . import secrets\ndef solution():\n    return 1\n",
    "vars_globals": "def solution():\n    return vars()\n",
    "metaclass_keyword": "class A(metaclass=int):\n    pass\ndef solution():\n    return 1\n",
    "threads_cpu_burn": ("import threading\ndef solution():\n    for _ in range(8):\n"
                         "        threading.Thread(target=lambda: sum(range(10 ** 12))).start()\n"),
    "env_secret": "import os\ndef solution():\n    return os.environ.get('LMCYCLE_SECRET')\n",
    "signal_ignore": "import signal\ndef solution():\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n",
    "kill_parent": "import os\ndef solution():\n    os.kill(os.getppid(), 9)\n",
}


@pytest.mark.parametrize("code", FILTERED.values(), ids=FILTERED.keys())
def test_prefilter_blocks(code):
    r = run_solution(code, FAST)
    assert not r.ok and r.error.kind == "violation" and r.error.line is not None
    assert r.pid is None  # never reached a process
    assert "root:" not in str(r.value) + r.stdout


def test_prefilter_write_outside_workdir_file_absent():
    target = _target()
    r = run_solution(f"def solution():\n    open({target!r}, 'w').write('x')\n    return 1\n", FAST)
    assert not r.ok and r.error.kind == "violation" and not os.path.exists(target)


# ------------------------------------------------------------------ process layer alone (pre-filter off)


def _raw(body: str, cfg: SandboxConfig = RAW):
    r = run_solution(GRAB + body, cfg)
    assert r.stdout.startswith("armed\n"), r  # the attack ran with full in-process power, not a harness error
    return r


def test_raw_harness_has_full_in_process_power():
    r = _raw("def solution():\n    return [posix.getpid(), libc(b'getpid'), 'fork' in dir(posix)]\n")
    assert r.ok and r.value == [r.pid, r.pid, True]


def test_raw_read_etc_passwd():
    _kernel("landlock_filesystem")
    r = _raw("def solution():\n    fd = posix.open('/etc/passwd', posix.O_RDONLY)\n    return posix.read(fd, 99)\n")
    # Landlock refuses it; with an empty root the path does not even exist for the child
    assert not r.ok and ("Permission denied" in r.error.message or "No such file" in r.error.message)
    assert "root:" not in str(r.value)


def test_raw_read_repo_file():
    _kernel("landlock_filesystem")
    r = _raw(f"def solution():\n    fd = posix.open({REPO_FILE!r}, posix.O_RDONLY)\n    return posix.read(fd, 99)\n")
    assert not r.ok and r.error.kind == "runtime" and r.value is None


def test_raw_list_root_directory():
    _kernel("landlock_filesystem")
    r = _raw("def solution():\n    return posix.listdir('/')\n")
    # Landlock alone refuses the listing; with an empty root '/' is the child's own, empty, working directory
    assert (r.ok, r.value) == ((True, []) if isolation_report().get("empty_root") else (False, None))


@pytest.mark.parametrize("how", ["posix", "libc"])
def test_raw_write_outside_workdir(how):
    target = _target()
    body = (f"def solution():\n    fd = posix.open({target!r}, posix.O_WRONLY | posix.O_CREAT)\n"
            "    return posix.write(fd, b'x')\n" if how == "posix" else
            f"def solution():\n    return libc(b'open', {target.encode()!r}, 65, 420)\n")
    r = _raw(body)
    assert not r.ok and r.error.kind == "runtime"
    assert not os.path.exists(target)


def test_raw_network_connect_to_local_listener(listener):
    _kernel("seccomp", "network_namespace", "landlock_network")
    port = listener.getsockname()[1]
    body = ("def solution():\n    s = libc(b'socket', 2, 1, 0)\n"
            f"    addr = bytes([2, 0, {port >> 8}, {port & 255}, 127, 0, 0, 1]) + bytes(8)\n"
            "    return libc(b'connect', s, addr, 16)\n")
    r = _raw(body)
    assert not r.ok and r.error.kind == "runtime" and "failed" in r.error.message
    assert _no_connection(listener)


def test_raw_fork():
    _kernel("seccomp", "rlimit_nproc")
    r = _raw("def solution():\n    return posix.fork()\n")
    assert not r.ok and r.error.kind == "runtime" and r.value is None


def test_raw_fork_bomb_via_libc():
    _kernel("seccomp", "rlimit_nproc")
    r = _raw("def solution():\n    while True:\n        libc(b'fork')\n")
    assert not r.ok and r.error.kind == "runtime" and _group_gone(r.pid)


def test_raw_shell_command():
    _kernel("seccomp", "rlimit_nproc")
    target = _target()
    r = _raw(f"def solution():\n    status = posix.system('touch {target}')\n"
             "    if status != 0:\n        raise OSError(status)\n    return status\n")
    assert not r.ok and not os.path.exists(target)


def test_raw_exec_replaces_process():
    _kernel("seccomp", "landlock_filesystem")
    target = _target()
    r = _raw(f"def solution():\n    posix.execv('/bin/sh', ['sh', '-c', 'touch {target}'])\n")
    assert not r.ok and r.error.kind == "runtime" and not os.path.exists(target)


def test_raw_env_secret_not_visible(monkeypatch):
    monkeypatch.setenv("LMCYCLE_SECRET", "hunter2")
    r = _raw("def solution():\n    return posix.environ[b'LMCYCLE_SECRET'].decode()\n")
    assert not r.ok and "KeyError" in r.error.message and "hunter2" not in str(r.value) + r.stdout + r.stderr


def test_raw_kill_parent():
    _kernel("dropped_privileges", "landlock_signal_scope")
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    try:
        r = _raw("def solution():\n    return posix.kill(posix.getppid(), 10)\n")
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not r.ok and "PermissionError" in r.error.message and hits == []


def test_raw_regain_root():
    _kernel("dropped_privileges")
    r = _raw("def solution():\n    posix.setuid(0)\n    return posix.getuid()\n")
    assert not r.ok and r.value is None


def test_raw_threads_cannot_start():
    _kernel("seccomp", "rlimit_nproc")
    r = _raw("def solution():\n    t = imp('_thread')\n    t.start_new_thread(lambda: None, ())\n    return 1\n")
    assert not r.ok and r.error.kind == "runtime"


def test_raw_huge_file_in_workdir():
    r = _raw("def solution():\n    fd = posix.open('big', posix.O_WRONLY | posix.O_CREAT)\n"
             "    for _ in range(64):\n        posix.write(fd, bytes(1 << 20))\n    return 1\n")
    assert not r.ok and "File too large" in r.error.message


def test_raw_disk_fill_with_many_files():
    _kernel("disk_quota")
    cfg = RAW.model_copy(update={"max_disk_mb": 2})
    r = _raw("def solution():\n    n = 0\n    while True:\n        with open(f'f{n}', 'wb') as f:\n"
             "            f.write(bytes(100000))\n        n += 1\n", cfg)
    assert not r.ok and "No space left" in r.error.message
    with open("/proc/mounts", encoding="utf-8") as f:
        assert "lmcycle-sandbox" not in f.read()  # the tmpfs lived in the child's mount namespace only


def test_raw_parent_environment_via_proc(monkeypatch):
    _kernel("landlock_filesystem", "dropped_privileges")  # else the same uid may read its parent's environ
    monkeypatch.setenv("LMCYCLE_SECRET", "hunter2")
    r = _raw("def solution():\n    fd = posix.open(f'/proc/{posix.getppid()}/environ', posix.O_RDONLY)\n"
             "    return posix.read(fd, 1 << 16).decode('latin-1')\n")
    assert not r.ok and "hunter2" not in str(r.value) + r.stdout + r.stderr


def test_raw_new_session_does_not_escape_the_kill():
    r = _raw("def solution():\n    try:\n        posix.setsid()\n    except OSError:\n        pass\n"
             "    while True:\n        pass\n", RAW.model_copy(update={"timeout_s": 1.0, "cpu_s": 30}))
    assert not r.ok and r.error.kind == "timeout" and _group_gone(r.pid)


def test_sleeping_forever_hits_the_wall_clock():
    r = _raw("def solution():\n    imp('time').sleep(3600)\n", RAW.model_copy(update={"timeout_s": 1.0}))
    assert not r.ok and r.error.kind == "timeout" and r.duration_s < 5 and _group_gone(r.pid)


def test_raw_signal_tampering_still_killed():
    body = ("def solution():\n    sig = imp('_signal')\n    for s in (15, 14, 24, 1, 2):\n"
            "        sig.signal(s, sig.SIG_IGN)\n    while True:\n        pass\n")
    r = _raw(body, RAW.model_copy(update={"timeout_s": 1.0, "cpu_s": 30}))
    assert not r.ok and r.error.kind == "timeout" and _group_gone(r.pid)


def test_raw_memory_bomb():
    r = _raw("def solution():\n    return len(bytearray(10 ** 10))\n")
    assert not r.ok and r.error.kind == "memory"


# ------------------------------------------------------------------ resource attacks through the default config


def test_infinite_loop_killed_and_group_dead():
    r = run_solution("def solution():\n    while True:\n        pass\n", FAST.model_copy(update={"timeout_s": 1.0}))
    assert not r.ok and r.error.kind == "timeout" and _group_gone(r.pid)


def test_cpu_limit_kills_before_wall_clock():
    cfg = FAST.model_copy(update={"timeout_s": 20.0, "cpu_s": 1})
    r = run_solution("def solution():\n    x = 0\n    while True:\n        x += 1\n", cfg)
    assert not r.ok and r.error.kind == "timeout" and r.duration_s < 10


@pytest.mark.parametrize("expr", ["[0] * 10 ** 10", "'a' * 10 ** 12"], ids=["list", "string"])
def test_memory_bombs(expr):
    r = run_solution(f"def solution():\n    return len({expr})\n", FAST)
    assert not r.ok and r.error.kind == "memory" and r.value is None


def test_output_flood_capped():
    cfg = FAST.model_copy(update={"max_output_bytes": 4096})
    r = run_solution("def solution():\n    while True:\n        print('x' * 10000)\n", cfg)
    assert not r.ok and r.error.kind == "output_limit" and len(r.stdout) <= 4096


def test_pow_bomb_in_program_times_out():
    r = run_solution("def solution():\n    return 10 ** 10 ** 10\n", FAST.model_copy(update={"timeout_s": 1.0}))
    assert not r.ok and r.error.kind in ("timeout", "memory") and _group_gone(r.pid)


@pytest.mark.parametrize("expr", ["9 ** 9 ** 9", "2 ** 100000", "10 ** 999 * 10 ** 999", "(2 ** 64) ** 64"])
def test_calculator_pow_bombs(expr):
    done = threading.Event()

    def go():
        with pytest.raises(SandboxViolation, match="too large"):
            calculate(expr)
        done.set()

    t = threading.Thread(target=go)
    t.start()
    t.join(5)
    assert done.is_set()


@pytest.mark.parametrize("expr", ["__import__('os').system('id')", "(1).__class__", "open('/etc/passwd')",
                                  "[x for x in (1,)]", "'a' * 3", "lambda: 1"])
def test_calculator_refuses_non_arithmetic(expr):
    with pytest.raises(SandboxViolation):
        calculate(expr)


# ------------------------------------------------------------------ issue #14: handles, result channel, metadata

# Routes from allowed modules to the interpreter (modules they import, frames through class patterns). Each must
# be refused by the default config and, with the pre-filter off, still do no harm.
HANDLES = {
    "statistics_sys_main": ("import statistics\ndef solution():\n"
                            "    return statistics.sys.modules['__main__'].real_import('posix').getcwd()\n"),
    "fractions_sys_open": ("import fractions\ndef solution():\n"
                           "    return fractions.sys.modules['builtins'].open('/etc/passwd').read()\n"),
    "datetime_sys_stat": ("import datetime\ndef solution():\n"
                          f"    return datetime.sys.modules['posix'].stat({REPO_FILE!r}).st_size\n"),
    "from_import_sys": ("from statistics import sys\ndef solution():\n"
                        "    return sys.modules['builtins'].open('/etc/passwd').read()\n"),
    "re_enum_bltns": "import re\ndef solution():\n    return re.enum.bltns.open('/etc/passwd').read()\n",
    "match_class_frame": ("from collections.abc import Generator, Hashable\ndef solution():\n"
                          "    g = (x for x in [1])\n    match g:\n"
                          "        case Generator(gi_frame=Hashable(f_builtins=b)):\n"
                          "            return b['open']('/etc/passwd').read()\n"),
    "forge_via_main": ("import statistics\ndef solution():\n"
                       "    statistics.sys.modules['__main__'].out.write('[' * 99999)\n    return 1\n"),
}
NEEDS_EMPTY_ROOT = {"datetime_sys_stat"}  # metadata: Landlock alone lets stat() through (the report says so)


@pytest.mark.parametrize("code", HANDLES.values(), ids=HANDLES.keys())
def test_module_handles_refused_with_the_defaults(code):
    r = run_solution(code, FAST)
    assert not r.ok and r.error.kind == "violation" and r.error.line is not None and r.pid is None


@pytest.mark.parametrize("name", HANDLES.keys())
def test_module_handles_harmless_without_the_prefilter(name):
    if name in NEEDS_EMPTY_ROOT:
        _kernel("empty_root")
    r = run_solution(HANDLES[name], RAW)
    assert not r.ok and r.error.kind == "runtime" and r.value is None and "root:" not in r.stdout + r.stderr


def test_main_holds_none_of_the_bootstraps_objects():
    r = run_solution("import statistics\ndef solution():\n    main = statistics.sys.modules['__main__']\n"
                     "    return sorted(k for k in vars(main) if not k.startswith('__'))\n", RAW)
    assert r.ok and r.value == []


def test_prefilter_bans_every_module_handle_the_child_holds():
    # Walked in the child, on the modules as the bootstrap imported them: every public attribute of an allowed
    # module (or of a class in one) that holds a module outside the allow-list.
    allowed = sorted(FAST.allowed_imports)
    walk = (GRAB + f"allowed = {allowed!r}\n" + '''
def is_allowed(name):
    return any(name == a or name.startswith(a + ".") for a in allowed)
def solution():
    todo, seen, found = [mods[a] for a in allowed], set(), set()
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for holder in [vars(m)] + [vars(v) for v in vars(m).values() if isinstance(v, type)]:
            for k, v in holder.items():
                if type(v) is type(gc) and not k.startswith("_"):
                    (todo.append(v) if is_allowed(v.__name__) else found.add(k))
    return sorted(found)
''')
    r = _raw(walk)
    assert r.ok and "sys" in r.value
    for name in r.value:
        with pytest.raises(SandboxViolation, match=f"'.{name}'"):
            check_program(f"import math\nx = math.{name}\n")
        with pytest.raises(SandboxViolation):
            check_program(f"from math import {name}\n")


def _forging(payload: str) -> str:
    """A program (pre-filter off) that writes ``payload`` (a bytes expression) over every descriptor it holds,
    then exits before the bootstrap can write its own report. Everything is inside solution() so that PAL's
    extract_program keeps it."""
    return ("def solution():\n    g = __builtins__.__import__\n"
            "    imp = dict(zip(g.__code__.co_freevars, [c.cell_contents for c in g.__closure__]))['real_import']\n"
            "    posix = imp('posix')\n    for fd in range(3, 32):\n        try:\n"
            "            posix.ftruncate(fd, 0)\n            posix.lseek(fd, 0, 0)\n"
            f"            posix.write(fd, {payload})\n        except OSError:\n            pass\n"
            "    posix._exit(0)\n")


FORGED = {
    "deep_array": "b'[' * 100000 + b']' * 100000",  # RecursionError in json.loads
    "huge_int": "b'{\"value\": ' + b'9' * 5000 + b'}'",  # ValueError: int digit limit
    "deep_value": "b'{\"value\": ' + b'[' * 300 + b']' * 300 + b'}'",  # decodes, but deeper than the child writes
    "unknown_kind": "b'{\"error\": {\"kind\": \"ok\", \"message\": 1}}'",
}


@pytest.mark.parametrize("payload", FORGED.values(), ids=FORGED.keys())
def test_undecodable_result_is_crashed_for_every_caller(payload, scripted):
    program = _forging(payload)
    assert run_solution(program, RAW).error.kind == "crashed"
    assert run_snippet(program + "solution()\n", RAW).error.kind == "crashed"
    pal = run_program(program, RAW)
    assert pal.answer is None and pal.result.error.kind == "crashed"
    problem = Example("What is 2 plus 3?", ["2 + 3 = 5\n#### 5"], id="a")
    scored = gsm8k_harness(scripted([program]), [problem], "pal", sandbox=RAW, progress=False)
    assert scored["records"][0]["error"] == "crashed" and scored["gsm8k_accuracy"] == 0.0


def test_raw_program_cannot_forge_its_layers():
    clean = run_solution("def solution():\n    return 1\n", RAW)
    forged = run_solution(_forging("b'{\"layers\": {\"seccomp\": \"forged\", \"uid\": 0}, \"value\": 1}'"), RAW)
    assert clean.layers.get("rlimits") is True and clean.layers.get("import_guard") is True
    assert forged.layers == clean.layers


def test_raw_host_file_metadata_hidden():
    _kernel("empty_root")  # Landlock does not cover metadata: see the next test for a host without empty_root
    r = _raw(f"def solution():\n    return posix.stat({REPO_FILE!r}).st_size\n")
    assert not r.ok and r.error.kind == "runtime" and r.value is None


def test_raw_file_handles_refused():
    _kernel("seccomp")
    # the program's own directory: it exists whatever the root is, so only seccomp can refuse this
    r = _raw("def solution():\n    handle = bytes([128, 0, 0, 0]) + bytes(128)\n"
             "    return libc(b'name_to_handle_at', -100, b'.', handle, bytes(4), 0)\n")
    assert not r.ok and "PermissionError" in r.error.message and r.value is None


def test_isolation_report_is_honest_about_file_metadata():
    r = _raw(f"def solution():\n    return posix.stat({REPO_FILE!r}).st_size\n")
    report = isolation_report()
    assert r.ok == (not report.get("empty_root"))
    if r.ok:  # a host where stat() answers must not be told "working directory only" without the caveat
        assert ("metadata (stat) visible on the host" in report["filesystem_read"]
                or "no filesystem isolation" in report["filesystem_read"])
    else:
        assert "metadata" in report["filesystem_read"] and "visible" not in report["filesystem_read"]
