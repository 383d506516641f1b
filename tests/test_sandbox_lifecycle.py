"""Sandboxes die with their trainer, Ctrl-C / close() stop grading at once, leftovers are swept, and a
sandbox killed from outside is infra_error (issue 20).

    .venv/bin/python -m pytest tests/test_sandbox_lifecycle.py -q

The "trainer" is a small Python subprocess that grades a program sleeping for an hour with SIGTERM
ignored; processes are found by the owner tag (pid + start time) every sandbox carries.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import rewards

REPO = Path(__file__).resolve().parents[1]
SLEEPER = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(3600)\n"
TRAINER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import problems, rewards
    setup = problems.load_benchmark_test()[0].setup_code
    p = problems.Problem(id=1, difficulty="Easy", func_name="Solution().add", question="", starter_code="",
                         gt_tests=("assert Solution().add(a = 1, b = 2) == 3",), setup_code=setup,
                         canonical_solution="", prompt=(), hint="none")
    resp = ("```python\\n" + {program!r}
            + "class Solution:\\n    def add(self, a, b):\\n        return a + b\\n```")
    g = rewards.Grader(workers=2, timeout_s=3600.0, wall_timeout_s=3600.0, startup_s=60.0)
    print("grading", flush=True)
    if {mode!r} == "grade_many":
        g.grade_many([(p, resp)] * {n})
    else:  # train.py's pattern: a future from submit_many, no `with`, no close() on the way out
        g.submit_many([(p, resp)] * {n}).result()
""")


def _start_trainer(tmp_path, mode="grade_many", n=1) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.format(repo=str(REPO), program=SLEEPER, mode=mode, n=n))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(50):  # the tag needs the child's start time, readable once it exists
        try:
            return proc, rewards.owner_tag(proc.pid)
        except OSError:
            time.sleep(0.01)
    raise AssertionError("trainer subprocess did not start")


def _wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def _runners(tag: str) -> list[int]:
    """Sandbox runner processes (not the setpriv/unshare wrappers) of the owner `tag`."""
    out = []
    for pid in rewards.marked_processes(tag):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if b"python" in argv0:
            out.append(pid)
    return out


@pytest.mark.skipif(bool(rewards.detect_sandbox().unshare) and not rewards.detect_sandbox().pdeathsig,
                    reason="setpriv --pdeathsig unavailable: unshare wrappers outlive the trainer "
                           "until the next sweep")
def test_sigkill_of_the_trainer_kills_its_sandbox_tree(tmp_path):
    proc, tag = _start_trainer(tmp_path)
    try:
        assert _wait_for(lambda: _runners(tag), 90), "no sandbox started"
        time.sleep(0.5)  # let the program reach its sleep
        assert rewards.marked_processes(tag)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        gone = _wait_for(lambda: not rewards.marked_processes(tag), 5)
        assert gone, f"sandbox processes outlived their SIGKILLed trainer: {rewards.marked_processes(tag)}"
    finally:
        for pid in rewards.marked_processes(tag):
            os.kill(pid, signal.SIGKILL)
        proc.kill()


@pytest.mark.parametrize("mode", ["grade_many", "submit_many"])
def test_ctrl_c_stops_grading_within_2_s_and_leaves_nothing(tmp_path, mode):
    proc, tag = _start_trainer(tmp_path, mode=mode, n=8)  # 2 workers: 2 live sandboxes, 6 queued
    try:
        assert _wait_for(lambda: len(_runners(tag)) == 2, 90), f"sandboxes did not start ({mode})"
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        stopped = time.monotonic() - t0
        assert proc.returncode is not None and stopped <= 2.0, (
            f"grader still running {stopped:.1f} s after Ctrl-C ({mode}); sandboxes: "
            f"{rewards.marked_processes(tag)}")
        assert _wait_for(lambda: not rewards.marked_processes(tag), 1.0), rewards.marked_processes(tag)
        assert b"KeyboardInterrupt" in proc.stderr.read(), "the interrupt should propagate to the caller"
    finally:
        for pid in rewards.marked_processes(tag):
            os.kill(pid, signal.SIGKILL)
        proc.kill()


def test_close_cancels_queued_runs_and_kills_live_ones():
    import problems

    setup = problems.load_benchmark_test()[0].setup_code
    p = problems.Problem(id=1, difficulty="Easy", func_name="Solution().add", question="", starter_code="",
                         gt_tests=("assert Solution().add(a = 1, b = 2) == 3",), setup_code=setup,
                         canonical_solution="", prompt=(), hint="none")
    resp = "```python\n" + SLEEPER + "class Solution:\n    def add(self, a, b):\n        return a + b\n```"
    g = rewards.Grader(workers=2, timeout_s=3600.0, wall_timeout_s=3600.0, startup_s=60.0)
    tag = rewards.owner_tag()
    before = set(rewards.marked_processes(tag))
    fut = g.submit_many([(p, resp)] * 6)
    assert _wait_for(lambda: len(set(_runners(tag)) - before) == 2, 90), "sandboxes did not start"
    t0 = time.monotonic()
    g.close()
    assert time.monotonic() - t0 <= 2.0, f"close() took {time.monotonic() - t0:.1f} s"
    rs = fut.result(5)
    assert all(r["infra_error"] and r["infra_cause"] == "cancelled" for r in rs), [r["error"] for r in rs]
    assert _wait_for(lambda: not set(rewards.marked_processes(tag)) - before, 1.0)


