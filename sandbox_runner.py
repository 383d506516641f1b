"""Child-side runner of the sandboxed grader: runs ONE program against a list of test phases.

Never import this from the trainer; `rewards.Grader` starts it as

    [setpriv ...] [unshare ...] python -I -S -B sandbox_runner.py <spec_fd> <result_fd> <output_fd> \
        <owner tag>

and it is only useful that way. The spec (JSON, read from an anonymous memfd that is closed before
any program code runs) holds the nonce, the setup code, the program and the phases. Results go back
as newline-delimited JSON records on <result_fd>, each carrying the nonce. The program's fds 1 and 2
are <output_fd> (drained and dropped by the parent); the runner's own stderr, shared with the wrappers,
is closed to the program. Output is never read as evidence.
See docs/grader.md for the threat model and the isolation argument.

Order of operations (everything before step 6 is trusted code only):
 1. read + close the spec fd (and arm the parent-death signal when no wrapper did); 2. rlimits; 3. join
 the per-slot cgroups (if any); 4. Landlock (filesystem allowlist, no TCP, no signals outside the
 sandbox); 5. audit-hook guard (blocks frame and gc introspection, ctypes, process creation, signals,
 sockets, setrlimit); 6. exec setup+program
 in the program namespace; 7. run phases, streaming one record per test; 8. os._exit(0).
"""
import os
import sys

# Everything the runner needs later is bound to a local name in main() BEFORE program code runs,
# so monkeypatching os / json / builtins from the program cannot change how results are written.
import builtins
import json
import resource
import signal
import time


def _landlock(allow_ro: list, allow_rw: list, want_net: bool, want_scope: bool, list_only: list = ()) -> int:
    """Restrict this process (and its children) to read `allow_ro`, read/write `allow_rw`,
    only list `list_only`.

    Returns the ABI used (0 = unavailable). Trusted code; runs before the program."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    fs_all = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
    if abi >= 2:
        fs_all |= 1 << 13  # REFER
    if abi >= 3:
        fs_all |= 1 << 14  # TRUNCATE
    if abi >= 5:
        fs_all |= 1 << 15  # IOCTL_DEV
    net = 3 if (want_net and abi >= 4) else 0  # BIND_TCP | CONNECT_TCP
    scope = 3 if (want_scope and abi >= 6) else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    attr = RulesetAttr(fs_all, net, scope)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    rfd = libc.syscall(444, ctypes.byref(attr), size, 0)
    assert rfd >= 0, f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"
    file_ro = (1 << 0) | (1 << 2)  # EXECUTE | READ_FILE
    dir_ro = file_ro | (1 << 3)  # + READ_DIR
    file_rw_extra = (1 << 1) | ((1 << 14) if abi >= 3 else 0)  # WRITE_FILE | TRUNCATE
    # read/write dirs: everything handled except making device nodes and ioctls on devices
    dir_rw = fs_all & ~((1 << 6) | (1 << 11) | (1 << 15))  # MAKE_CHAR, MAKE_BLOCK, IOCTL_DEV
    for path, rw in ([(p, None) for p in list_only] + [(p, False) for p in allow_ro]
                     + [(p, True) for p in allow_rw]):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        is_dir = os.path.isdir(path)
        if rw is None and not is_dir:
            os.close(fd)
            continue
        allowed = ((1 << 3) if rw is None else (dir_rw if rw else dir_ro) if is_dir
                   else (file_ro | (file_rw_extra if rw else 0)))
        rule = PathBeneath(allowed, fd)
        r = libc.syscall(445, rfd, 1, ctypes.byref(rule), 0)
        os.close(fd)
        assert r == 0, f"landlock_add_rule({path}) failed: {os.strerror(ctypes.get_errno())}"
    assert libc.prctl(38, 1, 0, 0, 0) == 0, "prctl(PR_SET_NO_NEW_PRIVS) failed"
    assert libc.syscall(446, rfd, 0) == 0, f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"
    os.close(rfd)
    return abi


def _pdeathsig(parent: int) -> None:
    """SIGKILL this process when the grading process dies (prctl PR_SET_PDEATHSIG); exit at once if it
    already has (re-parented before the signal was armed)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0, "prctl(PR_SET_PDEATHSIG) failed"
    if os.getppid() != parent:
        os._exit(0)


