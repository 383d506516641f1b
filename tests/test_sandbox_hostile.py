"""Hostile programs against the sandboxed grader: each gets its expected status and the host is unharmed.

    .venv/bin/python -m pytest tests/test_sandbox_hostile.py -q

Each case runs twice where it matters: with the in-process audit guard (the normal configuration) and
without it (guard=False), so the OS layer (PID namespace, Landlock, rlimits, cgroups) is tested on its own.
After the suite: no process carrying the sandbox marker is alive and no file was written outside temp dirs.
"""
import glob
import os
import site
import sys
import time
from pathlib import Path

import pytest

import problems
import rewards

FENCE = "```"
REPO = Path(__file__).resolve().parents[1]
HOME = Path.home()
CANARY = f"pgrpo_hostile_canary_{os.getpid()}"
CAPS = rewards.detect_sandbox()

SETUP = problems.load_benchmark_test()[0].setup_code
GOOD = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
PROBLEM = problems.Problem(
    id=1, difficulty="Easy", func_name="Solution().add", question="add two ints", starter_code="",
    gt_tests=("assert Solution().add(a = 1, b = 2) == 3", "assert Solution().add(a = 2, b = 2) == 4"),
    setup_code=SETUP, canonical_solution=GOOD, prompt=(), hint="simple_overwrite_tests")
LIST_PROBLEM = problems.Problem(
    id=2, difficulty="Easy", func_name="Solution().rev", question="reverse a list", starter_code="",
    gt_tests=("assert is_same_list(Solution().rev(list_node([1, 2])), list_node([2, 1]))",),
    setup_code=SETUP, canonical_solution="", prompt=(), hint="none")
TREE_PROBLEM = problems.Problem(
    id=3, difficulty="Easy", func_name="Solution().mirror", question="mirror a tree", starter_code="",
    gt_tests=("assert is_same_tree(Solution().mirror(tree_node([1, 2, 3, None, 4])), "
              "tree_node([1, 3, 2, None, None, 4]))",),
    setup_code=SETUP, canonical_solution="", prompt=(), hint="none")
# an answer whose values compare equal to anything, with a list as long as the input (no algorithm at all)
EQ_ANY = ("class A:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n"
          "        return False\n")
ALWAYS_EQUAL_LIST = (EQ_ANY + "class Solution:\n    def rev(self, h):\n        out = None\n"
                     "        while h:\n            out, h = ListNode(A(), out), h.next\n"
                     "        return out\n")
ALWAYS_EQUAL_TREE = (EQ_ANY + "class Solution:\n    def mirror(self, t):\n        if t is None:\n"
                     "            return None\n"
                     "        return TreeNode(A(), self.mirror(t.right), self.mirror(t.left))\n")
# the right mirror plus a node whose val is None where a child is missing: reads like the expected level order
NONE_NODE_TREE = ("class Solution:\n    def mirror(self, t):\n        m = self.m(t)\n"
                  "        m.left.left = TreeNode(None)\n        return m\n    def m(self, t):\n"
                  "        if t is None:\n            return None\n"
                  "        return TreeNode(t.val, self.m(t.right), self.m(t.left))\n")
# an honest answer in a node class of its own, with __slots__ (no instance __dict__)
SLOTS_LIST = ("class N:\n    __slots__ = ('val', 'next')\n    def __init__(self, val, next=None):\n"
              "        self.val, self.next = val, next\nclass Solution:\n    def rev(self, h):\n"
              "        out = None\n"
              "        while h:\n            out, h = N(h.val, out), h.next\n        return out\n")
HONEST_TREE = ("class Solution:\n    def mirror(self, t):\n        if t is None:\n            return None\n"
               "        return TreeNode(t.val, self.mirror(t.right), self.mirror(t.left))\n")


def wrap(code: str) -> str:
    return f"{FENCE}python\n{code}\n{FENCE}"


SITE = Path(rewards.allowed_packages()[0]["numpy"]).parents[1]  # the trainer's site-packages
# every other package folder a program could put on sys.path: the base interpreter's and the system's
OTHER_SITES = sorted({str(SITE), *site.getsitepackages([sys.base_prefix]), site.getusersitepackages(),
                      *glob.glob("/usr/lib/python3*/dist-packages"),
                      *glob.glob("/usr/lib/python3/dist-packages"),
                      *glob.glob("/usr/local/lib/python3*/dist-packages"),
                      *glob.glob("/usr/local/lib/python3*/site-packages")})