def test_startup_sweep_kills_leftovers_of_dead_owners_only():
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    dead_tag = rewards.owner_tag(dead.pid)
    dead.wait()
    code = "import time; time.sleep(3600)"
    orphan = subprocess.Popen([sys.executable, "-c", code, dead_tag], start_new_session=True)
    mine = subprocess.Popen([sys.executable, "-c", code, rewards.owner_tag()], start_new_session=True)
    try:
        assert _wait_for(lambda: orphan.pid in rewards.marked_processes(dead_tag), 10)
        assert rewards.sweep_leftovers() >= 1
        orphan.wait(5)
        assert orphan.returncode == -signal.SIGKILL
        assert mine.poll() is None, "the sweep must not touch sandboxes of a live owner"
    finally:
        orphan.kill()
        mine.kill()
        mine.wait()


def _problem():
    import problems

    setup = problems.load_benchmark_test()[0].setup_code
    return problems.Problem(id=1, difficulty="Easy", func_name="Solution().add", question="", starter_code="",
                            gt_tests=("assert Solution().add(a = 1, b = 2) == 3",), setup_code=setup,
                            canonical_solution="", prompt=(), hint="none")


@pytest.mark.parametrize("target", ["runner", "wrapper"])
def test_sandbox_killed_from_outside_is_infra_error(target):
    resp = "```python\n" + SLEEPER + "class Solution:\n    def add(self, a, b):\n        return a + b\n```"
    tag = rewards.owner_tag()
    with rewards.Grader(workers=1, timeout_s=3600.0, wall_timeout_s=3600.0, startup_s=60.0) as g:
        before = set(rewards.marked_processes(tag))
        fut = g.submit_many([(_problem(), resp)])
        assert _wait_for(lambda: set(_runners(tag)) - before, 90), "sandbox did not start"
        runner = (set(_runners(tag)) - before).pop()
        time.sleep(1.0)  # into the program's sleep
        wrapper = int(Path(f"/proc/{runner}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        victim = runner if target == "runner" else wrapper
        assert victim in rewards.marked_processes(tag), (
            "the victim must be one of this grader's sandbox processes")
        os.kill(victim, signal.SIGKILL)
        r = fut.result(30)[0]
    assert (r["status"], r["infra_error"], r["infra_cause"]) == ("infra_error", True, "killed"), r
    assert "killed from outside by SIGKILL" in r["error"], r["error"]
    # and the trainer masks it (valid = False)
    assert rewards.compute_reward(r, rewards.RewardConfig()) == 0.0


def test_own_cpu_hard_limit_sigkill_is_a_timeout_not_infra_error():
    # SIGXCPU ignored: the kernel SIGKILLs at the hard limit
    # (4 CPU-s here) long before the 120 s wall deadline
    resp = ("```python\nimport signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"
            "class Solution:\n    def add(self, a, b):\n        return a + b\n```")
    with rewards.Grader(workers=1, timeout_s=0.5, wall_timeout_s=120.0) as g:
        r = g.grade(_problem(), resp)
    assert (r["status"], r["infra_error"], r["infra_cause"]) == ("timeout", False, None), r


def test_close_in_a_forked_child_leaves_the_parents_sandboxes_alone():
    # a fork-started worker exits through threading's at-exit hooks,
    # which run close() on its copy of the Grader
    resp = "```python\n" + SLEEPER + "class Solution:\n    def add(self, a, b):\n        return a + b\n```"
    tag = rewards.owner_tag()
    with rewards.Grader(workers=1, timeout_s=3600.0, wall_timeout_s=3600.0, startup_s=60.0) as g:
        before = set(rewards.marked_processes(tag))
        fut = g.submit_many([(_problem(), resp)])
        assert _wait_for(lambda: set(_runners(tag)) - before, 90), "sandbox did not start"
        live = set(rewards.marked_processes(tag)) - before
        pid = os.fork()
        if pid == 0:  # child: close() explicitly, then exit; either must leave the parent's sandbox running
            try:
                g.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.5)
        assert live <= set(rewards.marked_processes(tag)), (
            "a forked child's close() killed the parent's sandbox")
        assert not fut.done()
    r = fut.result(10)[0]
    assert r["infra_cause"] == "cancelled", r  # the parent's own close() did stop it