_BLOCKED_EVENTS = frozenset({
    "sys._current_frames", "sys.settrace", "sys.setprofile",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "os.chroot", "os.setuid", "os.setgid",
})
_BLOCKED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "pty", "multiprocessing"})


def _install_guard(rlimit_cpu: int, cpu_hard: int, windows: int) -> None:
    """Audit hook (cannot be removed from Python code): blocks gc/trace introspection, ctypes, process
    creation, signals, sockets and every rlimit change but one. Defence in depth on top of the OS layer.
    Frames are NOT blocked (namedtuple, enum, typing need sys._getframe): ground-truth verdicts do not depend
    on anything in this process, because the parent compares the returned values itself.

    The one rlimit call allowed is the shape of the runner's own per-stage CPU window (RLIMIT_CPU, hard limit
    unchanged, soft below it), at most `windows` times: the runner's own calls after the hook is in place. Its
    state lives in this closure, which no frame walk reaches (frames only lead outwards); a program that makes
    the call itself uses up a window and the runner's own call then fails, which ends the run as the
    program's crash. Import names must be exact str (a str subclass could override split/hash)."""
    blocked_events, blocked_imports = _BLOCKED_EVENTS, _BLOCKED_IMPORTS
    perm, no_module = PermissionError, ModuleNotFoundError
    _type, _int, _tuple, _len, _base = type, int, tuple, len, BaseException  # builtins are patchable later
    _str, _partition = str, str.partition
    left = [windows]

    def window_call(args) -> bool:
        try:
            res, lims = args
            return (_type(res) is _int and res == rlimit_cpu and _type(lims) is _tuple and _len(lims) == 2
                    and _type(lims[0]) is _int and _type(lims[1]) is _int and lims[1] == cpu_hard
                    and 0 <= lims[0] < cpu_hard)
        except _base:
            return False

    def hook(event, args):
        if event == "resource.setrlimit" and left[0] > 0 and window_call(args):
            left[0] -= 1
            return
        if event in blocked_events:
            raise perm(f"sandbox: {event} is not allowed")
        if event == "import" and args and _type(args[0]) is not _str:
            raise no_module("sandbox: import of a name that is not a plain str")
        if event == "import" and args and _partition(args[0], ".")[0] in blocked_imports:
            # ImportError, so that optional imports (numpy's `try: import ctypes`) fall back as on a system
            # without it
            raise no_module(f"sandbox: import {args[0]} is not allowed")

    sys.addaudithook(hook)


def _allow_packages(inits: dict) -> None:
    """Make exactly the allow-listed third-party packages importable: a meta-path finder that knows only
    their top-level names and loads each from its own directory (sys.path keeps no site-packages; Landlock
    grants read/execute on those directories only, so widening the finder or sys.path reaches nothing
    else)."""
    if not inits:
        return
    import importlib.util

    spec_from = importlib.util.spec_from_file_location
    dirname = os.path.dirname

    class AllowedPackages:
        @staticmethod
        def find_spec(name, path=None, target=None):
            init = inits.get(name) if path is None else None
            if init is None:
                return None
            return spec_from(name, init, submodule_search_locations=[dirname(init)])

    sys.meta_path.append(AllowedPackages)


class _Sink:
    """Bounded stand-in for sys.stdout/sys.stderr: keeps nothing, never blocks, never raises."""

    encoding = "utf-8"
    errors = "replace"

    def write(self, s):
        return len(s) if isinstance(s, str) else 0

    def flush(self):
        return None

    def isatty(self):
        return False

    def close(self):
        return None

    closed = False

    def writelines(self, lines):
        return None

    def writable(self):
        return True

    def readable(self):
        return False

    def fileno(self):
        raise OSError("sandbox: stdout has no file descriptor")