def _site_modules(d: Path) -> set[str]:
    names = set()
    for e in d.iterdir() if d.is_dir() else ():
        stem = e.name.split(".")[0]
        if (not stem.isidentifier() or stem in rewards.ALLOWED_PACKAGES
                or e.name.endswith((".dist-info", ".pth"))):
            continue
        if (e.is_dir() and (e / "__init__.py").exists()) or e.suffix in (".py", ".so"):
            names.add(stem)
    return names


def _other_site_modules() -> list[str]:
    """Top-level importable names in every package folder of this machine other than the allow-listed ones."""
    names = _site_modules(SITE)
    assert {"requests", "torch", "yaml"} <= names, sorted(names)[:20]  # installed by the project's deps
    for d in OTHER_SITES:
        names |= _site_modules(Path(d))
    return sorted(names)


def _import_others_program() -> str:
    """Tries every other package of every package folder on the machine plainly, then again with all those
    folders put on sys.path; exits 1 if any import works
    (Landlock grants only the allow-listed package directories)."""
    return (f"import sys, importlib\nnames = {_other_site_modules()!r}\ngot = []\n"
            f"for attempt in range(2):\n    if attempt:\n        sys.path[:0] = {OTHER_SITES!r}\n"
            "        importlib.invalidate_caches()\n    for n in names:\n        try:\n"
            "            __import__(n)\n            got.append(n)\n        except BaseException:\n"
            "            pass\nif got:\n    raise SystemExit('imported: ' + ' '.join(got))\n" + GOOD)


def _write_allowed_program() -> str:
    """Writes (open, numpy.save, ndarray.tofile) into each allow-listed package's directory;
    exits 1 if any works."""
    return (f"import os, numpy as np, sortedcontainers\ndirs = {list(rewards.allowed_packages()[1])!r}\n"
            "wrote = []\nfor d in dirs:\n    for how in ('open', 'save', 'tofile'):\n"
            f"        p = os.path.join(d, {CANARY!r} + how)\n        try:\n"
            "            if how == 'open':\n                open(p, 'w').write('x')\n"
            "            elif how == 'save':\n                np.save(p, np.zeros(2))\n"
            "            else:\n                np.zeros(2).tofile(p)\n            wrote.append(p)\n"
            "        except OSError:\n            pass\n"
            "if wrote:\n    raise SystemExit('wrote ' + ' '.join(wrote))\n" + GOOD)


