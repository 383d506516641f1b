"""scripts/sweep.py: grid expansion, exact pueue invocations (fake `pueue` on PATH), skip/resume on re-run,
the gated probe, the local and Ray backends, and (slow) a real tiny-random sweep through train.py smoke.

    .venv/bin/python -m pytest tests/test_sweep.py -q            # fast tests (~15 s; Ray test ~10 s more)
    .venv/bin/python -m pytest tests/test_sweep.py -q -m slow    # + the real train.py end-to-end sweep

The fast tests run tests/fixtures/fake_train.py (same CLI and run-dir layout as train.py, no torch).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(FIX))
import sweep  # noqa: E402
import summarize  # noqa: E402

PY = sys.executable
FAKES = dict(train_script="tests/fixtures/fake_train.py", extract_script="tests/fixtures/fake_extract.py",
             verify_script="tests/fixtures/fake_verify.py")


def cfg(tmp_path, cls=sweep.SweepConfig, fakes=True, **kw):
    base = dict(name="t", preset="smoke", seeds=(0, 1), arms=("vanilla", "erase", "erase-random"), set=("steps=3",),
                backend="local", out_root=tmp_path / "out", python=PY)
    if fakes:
        base.update(FAKES)
    base.update(kw)
    return cls(**base)


@pytest.fixture
def fake_pueue(tmp_path, monkeypatch):
    """A `pueue` on PATH that records its argv (one JSON list per line) and answers like pueue."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "pueue"
    exe.write_text(f"#!{PY}\nimport runpy, sys\nsys.argv[0] = 'pueue'\nrunpy.run_path({str(FIX / 'fake_pueue.py')!r}, run_name='__main__')\n")
    exe.chmod(0o755)
    log = tmp_path / "pueue.log"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PUEUE_LOG", str(log))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def pueue_lines(out: str) -> list[list[str]]:
    return [shlex.split(ln) for ln in out.splitlines() if ln.startswith("pueue ")]