def main() -> None:
    # ---- trusted bindings, captured before any untrusted code exists in this process ----------
    _write, _exit, _loads = os.write, os._exit, json.loads
    _exec, _eval, _compile, _type, _len, _isinst, _str, _repr = (exec, eval, compile, type, len, isinstance,
                                                                 str, repr)
    is_plain, enc, flatten = _is_plain, _encode_record, _flatten_nodes  # module globals are patchable
    _getattr_obj = object.__getattribute__
    _BaseException, _SyntaxError, _MemoryError = BaseException, SyntaxError, MemoryError
    _dict, _list, _range, _enumerate, _bool = dict, list, range, enumerate, bool

    spec_fd, result_fd, prog_out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    with os.fdopen(spec_fd, "rb", closefd=True) as f:
        spec = _loads(f.read().decode("utf-8"))
    nonce = spec["nonce"]
    if spec.get("parent"):  # no setpriv/unshare wrapper: arm the parent-death signal here (trusted code)
        _pdeathsig(spec["parent"])

    def emit(rec: dict) -> None:
        # json.dumps is NOT used after the program runs: the program could patch the json module and
        # would then see the nonce. enc() uses only methods of exact builtin types.
        rec["n"] = nonce
        try:
            data = enc(rec, _type, _str, _len)
            while data:
                data = data[_write(result_fd, data):]
        except _BaseException:
            pass  # channel closed by the program: evidence is lost, never created

    def errstr(e) -> str:
        try:
            return (_type(e).__name__ + ": " + _str(e))[:300]
        except _BaseException:
            return _type(e).__name__

    # ---- OS-level confinement (trusted) --------------------------------------------------------
    lim = spec["limits"]
    mem = lim["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize_mb"] * 1024 * 1024,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if lim.get("nproc"):
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"],) * 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing
    # stdin is an empty /dev/null (as in the benchmark): readline() -> ''
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for path in spec.get("cgroups") or []:
        with open(path, "w") as f:
            f.write("0")  # move this process into the slot's cgroup (pids / memory caps)
    ll = spec.get("landlock")
    if ll:
        _landlock(ll["ro"], ll["rw"], ll["net"], ll["scope"], ll.get("list_only", []))
    emit({"ev": "start", "pid": os.getpid()})

    # ---- compile everything trusted before the program runs -----------------------------------
    setup, program = spec["setup"], spec["program"]
    try:
        setup_code = _compile(setup, "<setup>", "exec")
    except _BaseException as e:  # the problem's own setup is broken: an infrastructure fault
        emit({"ev": "setup_error", "err": errstr(e)})
        _exit(3)
    phases = []
    for ph in spec["phases"]:
        if ph["kind"] == "asserts":
            compiled = []
            for t in ph["tests"]:
                # {"v": expr, "budget": n}: send back the value; {"a": stmt}: run the assert
                # "shape": "list" / "tree": the value is a linked list / binary tree, sent as its values
                if "v" in t:
                    compiled.append((True, _compile(t["v"], "<test>", "eval"), t["budget"],
                                     t.get("shape", "")))
                else:
                    compiled.append((False, _compile(t["a"], "<test>", "exec"), 0, ""))
            phases.append((ph["name"], "asserts", compiled, None, None))
        else:
            call = _compile(ph["call"], "<call>", "exec")
            define = _compile(ph["define"], "<prompt_tests>", "exec") if ph.get("define") else None
            phases.append((ph["name"], "call", None, call, define))
    pristine_builtins = _dict(builtins.__dict__)
    test_ns = {"__name__": "__tests__", "__builtins__": _dict(pristine_builtins)}
    _exec(setup_code, test_ns)  # pristine helpers (list_node, is_same_tree, inf, ...) for the asserts
    plain_types = frozenset({int, float, bool, str, bytes, complex, _type(None), list, tuple, dict,
                             set, frozenset})
    seqs = frozenset({list, tuple, set, frozenset})
    skip = spec.get("skip", 0)
    max_failures = spec.get("max_failures")

    # ---- untrusted from here on -----------------------------------------------------------------
    try:
        prog_code = _compile(setup + "\n\n" + program, "<program>", "exec")
        emit({"ev": "compile", "ok": True})
    except _BaseException as e:
        emit({"ev": "compile", "ok": False, "err": errstr(e)})
        emit({"ev": "done"})
        _exit(0)
    cpu_budget = lim["cpu_phase_s"]
    _getrusage, _setrlimit, _ceil, _min = resource.getrusage, resource.setrlimit, __import__("math").ceil, min
    cpu_hard = lim["cpu_s"] + 1

    rlimit_cpu, rusage_self = resource.RLIMIT_CPU, resource.RUSAGE_SELF

    def cpu_window() -> None:
        # each stage (load, every phase) gets cpu_phase_s of CPU on top of what was already used
        ru = _getrusage(rusage_self)
        _setrlimit(rlimit_cpu, (_min(_ceil(ru.ru_utime + ru.ru_stime + cpu_budget), cpu_hard - 1), cpu_hard))

    def on_xcpu(signum, frame) -> None:
        emit({"ev": "cpu"})
        _exit(0)

    signal.signal(signal.SIGXCPU, on_xcpu)
    _allow_packages(spec.get("packages") or {})
    cpu_window()
    if spec.get("guard", True):
        # ctypes stays unimportable: `import ctypes` raises ImportError (numpy's optional ctypes import then
        # falls back to None), and removing the None entry makes the next import an audited, blocked event
        sys.modules["ctypes"] = sys.modules["_ctypes"] = None
        for name in _BLOCKED_IMPORTS:  # a module already loaded would import from the cache, unaudited
            if sys.modules.get(name) is not None:
                sys.modules[name] = None
        _install_guard(rlimit_cpu, cpu_hard, max(0, len(phases) - skip))  # one CPU window per phase to run
    # the program's fds 1 and 2 become its own output pipe: from here on nothing it writes can reach the pipe
    # on which the wrappers and this runner report (unshare's "child killed", "sandbox_runner crashed")
    os.dup2(prog_out, 1)
    os.dup2(prog_out, 2)
    os.close(prog_out)
    sys.stdout = sys.stderr = _Sink()  # sys.stdin stays the interpreter's reader of fd 0 (/dev/null)
    prog_ns = {"__name__": "__solution__", "__builtins__": _dict(pristine_builtins)}
    try:
        _exec(prog_code, prog_ns)
        emit({"ev": "loaded", "ok": True})
    except _BaseException as e:
        emit({"ev": "loaded", "ok": False, "err": errstr(e), "mem": _isinst(e, _MemoryError)})
        emit({"ev": "done"})
        _exit(0)
    try:
        test_ns["Solution"] = prog_ns["Solution"]
    except _BaseException:
        pass

    for pi, (name, kind, tests, call, define) in _enumerate(phases):
        if pi < skip:
            continue
        cpu_window()
        emit({"ev": "phase", "p": pi, "name": name})
        if kind == "asserts":
            passed, failures = 0, 0
            for ti, (is_value, code, budget, shape) in _enumerate(tests):
                ok, err, val = False, None, None
                try:
                    if is_value:  # the parent holds the expected value and does the comparison
                        actual = _eval(code, test_ns)
                        if shape:  # nodes -> their values (the parent compares those)
                            actual = flatten(actual, shape, budget, _list, _len, _getattr_obj, _BaseException)
                        if not is_plain(actual, plain_types, budget, _type, seqs, _dict):
                            err = ("NotPlain: answer of type " + _type(actual).__name__[:60]
                                   + " (or too large)")
                        else:
                            val = _repr(actual).encode("utf-8", "surrogatepass").hex()
                            ok = True  # provisional: only means "a value came back"
                    else:
                        _exec(code, test_ns)
                        ok = True
                except _BaseException as e:
                    ok, err = False, errstr(e)
                    if _isinst(e, _MemoryError):
                        err = "MemoryError"
                emit({"ev": "t", "p": pi, "i": ti, "ok": ok, "err": err, "v": val})
                if ok:
                    passed += 1
                else:
                    failures += 1
                    if max_failures is not None and failures >= max_failures:
                        break
            emit({"ev": "end", "p": pi, "passed": passed, "total": _len(tests)})
        else:
            ns = prog_ns
            ok, err = False, None
            try:
                if define is not None:
                    ns = _dict(prog_ns)  # the prompt's test function must not replace the program's own
                    _exec(define, ns)
                _exec(call, ns)
                ok = True
            except _BaseException as e:
                ok, err = False, errstr(e)
            emit({"ev": "t", "p": pi, "i": 0, "ok": ok, "err": err})
            emit({"ev": "end", "p": pi, "passed": 1 if ok else 0, "total": 1})
    emit({"ev": "done"})
    _exit(0)