# (name, program, expected status, expected eq_correct); programs are the whole response code
CASES = [
    ("infinite_loop", "class Solution:\n    def add(self, a, b):\n        while True:\n            pass\n",
     "timeout", False),
    ("infinite_loop_top_level", "while True:\n    pass\n" + GOOD, "timeout", False),
    ("sleep_past_deadline",
     "import time\nclass Solution:\n    def add(self, a, b):\n        time.sleep(100)\n", "timeout", False),
    ("input_call", "x = input()\n" + GOOD, "runtime_error", False),
    ("bare_except_swallows_timeout",
     "class Solution:\n    def add(self, a, b):\n        while True:\n            try:\n"
     "                while True:\n                    pass\n            except:\n                pass\n",
     "timeout", False),
    ("sigterm_sigalrm_ignored",
     "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
     "signal.signal(signal.SIGALRM, signal.SIG_IGN)\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
     "class Solution:\n    def add(self, a, b):\n        while True:\n            pass\n", "timeout", False),
    ("fork_bomb", "import os\nwhile True:\n    os.fork()\n" + GOOD, None, False),
    ("fork_and_exit", "import os\nif os.fork() != 0:\n    os._exit(0)\n" + GOOD, None, None),
    ("setsid_double_fork_daemon",
     "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(300)\n"
     "    os._exit(0)\n" + GOOD, None, None),
    ("grandchild_holds_stdout",
     "import os, time\nif os.fork() == 0:\n    if os.fork() == 0:\n        time.sleep(300)\n"
     "    os._exit(0)\n" + GOOD,
     None, None),
    ("threads_left_running",
     "import threading\ndef spin():\n    while True:\n        pass\n"
     "threading.Thread(target=spin).start()\n" + GOOD,
     None, None),
    ("alloc_10GB",
     "class Solution:\n    def add(self, a, b):\n        x = bytearray(10 * 1024**3)\n        return a + b\n",
     "memory_error", False),
    ("memory_spread_over_children",
     "import os\nfor _ in range(6):\n    if os.fork() == 0:\n        x = bytearray(900 * 1024**2)\n"
     "        import time\n        time.sleep(30)\n" + GOOD, None, None),
    ("deep_recursion_segfault",
     "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nclass Solution:\n"
     "    def add(self, a, b):\n        return f(0)\n", None, False),
    ("os_abort", "import os\nos.abort()\n" + GOOD, "crash", False),
    ("output_flood",
     "import os, sys\nfor _ in range(20000):\n    print('x' * 1000)\ntry:\n"
     "    os.write(1, b'y' * (1 << 24))\nexcept OSError:\n    pass\n" + GOOD, "ok", True),
    ("close_stdout", "import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\n" + GOOD, "ok", True),
    ("huge_file", "open('big.bin', 'wb').write(b'0' * (200 * 1024**2))\n" + GOOD, "runtime_error", False),
    ("sys_exit_before_tests", "import sys\nsys.exit(0)\n" + GOOD, "runtime_error", False),
    ("os_exit_before_tests", "import os\nos._exit(0)\n" + GOOD, "crash", False),
    ("raise_systemexit_in_solution",
     "class Solution:\n    def add(self, a, b):\n        raise SystemExit(0)\n", "ok", False),
    ("unittest_skiptest",
     "import unittest\nclass Solution:\n    def add(self, a, b):\n"
     "        raise unittest.SkipTest('skip')\n", "ok", False),
    ("eq_always_true",
     "class Any:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n"
     "        return False\nclass Solution:\n    def add(self, a, b):\n        return Any()\n", "ok", False),
    ("eq_always_true_inside_list",
     "class Any(int):\n    def __eq__(self, o):\n        return True\nclass Solution:\n"
     "    def add(self, a, b):\n        return Any(7)\n", "ok", False),
    ("monkeypatch_builtins_and_exec",
     "import builtins, json\nbuiltins.AssertionError = KeyError\nbuiltins.exec = lambda *a, **k: None\n"
     "builtins.eval = lambda *a, **k: 3\nbuiltins.isinstance = lambda *a: True\n"
     "json.dumps = lambda *a, **k: '{}'\nclass Solution:\n    def add(self, a, b):\n        return 0\n",
     "ok", False),
    ("read_files_outside_tmp",
     f"data = open({str(REPO / 'rewards.py')!r}).read()\n" + GOOD,
     "runtime_error" if CAPS.landlock_abi else "ok", None),
    ("read_benchmark_data",
     "import glob\nx = open('/work/shared/data/leetcode/README.md').read()\n" + GOOD,
     "runtime_error" if CAPS.landlock_abi else None, None),
    ("write_repo_and_home",
     "import os\nfor d in [" + repr(str(REPO)) + ", " + repr(str(HOME)) + ", '/tmp']:\n    try:\n"
     f"        open(os.path.join(d, {CANARY!r}), 'w').write('x')\n    except OSError:\n        pass\n" + GOOD,
     "ok", True),
    ("network_access",
     "import socket\nclass Solution:\n    def add(self, a, b):\n"
     "        socket.create_connection(('1.1.1.1', 80), timeout=1)\n        return a + b\n", "ok", False),
    ("shadow_stdlib_in_cwd",
     "open('csv.py', 'w').write('raise SystemExit(3)')\nopen('heapq.py', 'w').write('raise SystemExit(3)')\n"
     "import importlib\nimportlib.invalidate_caches()\nimport csv\n" + GOOD, "ok", True),
    ("forged_all_passed_output",
     "import os, json\nfor fd in range(1, 40):\n    for i in range(2):\n        try:\n"
     "            os.write(fd, (json.dumps({'ev': 't', 'p': 0, 'i': i, 'ok': True, 'n': 'guess'}) "
     "+ '\\n').encode())\n        except OSError:\n            pass\n    try:\n"
     "        os.write(fd, (json.dumps({'ev': 'done', 'n': 'guess'}) + '\\n').encode())\n"
     "    except OSError:\n        pass\nprint('{\"tests_passed\": 2, \"tests_total\": 2}')\n"
     "class Solution:\n    def add(self, a, b):\n        return 0\n",
     "ok", False),
    # walks up to the runner's frame and writes "passed" records with its nonce
    ("steal_nonce_from_runner_frames",
     "import sys, os\nclass Solution:\n    def add(self, a, b):\n        f = sys._getframe(1)\n"
     "        while f is not None:\n            loc = f.f_locals\n"
     "            if 'nonce' in loc and 'result_fd' in loc:\n                for i in range(2):\n"
     "                    os.write(loc['result_fd'], ('{\"ev\": \"t\", \"p\": 0, \"i\": %d, '\n"
     "                        '\"ok\": true, \"n\": \"%s\"}\\n' % (i, loc['nonce'])).encode())\n"
     "            f = f.f_back\n        return -1\n", "ok", False),
    ("namedtuple_and_enum_still_work",
     "from collections import namedtuple\nimport enum, socket, unittest, traceback\n"
     "P = namedtuple('P', 'x y')\nclass Solution:\n    def add(self, a, b):\n        try:\n"
     "            1 / 0\n        except ZeroDivisionError:\n            traceback.format_exc()\n"
     "        return P(a, b).x + P(a, b).y\n", "ok", True),
    ("allowed_packages_import_and_work",
     "import numpy as np\nfrom sortedcontainers import SortedList\nassert np.arange(4).sum() == 6\n"
     "assert list(SortedList([3, 1, 2])) == [1, 2, 3]\nnp.save('ok.npy', np.zeros(2))\n" + GOOD, "ok", True),
    ("import_every_other_site_package", _import_others_program(), "ok" if CAPS.landlock_abi else None, None),
    ("ctypes_blocked_with_numpy_loaded",
     "import numpy, sys\ntry:\n    import ctypes\nexcept ImportError:\n    pass\nelse:\n"
     "    raise SystemExit(1)\nsys.modules.pop('ctypes', None)\nimport ctypes\n" + GOOD,
     "runtime_error", False),
    ("numpy_ctypeslib_load_library",
     "import numpy as np\nnp.ctypeslib.load_library('libc.so.6', '/lib/x86_64-linux-gnu')\n" + GOOD,
     "runtime_error", False),
    ("fork_after_numpy_import", "import numpy, os\nos.fork()\n" + GOOD, "runtime_error", False),
    ("forge_unshare_sigkill_message",  # would make an outside SIGKILL of the runner (infra_error) if believed
     "import os\nfor fd in range(1, 64):\n    try:\n"
     "        os.write(fd, b'unshare: sigprocmask unblock failed\\n')\n    except OSError:\n        pass\n"
     "os._exit(1)\n" + GOOD, "crash", False),
    ("forge_runner_crashed_message",
     "import os\nfor fd in range(1, 64):\n    try:\n"
     "        os.write(fd, b'sandbox_runner crashed: KeyError\\n')\n    except OSError:\n        pass\n"
     "os._exit(70)\n" + GOOD, "crash", False),
    ("gc_introspection_blocked", "import gc\nobjs = gc.get_objects()\n" + GOOD, "runtime_error", False),
    ("kill_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD,
     "runtime_error", False),
    # the audit hook keeps no flag a frame walk could set (a red team's bypass, 2026-12-04): fork still fails
    ("flip_guard_flags_in_runner_frames",
     "import sys, os\nf = sys._getframe(0)\nwhile f is not None:\n    for v in list(f.f_locals.values()):\n"
     "        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], bool):\n            v[0] = True\n"
     "    f = f.f_back\nos.fork()\n" + GOOD, "runtime_error", False),
    # an import name that is a str subclass used to pass the hook's filter (its split was the program's)
    ("import_blocked_module_by_str_subclass",
     "class S(str):\n    def split(self, *a):\n        return ['x']\n    def partition(self, *a):\n"
     "        return ('x', '', '')\nm = __import__(S('_posixsubprocess'))\n" + GOOD, "runtime_error", False),
    # a forged setup_error (nonce from the runner's frames) would have made the grade infra_error (masked)
    ("forge_setup_error_with_stolen_nonce",
     "import sys, os\nclass Solution:\n    def add(self, a, b):\n        f = sys._getframe(1)\n"
     "        while f is not None:\n            loc = f.f_locals\n"
     "            if 'nonce' in loc and 'result_fd' in loc:\n"
     "                rec = '{\"ev\": \"setup_error\", \"err\": \"x\", \"n\": \"%s\"}\\n'\n"
     "                os.write(loc['result_fd'], (rec % loc['nonce']).encode())\n"
     "            f = f.f_back\n        return a + b\n", "ok", True),
    # the runner's CPU-window shape, called by the program during a phase: no window is left for it
    ("extend_own_cpu_window",
     "import resource\nclass Solution:\n    def add(self, a, b):\n"
     "        s, h = resource.getrlimit(resource.RLIMIT_CPU)\n"
     "        resource.setrlimit(resource.RLIMIT_CPU, (h - 1, h))\n        return a + b\n", None, False),
    ("lower_the_cpu_hard_limit",  # would turn the kernel's SIGKILL into a masked infra error
     "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\n" + GOOD, "runtime_error", False),
    # a forged record that json cannot parse (RecursionError) is ignored, not an infra error
    ("deeply_nested_json_on_the_result_fd",
     "import os, sys\nos.write(int(sys.argv[2]), b'[' * 200000 + b'\\n')\n" + GOOD, "ok", True),
    ("mknod_a_device_in_tmp",  # Landlock grants no MAKE_CHAR; no CAP_MKNOD either
     "import os, stat\nos.mknod('kmsg', stat.S_IFCHR | 0o600, os.makedev(1, 11))\n" + GOOD,
     "runtime_error", False),
    ("realtime_priority",  # no CAP_SYS_NICE: a program cannot starve the host's CPUs
     "import os\nos.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\n" + GOOD,
     "runtime_error", False),
]
if CAPS.landlock_abi:  # without Landlock these writes would land in the real site-packages
    CASES.append(("write_into_allowed_package_dirs", _write_allowed_program(), "ok", True))