# ------------------------------------------------------------------------------------------ pueue
def test_queue_full_dry_run_prints_exact_pueue_commands(tmp_path, fake_pueue, monkeypatch, capsys):
    """`queue-full --dry-run` for the full preset on a 2-GPU box: group, parallelism, extract -> verify ->
    the v_hack arms, labels, one CUDA device per slot, and no call to pueue at all."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out_root = tmp_path / "out"
    c = sweep.SweepConfig(name="full", preset="full", seeds=(0, 1, 2), arms=sweep.FULL_ARMS, backend="auto",
                          dry_run=True, out_root=out_root, python="py")
    assert sweep.main(c) == 0
    got = pueue_lines(capsys.readouterr().out)
    assert fake_pueue() == [], "a dry run must not call pueue"

    runs, vh = out_root.resolve() / "runs", out_root.resolve() / "vhack" / "full.safetensors"
    pre = "CUDA_VISIBLE_DEVICES=$PUEUE_WORKER_ID "
    add = ["pueue", "add", "--group", "full", "--working-directory", str(REPO), "--label"]
    want = [["pueue", "group", "add", "full"], ["pueue", "parallel", "2", "-g", "full"],
            add + ["why: v_hack (full.safetensors) for the measure/erase/route arms of sweep full; resolve: if it "
                   "failed the dependent arms fail too: read `pueue log`, fix, re-run the sweep command",
                   "--", pre + f"py extract_vhack_grad.py full --name full --out-dir {vh.parent}"],
            add + ["why: held-out check that full.safetensors separates hack from clean pairs before arms train on "
                   "it; resolve: below threshold -> do not trust erase/route, re-extract (more pairs/steps), delete "
                   "full.safetensors, re-run", "--after", "<id:extract>",
                   "--", pre + f"py scripts/verify_vhack_heldout.py full --vhack {vh}"]]
    for seed in (0, 1, 2):
        for arm in ("vanilla", "erase", "route", "erase-random", "route-random"):
            name = f"full-{arm}-s{seed}"
            label = (f"why: sweep full, preset full, arm {arm}, seed {seed} (fresh); resolve: if it failed read "
                     f"`pueue log` / {runs / name}/log.tsv, fix, re-run the sweep command (it resumes from the last "
                     f"checkpoint)")
            vflag = f" --vhack-path {vh}" if arm in ("erase", "route") else ""
            after = ["--after", "<id:verify>"] if arm in ("erase", "route") else []
            cmd = f"py train.py full --arm {arm} --seed {seed} --run-name {name}{vflag} --out-dir {runs}"
            want.append(add + [label] + after + ["--", pre + cmd])
    assert got == want


def test_pueue_submission_matches_dry_run_and_is_not_repeated(tmp_path, fake_pueue, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    c = cfg(tmp_path, backend="pueue", dry_run=True)
    sweep.main(c)
    dry = pueue_lines(capsys.readouterr().out)
    c.dry_run = False
    assert sweep.main(c) == 0
    real = fake_pueue()
    jobs, _ = sweep.plan_grid(c)
    ids = {j.key: i for i, j in enumerate(jobs)}  # the fake answers 0, 1, 2, ... in submission order
    expect = [[str(ids[a[4:-1]]) if a.startswith("<id:") else a for a in d[1:]] for d in dry]
    assert real[:2] == expect[:2] and real[2] == ["status", "--json"] and real[3:] == expect[2:]
    assert expect[1] == ["parallel", "3", "-g", "t"]
    adds = {ln[-1]: ln for ln in real if ln[0] == "add"}
    erase = next(v for k, v in adds.items() if "--arm erase " in k)
    verify = next(v for k, v in adds.items() if "fake_verify" in k)
    assert erase[erase.index("--after") + 1] == str(ids["verify"])
    assert verify[verify.index("--after") + 1] == str(ids["extract"])
    assert not any("--after" in v for k, v in adds.items() if "--arm vanilla" in k)
    manifest = json.loads((tmp_path / "out/sweeps/t/sweep.json").read_text())
    assert sorted(manifest["runs"]) == sorted(f"t-{a}-s{s}" for a in ("vanilla", "erase", "erase-random") for s in (0, 1))
    # the same sweep again while its tasks are still queued: pueue is asked, nothing is added twice
    n = len(real)
    assert sweep.main(c) == 0
    again = fake_pueue()[n:]
    assert [a[0] for a in again] == ["group", "parallel", "status"], again


@pytest.mark.parametrize("gpus,worker,want", [(["0", "1"], "1", "1"), (["2", "5", "7"], "1", "5"), (["2", "5", "7"], "2", "7")])
def test_cuda_prefix_maps_pueue_slot_to_gpu_in_sh(gpus, worker, want):
    prefix = sweep.cuda_prefix(gpus)
    out = subprocess.run(["sh", "-c", prefix + "sh -c 'echo $CUDA_VISIBLE_DEVICES'"], capture_output=True, text=True,
                         env={**os.environ, "PUEUE_WORKER_ID": worker}).stdout.strip()
    assert out == want
    assert sweep.cuda_prefix([]) == ""


def test_detect_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    assert sweep.detect_gpus() == ["3", "4"]
    assert sweep.detect_gpus("6, 7") == ["6", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.detect_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    smi = tmp_path / "nvidia-smi"  # two GPUs, one split into MIG devices: only GPU lines count
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho '  MIG 3g.40gb Device 0: (UUID: MIG-b)'\n"
                   "echo 'GPU 1: NVIDIA H100 (UUID: GPU-c)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert sweep.detect_gpus() == ["0", "1"]


def test_probe_pueue_dry_run_chains_extract_verify_vanilla_gate(tmp_path, fake_pueue, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    c = sweep.ProbeConfig(name="full", preset="full", arms=sweep.FULL_ARMS, seed=1, backend="pueue", dry_run=True,
                          out_root=tmp_path / "out", python="py")
    assert sweep.main(c) == 0
    adds = [ln for ln in pueue_lines(capsys.readouterr().out) if ln[1] == "add"]
    assert len(adds) == 4
    assert [a[a.index("--after") + 1] if "--after" in a else None for a in adds] == \
        [None, "<id:extract>", "<id:verify>", "<id:full-vanilla-s1>"]
    gate = shlex.split(adds[3][-1])
    assert gate[2:6] == ["probe-full-seed", "1", "--stage", "gate"] and "CUDA_VISIBLE_DEVICES" not in adds[3][-1]
    assert gate[gate.index("--gpus") + 1] == "0,1" and gate[gate.index("--backend") + 1] == "pueue"
    # the gate command parses back into the same sweep
    import tyro
    back = tyro.cli(sweep.Command, args=gate[2:])
    assert (back.seed, back.stage, back.arms, back.seeds, back.min_hack) == (1, "gate", sweep.FULL_ARMS, (0, 1, 2), 0.2)


# ------------------------------------------------------------------------------------------ local
def test_local_sweep_skips_done_and_resumes_interrupted(tmp_path, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))
    monkeypatch.setenv("FAKE_TRAIN_CRASH", "t-erase-s1:2")
    c = cfg(tmp_path)
    assert sweep.main(c) == 1  # one run crashed
    runs = tmp_path / "out" / "runs"
    assert (runs / "t-erase-s1" / "ckpt" / "latest").read_text() == "step_000002"
    assert not (runs / "t-erase-s1" / "DONE").exists()
    assert (tmp_path / "out/vhack/smoke.safetensors").exists()
    first = [json.loads(x) for x in calls.read_text().splitlines()]
    assert len(first) == 6 and not any("--resume" in a for a in first)

    monkeypatch.delenv("FAKE_TRAIN_CRASH")
    assert sweep.main(c) == 0
    second = [json.loads(x) for x in calls.read_text().splitlines()][6:]
    assert len(second) == 1 and second[0][second[0].index("--resume") + 1] == str(runs / "t-erase-s1")
    steps = [ln.split("\t")[0] for ln in (runs / "t-erase-s1" / "log.tsv").read_text().splitlines()[1:]]
    assert steps == ["0", "1", "2"], "resumed from the step-2 checkpoint, not restarted"
    subs = json.loads((tmp_path / "out/sweeps/t/sweep.json").read_text())["submissions"]
    assert "extract" in subs[0]["jobs"] and subs[1]["jobs"] == ["t-erase-s1"]  # v_hack existed: not re-extracted

    assert sweep.main(c) == 0  # finished sweep: nothing submitted
    assert len(calls.read_text().splitlines()) == 7


def test_config_dir_without_checkpoint_is_resumed_in_place(tmp_path, capsys):
    c = cfg(tmp_path, arms=("vanilla",), seeds=(0,), dry_run=True)
    d = tmp_path / "out/runs/t-vanilla-s0"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")  # train.py refuses a fresh start over this
    sweep.main(c)
    out = capsys.readouterr().out
    assert f"--resume {d.resolve()}" in out and "restarts it from step 0" in out


def test_changed_command_for_an_existing_run_is_refused(tmp_path):
    assert sweep.main(cfg(tmp_path, arms=("vanilla",), seeds=(0,))) == 0
    with pytest.raises(ValueError, match="(?s)different command.*another --name"):
        sweep.main(cfg(tmp_path, arms=("vanilla",), seeds=(0,), set=("steps=4",)))


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="--arms: unknown arm 'erasee'"):
        sweep.plan_grid(cfg(tmp_path, arms=("erasee",)))
    with pytest.raises(ValueError, match="--set 'steps3'"):
        sweep.overrides_to_args(("steps3",))
    assert sweep.overrides_to_args(("eval_every=5", "eval_at_end=false", "x=true")) == \
        ["--eval-every", "5", "--no-eval-at-end", "--x"]
    jobs, _ = sweep.plan_grid(cfg(tmp_path, arms=("projected",), seeds=(0,)))
    assert [j.run["arm"] for j in jobs if j.run] == ["erase"]


def test_grids_and_vhack_arms_match_the_hand_written_lists(tmp_path):
    """The sweep grids (from arms.ARMS) against lists written out here, and v_hack only for the v_hack arms."""
    assert sweep.FULL_ARMS == ("vanilla", "erase", "route", "erase-random", "route-random")
    assert set(sweep.QUEUE_FULL_ARMS) == set(sweep.FULL_ARMS) | {
        "gate-route", "gate-route-random", "gate-random", "vanilla-2x", "shrinkage", "am", "oracle-penalty"}
    jobs, _ = sweep.plan_grid(cfg(tmp_path, arms=("vanilla", "erase", "erase-random", "shrinkage"), seeds=(0,)))
    with_vhack = {j.run["arm"] for j in jobs if j.run and "--vhack-path" in j.argv}
    assert with_vhack == {"erase", "shrinkage"}


@pytest.mark.parametrize("scale,rc", [(0.0, 3), (1.0, 0)])
def test_probe_gate_local(tmp_path, monkeypatch, capsys, scale, rc):
    """vanilla that does not hack stops the sweep with a clear message; one that hacks releases the rest."""
    monkeypatch.setenv("FAKE_TRAIN_HACK_SCALE", str(scale))
    c = cfg(tmp_path, cls=sweep.ProbeConfig, seed=1, seeds=(0, 1), arms=("vanilla", "erase"))
    assert sweep.main(c) == rc
    out = capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "out/runs").iterdir())
    ev = json.loads((tmp_path / "out/runs/t-vanilla-s1/eval.json").read_text())["modes"]["deploy"]["hack_strict"]
    if rc:
        assert ev < 0.2 and "GATE STOP" in out.err and f"= {ev:.3f} < 0.2" in out.err
        assert runs == ["t-vanilla-s1"]
    else:
        assert ev >= 0.2 and "GATE PASS" in out.out
        assert runs == ["t-erase-s0", "t-erase-s1", "t-vanilla-s0", "t-vanilla-s1"]
        assert all((tmp_path / "out/runs" / r / "DONE").exists() for r in runs)
        calls = (tmp_path / "out/sweeps/t/sweep.json").read_text()
        assert "t-vanilla-s1" in calls


# -------------------------------------------------------------------------------------------- ray
def check_summary_against_runs(out_root: Path, name: str, arms, seeds) -> None:
    """results.tsv final deploy rows == numpy over the runs' eval.json; the train curves match log.tsv."""
    summarize.main(summarize.Config(sweep=name, out_root=out_root, n_boot=500))
    d = out_root / "sweeps" / name
    with open(d / "results.tsv") as f:
        tab = list(csv.DictReader(f, delimiter="\t"))
    for arm in arms:
        for metric in ("hack_strict", "gt_pass"):
            vals = [json.loads((out_root / "runs" / f"{name}-{arm}-s{s}" / "eval.json").read_text())["modes"]["deploy"][metric]
                    for s in seeds]
            row = [r for r in tab if (r["arm"], r["mode"], r["metric"], r["final"]) == (arm, "deploy", metric, "True")]
            assert len(row) == 1, (arm, metric)
            lo, mean, hi = (float(row[0][k]) for k in ("ci_lo", "mean", "ci_hi"))
            assert mean == pytest.approx(np.mean(vals), abs=1e-5)
            assert min(vals) - 1e-9 <= lo <= mean <= hi <= max(vals) + 1e-9
    for png in ("hack_vs_step.png", "pass_vs_step.png", "hack_vs_pass.png", "projection_vs_step.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"
    assert "Missing or incomplete runs" in (d / "results.md").read_text()


def test_ray_backend_local_cluster(tmp_path):
    pytest.importorskip("ray", reason="ray is the optional extra: EXTRAS=dev,ray bash scripts/setup.sh")
    c = cfg(tmp_path, backend="ray", ray_address="local", gpus_per_run=0.0)
    assert sweep.main(c) == 0
    runs = tmp_path / "out/runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"t-{a}-s{s}" for a in ("vanilla", "erase", "erase-random") for s in (0, 1))
    assert all((p / "DONE").exists() for p in runs.iterdir())
    check_summary_against_runs(tmp_path / "out", "t", ("vanilla", "erase", "erase-random"), (0, 1))


def test_local_backend_then_summarize(tmp_path):
    assert sweep.main(cfg(tmp_path)) == 0
    check_summary_against_runs(tmp_path / "out", "t", ("vanilla", "erase", "erase-random"), (0, 1))


# ------------------------------------------------------------------------------------------- slow
def train_smoke_ready() -> bool:
    p = subprocess.run([PY, "train.py", "smoke", "--help"], cwd=REPO, capture_output=True, text=True)
    return p.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_real_smoke_sweep_end_to_end(tmp_path, backend):
    """2 seeds x 3 arms x 3 steps of the real train.py smoke preset (tiny-random, CPU), then summarize."""
    if not train_smoke_ready():
        pytest.skip("train.py smoke --help fails: train.py is not runnable yet")
    if backend == "ray":
        pytest.importorskip("ray", reason="ray is the optional extra")
    if not list((REPO / "out/pools/synthetic-tiny-random").glob("step_*.jsonl.gz")):  # the smoke preset's pool
        subprocess.run([PY, "scripts/make_synthetic_pool.py"], cwd=REPO, check=True)
    arms = ("vanilla", "erase-random", "route-random")  # no v_hack needed
    c = cfg(tmp_path, fakes=False, arms=arms, set=("steps=3",), backend=backend, ray_address="local", gpus_per_run=0.0)
    assert sweep.main(c) == 0, [p.read_text()[-2000:] for p in (tmp_path / "out/sweeps/t/logs").glob("*.log")]
    check_summary_against_runs(tmp_path / "out", "t", arms, (0, 1))
    log = (tmp_path / "out/runs/t-vanilla-s0/log.tsv").read_text().splitlines()
    assert len(log) == 4  # header + 3 steps
    assert sweep.main(c) == 0  # finished: nothing runs again