def _encode_record(rec: dict, _type, _str, _len) -> bytes:
    """Tiny JSON encoder for flat records of str/int/bool/None (ASCII, capped below PIPE_BUF)."""
    parts = []
    for k, v in rec.items():
        t = _type(v)
        if v is None:
            s = "null"
        elif t is bool:
            s = "true" if v else "false"
        elif t is int:
            s = _str(v)
        elif k == "v":  # hex digits only, any length
            s = '"' + v + '"'
        else:
            v = _str(v)[:300] if t is not str else v[:300]
            s = '"' + "".join(c if (" " <= c <= "~" and c != '"' and c != "\\") else "?" for c in v) + '"'
        parts.append('"' + k + '":' + s)
    return ("{" + ",".join(parts) + "}\n").encode("ascii")


def _flatten_nodes(x, shape: str, budget: int, list_t, _len, getattr_obj, base_exc):
    """A linked list's values in order ("list": val, next), or a binary tree's level order with None for a
    missing child and trailing Nones dropped ("tree": val, left, right; LeetCode's serialisation), read from
    each node's attributes (object.__getattribute__: slots, class defaults and properties behave as in the
    setup's helpers); None for anything else, a tree node whose val is None (it would read as a missing
    child), or more than `budget` nodes. The parent compares the values with the expected literal's."""
    if x is None:
        return list_t()
    keys = ("val", "next") if shape == "list" else ("val", "left", "right")
    out, queue, i = list_t(), list_t([x]), 0
    while i < _len(queue):
        node = queue[i]
        i += 1
        if _len(queue) > 2 * budget + 2:
            return None
        if node is None:  # tree only
            out.append(None)
            continue
        try:
            d = [getattr_obj(node, k) for k in keys]  # (val, next) or (val, left, right)
        except base_exc:
            return None
        if shape == "tree" and d[0] is None:
            return None
        out.append(d[0])
        if shape == "list":
            if d[1] is not None:
                queue.append(d[1])
        else:
            queue.append(d[1])
            queue.append(d[2])
    while shape == "tree" and out and out[-1] is None:
        out.pop()
    return out


def _is_plain(x, plain_types, budget, _type, seqs, dict_t) -> bool:
    """Is `x` built only from exact builtin value types, with at most `budget` nodes?

    A correct answer can never be larger than the expected literal written in the test."""
    stack = [x]
    while stack:
        budget -= 1
        if budget < 0:
            return False
        v = stack.pop()
        t = _type(v)
        if t not in plain_types:
            return False
        if t in seqs:
            stack.extend(v)
        elif t is dict_t:
            stack.extend(v.keys())
            stack.extend(v.values())
    return True


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # a runner bug: say so on the real stderr (the parent keeps the head)
        os.write(2, f"sandbox_runner crashed: {type(e).__name__}: {e}\n".encode(errors="replace"))
        os._exit(70)