# guard=False cases: the OS layer alone must contain these
OS_CASES = ["fork_bomb", "fork_and_exit", "setsid_double_fork_daemon", "grandchild_holds_stdout",
            "memory_spread_over_children", "read_files_outside_tmp", "write_repo_and_home", "network_access",
            "threads_left_running", "infinite_loop", "sleep_past_deadline", "alloc_10GB", "kill_parent",
            "import_every_other_site_package", "mknod_a_device_in_tmp", "realtime_priority",
            *(["write_into_allowed_package_dirs"] if CAPS.landlock_abi else [])]


def _alive_marked() -> list[int]:
    """Live processes started by THIS test process's graders (other sessions may grade concurrently)."""
    tag = rewards.owner_tag().encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes() if tag not in cmd else b""
        except OSError:
            continue
        if tag in cmd or tag in env:
            try:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(d.name))
            except (OSError, IndexError):
                pass
    return out


@pytest.fixture(scope="module")
def results():
    for d in (REPO, HOME, Path("/tmp")):
        (d / CANARY).unlink(missing_ok=True)
    before = set(_alive_marked())
    by_name = {c[0]: c for c in CASES}
    t0 = time.monotonic()
    with rewards.Grader(workers=2, timeout_s=1.0, wall_timeout_s=3.0) as g:
        guarded = g.grade_many([(PROBLEM, wrap(c[1])) for c in CASES])
    with rewards.Grader(workers=2, timeout_s=1.0, wall_timeout_s=3.0, guard=False) as g:
        unguarded = g.grade_many([(PROBLEM, wrap(by_name[n][1])) for n in OS_CASES])
        helper = g.grade_many([
            (LIST_PROBLEM, wrap("def is_same_list(a, b):\n    return True\nclass Solution:\n"
                                "    def rev(self, h):\n        return None\n")),
            (LIST_PROBLEM, wrap("class Solution:\n    def rev(self, h):\n        prev = None\n"
                                "        while h:\n            h.next, prev, h = prev, h, h.next\n"
                                "        return prev\n")),
        ])
        shapes = g.grade_many([(LIST_PROBLEM, wrap(ALWAYS_EQUAL_LIST)),
                               (TREE_PROBLEM, wrap(ALWAYS_EQUAL_TREE)), (TREE_PROBLEM, wrap(NONE_NODE_TREE)),
                               (LIST_PROBLEM, wrap(SLOTS_LIST)),
                               (TREE_PROBLEM, wrap(HONEST_TREE))])
    seconds = time.monotonic() - t0
    time.sleep(0.3)
    return {"guarded": dict(zip([c[0] for c in CASES], guarded)), "unguarded": dict(zip(OS_CASES, unguarded)),
            "helper": helper, "shapes": shapes, "before": before, "seconds": seconds}


def test_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name,program,status,eq", CASES, ids=[c[0] for c in CASES])
def test_hostile_case_guarded(results, name, program, status, eq):
    r = results["guarded"][name]
    assert not r["infra_error"], r["error"]
    if status is not None:
        assert r["status"] == status, (name, r["status"], r["error"], r["phase_status"])
    if eq is not None:
        assert r["eq_correct"] is eq, (name, r)
    assert r["seconds"] < 20, (name, r["seconds"])


@pytest.mark.parametrize("name", OS_CASES)
def test_hostile_case_os_layer_only(results, name):
    r = results["unguarded"][name]
    assert not r["infra_error"], r["error"]
    _, _, status, eq = next(c for c in CASES if c[0] == name)
    if name in ("read_files_outside_tmp",) and CAPS.landlock_abi:
        assert r["status"] == "runtime_error" and "PermissionError" in (r["error"] or ""), r
    elif name == "network_access":
        assert not r["eq_correct"], r  # no route out: net namespace / Landlock
    elif name in ("setsid_double_fork_daemon", "grandchild_holds_stdout", "threads_left_running"):
        # graded promptly; leftovers checked at the end
        assert (r["status"], r["eq_correct"]) == ("ok", True), r
    elif name in ("infinite_loop", "sleep_past_deadline", "alloc_10GB"):
        assert (r["status"], r["eq_correct"]) == (status, eq), r
    elif name in ("import_every_other_site_package", "write_into_allowed_package_dirs") and CAPS.landlock_abi:
        assert (r["status"], r["eq_correct"]) == ("ok", True), r  # Landlock alone keeps them out / read-only
    elif name == "kill_parent":
        assert not r["infra_error"]  # we are still alive to assert this
    elif name in ("mknod_a_device_in_tmp", "realtime_priority") and CAPS.dropcaps:
        assert (r["status"], r["eq_correct"]) == ("runtime_error", False), r
    assert r["seconds"] < 20, (name, r["seconds"])


def test_hint_phase_of_forged_program_is_not_passed(results):
    # the forged program defines no run_tests: its hint call must fail despite the forged records
    r = results["guarded"]["forged_all_passed_output"]
    assert not r["eq_hinted"] and r["gt_passed"] == 0
    assert r["forged_records"] > 0  # it found the result fd, but without the nonce its records were ignored


def test_comparison_helpers_cannot_be_monkeypatched(results):
    patched, honest = results["helper"]
    assert not patched["eq_correct"] and honest["eq_correct"], (patched, honest)


def test_always_equal_nodes_do_not_pass_list_or_tree_asserts(results):
    """is_same_list / is_same_tree asserts are decided in the parent from the nodes' values: an always-equal
    value in nodes of the right shape fails (it passed when the child ran the helper), an honest tree passes
    (the expected tree is built by hand: [1, 2, 3, None, 4] mirrored is [1, 3, 2, None, None, 4])."""
    eq_list, eq_tree, none_node, slots, honest = results["shapes"]
    assert not eq_list["eq_correct"] and not eq_tree["eq_correct"], (eq_list, eq_tree)
    assert not none_node["eq_correct"], none_node  # a None-valued node is not a missing child
    assert honest["eq_correct"] and slots["eq_correct"], (honest, slots)  # own node class with __slots__


def test_canonical_tree_by_hand():
    assert rewards.canonical_tree([]) == []
    assert rewards.canonical_tree([1, None, 2, 3]) == [1, None, 2, 3]
    assert rewards.canonical_tree([1, None, 2, None, None, 3]) == [1, None, 2]  # tree_node ignores the 3
    assert rewards.canonical_tree([1, 2, 3, None, 4, None, None]) == [1, 2, 3, None, 4]
    assert rewards.split_test("assert is_same_list(f(x), None)")[1] == []
    assert rewards.split_test("assert is_same_list(f(x), g([1]))")[1] is rewards.CHILD  # not the builder


def test_no_process_left_and_no_file_outside_tmp(results):
    for _ in range(30):  # PID-namespace teardown is asynchronous: give it up to 3 s
        left = set(_alive_marked()) - results["before"]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"sandbox processes still alive: {sorted(left)}"
    for d in (REPO, HOME):
        assert not (d / CANARY).exists(), f"hostile program wrote into {d}"
    for d in rewards.allowed_packages()[1]:
        assert not list(Path(d).glob(CANARY + "*")), f"hostile program wrote into {d}"
    assert not (Path("/tmp") / CANARY).exists(), "hostile program wrote into the real /tmp"
    assert not list(REPO.glob("csv.py")) and not list(REPO.glob("big.bin"))
    print(f"hostile suite graded {len(CASES) + len(OS_CASES) + 2} programs in {results['seconds']:.1f} s")


def test_a_flooded_result_channel_is_killed_and_charged_to_the_program():
    """70 MB without a newline on the result fd: the parent stops reading at 64 MB, kills the sandbox and
    grades it as the program's crash, not as an infrastructure error (which would mask it)."""
    flood = ("import os, sys\nfd = int(sys.argv[2])\nchunk = b'x' * (1 << 20)\nfor _ in range(70):\n"
             "    os.write(fd, chunk)\n" + GOOD)
    with rewards.Grader(workers=1, timeout_s=5.0, wall_timeout_s=10.0) as g:
        r = g.grade_many([(PROBLEM, wrap(flood))])[0]
    assert not r["infra_error"] and r["status"] == "crash" and not r["eq_correct"], r


def test_a_stolen_nonce_cannot_hold_the_worker():
    """A program that reads the nonce from the runner's frames and re-announces its phase every 0.2 s: each
    record used to push the deadline out; one absolute bound per run now stops it (startup 2 s, wall 2 s,
    two gt asserts: < 2 * 2 + 2 * 4 + 1 = 13 s), graded as a timeout."""
    hold = ("import sys, os, time\nclass Solution:\n    def add(self, a, b):\n        f = sys._getframe(1)\n"
            "        while f is not None:\n            loc = f.f_locals\n"
            "            if 'nonce' in loc and 'result_fd' in loc:\n"
            "                rec = ('{\"ev\": \"phase\", \"p\": 0, \"n\": \"%s\"}\\n'\n"
            "                       % loc['nonce']).encode()\n"
            "                for _ in range(600):\n                    os.write(loc['result_fd'], rec)\n"
            "                    time.sleep(0.2)\n            f = f.f_back\n        return a + b\n")
    t0 = time.monotonic()
    with rewards.Grader(workers=1, timeout_s=1.0, wall_timeout_s=2.0, startup_s=2.0) as g:
        r = g.grade_many([(PROBLEM, wrap(hold))])[0]
    assert time.monotonic() - t0 < 20 and r["seconds"] < 14, r["seconds"]
    assert not r["infra_error"] and not r["eq_correct"] and r["status"] == "timeout", r


@pytest.mark.skipif(not CAPS.ipc_ns, reason="unshare --ipc unavailable here")
def test_system_v_shared_memory_does_not_reach_the_host():
    """Without the audit guard (OS layer only): a program creates a System V shared-memory segment under a
    fixed key; in its own IPC namespace the host never sees it (the red team passed the canonical solution
    from the grader's own run to the program's through such a segment)."""
    import ctypes

    key = 0x5047_0000 + os.getpid() % 0xFFFF
    prog = (f"import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.shmget({key}, 4096, 0o1666) >= 0\n" + GOOD)
    with rewards.Grader(workers=1, timeout_s=2.0, wall_timeout_s=4.0, guard=False) as g:
        r = g.grade_many([(PROBLEM, wrap(prog))])[0]
    assert r["eq_correct"], r  # the segment was made inside the sandbox
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(key, 0, 0)
    if shmid >= 0:  # leaked to the host: clean it up, then fail
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    assert shmid < 0, "the sandbox's shared-memory segment is visible on the host"
