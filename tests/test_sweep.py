"""scripts/sweep.py: grid expansion, exact pueue invocations (fake `pueue` on PATH), skip/resume on re-run,
the gated probe, the local and Ray backends, and (slow) a real tiny-random sweep through train.py smoke.

    .venv/bin/python -m pytest tests/test_sweep.py -q            # fast tests (~15 s; Ray test ~10 s more)
    .venv/bin/python -m pytest tests/test_sweep.py -q -m slow    # + the real train.py end-to-end sweep

The fast tests run tests/fixtures/fake_train.py (same CLI and run-dir layout as train.py, no torch).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tyro

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(FIX))
import sweep  # noqa: E402
import summarize  # noqa: E402
import arms  # noqa: E402  (after sweep: it puts the repo on sys.path)
import stats  # noqa: E402
import cli  # noqa: E402

PY = sys.executable
FAKES = dict(train_script="tests/fixtures/fake_train.py", extract_script="tests/fixtures/fake_extract.py",
             verify_script="tests/fixtures/fake_verify.py")


def cfg(tmp_path, cls=sweep.SweepConfig, fakes=True, **kw):
    base = dict(name="t", preset="smoke", seeds=(0, 1), arms=("vanilla", "erase", "erase-random"),
                set=("steps=3",), backend="local", out_root=tmp_path / "out", python=PY, sec_per_step=1.0,
                # the control inside this small grid (erase-matched is not in it)
                primary_controls=("vanilla",))
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
    exe.write_text(f"#!{PY}\nimport runpy, sys\nsys.argv[0] = 'pueue'\n"
                   f"runpy.run_path({str(FIX / 'fake_pueue.py')!r}, run_name='__main__')\n")
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
                          dry_run=True, out_root=out_root, python="py", sec_per_step=60.0)
    assert sweep.main(c) == 0
    got = pueue_lines(capsys.readouterr().out)
    assert fake_pueue() == [], "a dry run must not call pueue"

    runs, vh = out_root.resolve() / "runs", out_root.resolve() / "vhack" / "full.safetensors"
    pre = "CUDA_VISIBLE_DEVICES=$PUEUE_WORKER_ID "
    add = ["pueue", "add", "--group", "full", "--working-directory", str(REPO), "--label"]
    want = [["pueue", "group", "add", "full"], ["pueue", "parallel", "2", "-g", "full"],
            add + ["why: v_hack (full.safetensors) for the measure/erase/route arms of sweep full; resolve: "
                   "if it failed the dependent arms fail too: read `pueue log`, fix, "
                   "re-run the sweep command",
                   "--", pre + f"py extract_vhack_grad.py full --name full --out-dir {vh.parent}"],
            add + ["why: held-out check that full.safetensors separates hack from clean pairs before arms "
                   "train on it; resolve: below threshold -> do not trust erase/route, re-extract "
                   "(more pairs/steps), delete full.safetensors, re-run", "--after", "<id:extract>",
                   "--", pre + f"py scripts/verify_vhack_heldout.py full --vhack {vh}"]]
    for seed in (0, 1, 2):
        for arm in ("vanilla", "erase", "route", "erase-random", "erase-matched", "route-random"):
            name = f"full-{arm}-s{seed}"
            label = (f"why: sweep full, preset full, arm {arm}, seed {seed} (fresh); resolve: "
                     f"if it failed read `pueue log` / {runs / name}/log.tsv, fix, re-run the sweep command "
                     f"(it resumes from the last checkpoint)")
            vflag = f" --vhack-path {vh}"  # every arm measures with v_hack; the vhack arms also edit with it
            after = ["--after",
                     "<id:verify>" if arm in ("erase", "route", "erase-matched") else "<id:extract>"]
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
    for k, v in adds.items():
        # vanilla only measures with v_hack: it waits for the extraction, not the verdict
        if "--arm vanilla" in k:
            assert v[v.index("--after") + 1] == str(ids["extract"]), v
    manifest = json.loads((tmp_path / "out/sweeps/t/sweep.json").read_text())
    assert sorted(manifest["runs"]) == sorted(f"t-{a}-s{s}" for a in ("vanilla", "erase", "erase-random")
                                              for s in (0, 1))
    # the same sweep again while its tasks are still queued: pueue is asked, nothing is added twice
    n = len(real)
    assert sweep.main(c) == 0
    again = fake_pueue()[n:]
    assert [a[0] for a in again] == ["group", "parallel", "status"], again


@pytest.mark.parametrize("gpus,worker,want",
                         [(["0", "1"], "1", "1"), (["2", "5", "7"], "1", "5"), (["2", "5", "7"], "2", "7")])
def test_cuda_prefix_maps_pueue_slot_to_gpu_in_sh(gpus, worker, want):
    prefix = sweep.cuda_prefix(gpus)
    out = subprocess.run(["sh", "-c", prefix + "sh -c 'echo $CUDA_VISIBLE_DEVICES'"], capture_output=True,
                         text=True, env={**os.environ, "PUEUE_WORKER_ID": worker}).stdout.strip()
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
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\n"
                   "echo '  MIG 3g.40gb Device 0: (UUID: MIG-b)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-c)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert sweep.detect_gpus() == ["0", "1"]


def test_probe_pueue_dry_run_chains_extract_verify_vanilla_gate(tmp_path, fake_pueue, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    c = sweep.ProbeConfig(name="full", preset="full", arms=sweep.FULL_ARMS, seed=100, backend="pueue",
                          dry_run=True, out_root=tmp_path / "out", python="py", sec_per_step=60.0)
    assert sweep.main(c) == 0
    adds = [ln for ln in pueue_lines(capsys.readouterr().out) if ln[1] == "add"]
    assert len(adds) == 4
    assert [a[a.index("--after") + 1] if "--after" in a else None for a in adds] == \
        [None, "<id:extract>", "<id:verify>", "<id:full-vanilla-s100>"]
    gate = shlex.split(adds[3][-1])
    assert (gate[2:6] == ["probe-full-seed", "100", "--stage", "gate"]
            and "CUDA_VISIBLE_DEVICES" not in adds[3][-1])
    assert gate[gate.index("--gpus") + 1] == "0,1" and gate[gate.index("--backend") + 1] == "pueue"
    # the gate command parses back into the same sweep (and so rebuilds the same prereg)
    import tyro
    back = tyro.cli(sweep.Command, args=gate[2:])
    assert (back.seed, back.stage, back.arms, back.seeds, back.min_hack) == (
        100, "gate", sweep.FULL_ARMS, (0, 1, 2), 0.2)
    assert back.primary_controls == sweep.prereg_arms(("erase-matched", "vanilla"))
    assert not (tmp_path / "out/sweeps/full/prereg.json").exists(), "a dry run writes nothing"


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
    # v_hack existed: not re-extracted
    assert "extract" in subs[0]["jobs"] and subs[1]["jobs"] == ["t-erase-s1"]

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
    """The sweep grids (from arms.ARMS) against lists written out here; v_hack for every arm once the grid has
    a v_hack arm (the others measure with it), waiting for verification only in the arms that edit with it."""
    assert sweep.FULL_ARMS == ("vanilla", "erase", "route", "erase-random", "erase-matched", "route-random")
    assert set(sweep.ALL_GRID_ARMS) == set(sweep.FULL_ARMS) | {
        "gate-route", "gate-route-random", "gate-random", "vanilla-2x", "shrinkage", "am", "oracle-penalty",
        "route-matched"}
    want = ("vanilla", "erase", "erase-random", "erase-matched")  # queue-full: the preregistered arms only
    assert sweep.QUEUE_FULL_ARMS == want
    default = tyro.cli(sweep.Command, args=["queue-full"])
    assert (default.arms, default.seeds, default.pilot_seed) == (want, (0, 1, 2), 100)
    jobs, _ = sweep.plan_grid(cfg(tmp_path,
                                  arms=("vanilla", "erase", "erase-random", "shrinkage"), seeds=(0,)))
    with_vhack = {j.run["arm"] for j in jobs if j.run and "--vhack-path" in j.argv}
    assert with_vhack == {"vanilla", "erase", "erase-random", "shrinkage"}
    after_verify = {j.run["arm"] for j in jobs if j.run and j.after == ("verify",)}
    assert after_verify == {"erase", "shrinkage"}
    jobs, _ = sweep.plan_grid(cfg(tmp_path, arms=("vanilla", "erase-random"), seeds=(0,)))
    assert not any("--vhack-path" in j.argv for j in jobs) and not any(j.kind == "extract" for j in jobs)


@pytest.mark.parametrize("scale,rc", [(0.0, 3), (1.0, 0)])
def test_probe_gate_local(tmp_path, monkeypatch, capsys, scale, rc):
    """vanilla that does not hack stops the sweep with a clear message; one that hacks releases the rest."""
    monkeypatch.setenv("FAKE_TRAIN_HACK_SCALE", str(scale))
    c = cfg(tmp_path, cls=sweep.ProbeConfig, seed=7, seeds=(0, 1), arms=("vanilla", "erase"))
    assert sweep.main(c) == rc
    out = capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "out/runs").iterdir())
    ev = json.loads(
        (tmp_path / "out/runs/t-vanilla-s7/eval.json").read_text())["modes"]["deploy"]["hack_strict"]
    pre = json.loads((tmp_path / "out/sweeps/t/prereg.json").read_text())
    assert pre["pilot"]["seed"] == 7 and pre["seeds"] == [0, 1] and "seed 7" in pre["pilot"]["rule"]
    if rc:
        assert ev < 0.2 and "GATE STOP" in out.err and f"= {ev:.3f} < 0.2" in out.err
        assert runs == ["t-vanilla-s7"]
    else:
        assert ev >= 0.2 and "GATE PASS" in out.out
        assert runs == ["t-erase-s0", "t-erase-s1", "t-vanilla-s0", "t-vanilla-s1", "t-vanilla-s7"]
        assert all((tmp_path / "out/runs" / r / "DONE").exists() for r in runs)
        man = json.loads((tmp_path / "out/sweeps/t/sweep.json").read_text())
        assert "t-vanilla-s7" in man["runs"] and man["pilot_seed"] == 7
        # the pilot seed is in no comparison
        summarize.main(summarize.Config(sweep="t", out_root=tmp_path / "out"))
        st = {r["name"]: r["status"]
              for r in csv.DictReader(open(tmp_path / "out/sweeps/t/runs.tsv"), delimiter="\t")}
        assert st["t-vanilla-s7"] == "pilot"


def test_pilot_seed_inside_the_sweep_is_refused(tmp_path):
    with pytest.raises(sweep.UserError, match="pilot seed 1 is one of the sweep's --seeds 0 1.*seed 100"):
        sweep.main(cfg(tmp_path, cls=sweep.ProbeConfig, seed=1, seeds=(0, 1), arms=("vanilla", "erase")))
    assert not (tmp_path / "out/runs").exists()


# ------------------------------------------------------------------------- prereg, grid and budget
def test_prereg_is_written_before_the_first_run(tmp_path):
    assert sweep.main(cfg(tmp_path, seeds=(0, 1, 2))) == 0
    pre_path = tmp_path / "out/sweeps/t/prereg.json"
    pre = json.loads(pre_path.read_text())
    assert pre["arms"] == ["vanilla", "erase", "erase-random"] and pre["seeds"] == [0, 1, 2]
    # erase-matched: not yet
    assert pre["primary"]["method"] == "erase" and pre["primary"]["controls"] == ["vanilla"]
    assert (pre["pilot"]["seed"] == 100 and pre["pilot"]["in_comparisons"] is False
            and pre["preset"] == "smoke")
    starts = [(tmp_path / "out/runs" / f"t-{a}-s{s}" / "config.json").stat().st_mtime
              for a in pre["arms"] for s in pre["seeds"]]
    assert pre_path.stat().st_mtime <= min(starts)
    assert stats.prereg_valid(pre_path,
                              [tmp_path / "out/runs" / p for p in os.listdir(tmp_path / "out/runs")])[0]
    man = json.loads((tmp_path / "out/sweeps/t/sweep.json").read_text())
    assert man["prereg_sha256"] == stats.file_sha256(pre_path)  # summarize checks the prereg against it
    # the same sweep again keeps the file; a changed design is refused, naming the fix
    before = pre_path.read_text()
    assert sweep.main(cfg(tmp_path, seeds=(0, 1, 2))) == 0 and pre_path.read_text() == before
    with pytest.raises(cli.UserError, match="different preregistration.*another sweep --name"):
        sweep.main(cfg(tmp_path, seeds=(0, 1, 2), primary_method="erase-random"))


def test_queue_vanilla_preregisters_the_full_grid(tmp_path):
    """queue-vanilla submits vanilla only but preregisters the grid it belongs to, so queue-full later finds
    the same prereg.json (and keeps its earlier timestamp)."""
    root = ["--out-root", str(tmp_path), "--sec-per-step", "1"]
    _, van, _ = sweep.prepare(tyro.cli(sweep.Command, args=["queue-vanilla", *root]))
    _, full, _ = sweep.prepare(tyro.cli(sweep.Command, args=["queue-full", *root]))
    strip = lambda d: {k: v for k, v in d.items() if k not in ("created_at", "git_sha")}  # noqa: E731
    assert strip(van) == strip(full) and van["arms"] == list(sweep.QUEUE_FULL_ARMS)


def write_bench(path: Path, t_step: float, t_gen: float, date: str, **config) -> None:
    """A scripts/bench_step.py --json record at the smoke preset's shape (train.py PRESETS['smoke'])."""
    c = dict(shape="tiny", rollouts=16, group_size=4, max_new_tokens=48, grad_checkpointing=False,
             fused_adapter=False, gen_len="typical") | config
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": date, "device_name": "FakeGPU", "config": c, "t_step": t_step,
                                "t_generate": t_gen}))


def test_dry_run_prints_prereg_round_robin_and_a_measured_budget(tmp_path, capsys):
    """Smoke preset + --set steps=3: one run = 3 steps x 36 s + 1 final eval x 4 problems x 1 sample x
    (16 s / 16 rollouts) = 112 s; a round of 3 arms = 336 s = 0.0933 GPU-h. A budget of 0.2 keeps 2 rounds."""
    bench = tmp_path / "out" / "bench"
    write_bench(bench / "a_old.json", 100.0, 50.0, "2026-01-01 00:00:00")
    write_bench(bench / "b_new.json", 36.0, 16.0, "2026-06-01 00:00:00")  # the newest match wins
    write_bench(bench / "c_other.json", 1.0, 1.0, "2027-01-01 00:00:00", shape="qwen3-4b")  # another shape
    # preset is unfused
    write_bench(bench / "d_fused.json", 2.0, 1.0, "2027-01-01 00:00:00", fused_adapter=True)
    # the preset's shape at the longest lengths: not a sweep's typical step
    write_bench(bench / "f_max.json", 3.0, 1.0, "2027-01-01 00:00:00", gen_len="max")
    (bench / "e_broken.json").write_text("{")
    c = cfg(tmp_path, seeds=(0, 1, 2), sec_per_step=0.0, dry_run=True, budget_gpu_hours=0.2)
    assert sweep.main(c) == 0
    out = capsys.readouterr().out
    assert f"# step time source: measured: {bench / 'b_new.json'} (FakeGPU, 2026-06-01 00:00:00" in out
    assert ("# one run: 3 steps x 36.0 s/step = 0.03 h + 1 evals x 4 completions x 1.000 s = 0.00 h "
            "= 0.03 GPU-h") in out
    assert ("# budget 0.2 GPU-h: keeps 2 of 3 complete rounds (seeds 0, 1); DROPPED 3 runs: t-vanilla-s2, "
            "t-erase-s2, t-erase-random-s2") in out
    assert "# GPU-hours: 6 runs x 3 steps x 36.0 s/step (+ evals) = 0.2 GPU-h (budget 0.2)" in out
    assert "no comparison can reach one-sided p <= 0.05" in out  # 2 seeds per arm
    order = [ln for ln in out.splitlines() if ln.startswith("#   seed ")]
    assert order == ["#   seed 0: t-vanilla-s0 t-erase-s0 t-erase-random-s0",
                     "#   seed 1: t-vanilla-s1 t-erase-s1 t-erase-random-s1"]
    trains = [ln.split()[2] for ln in out.splitlines() if ln.startswith("# train ")]
    assert trains == ["t-vanilla-s0", "t-erase-s0", "t-erase-random-s0", "t-vanilla-s1", "t-erase-s1",
                      "t-erase-random-s1"]
    assert '#   seeds: [0, 1]' in out and '#   pilot: {"arm": "vanilla", "seed": 100' in out
    assert not (tmp_path / "out/sweeps/t/prereg.json").exists()
    # a budget below one round: one line naming the flag
    with pytest.raises(ValueError, match="--budget-gpu-hours 0.05: one round of 3 runs needs 0.1 GPU-h"):
        sweep.main(dataclasses.replace(c, budget_gpu_hours=0.05))


def test_budget_without_a_step_time_names_the_fix(tmp_path):
    c = cfg(tmp_path, preset="smollm", sec_per_step=0.0, budget_gpu_hours=1.0, dry_run=True)
    with pytest.raises(ValueError,
                       match="--budget-gpu-hours needs a step time: no analytic shape.*--sec-per-step"):
        sweep.main(c)


def test_preset_fields_read_train_py_without_importing_it():
    p = sweep.preset_fields("full", ("steps=50", "fused_adapter=true"))
    assert (p["model"], p["rollouts_per_step"], p["group_size"], p["max_new_tokens"]) == (
        "Qwen/Qwen3-4B", 256, 16, 1536)
    # lr: the default
    assert (p["steps"], p["fused_adapter"], p["eval_every"], p["lr"]) == (50, True, 50, 2e-3)
    with pytest.raises(ValueError, match="--preset 'nope'"):
        sweep.preset_fields("nope")
    # a typo, a value out of train.py's RANGES, a non-boolean boolean, no '=': one line each, at submission
    for item, needle in (("stepz=3", "no field 'stepz' (did you mean steps?)"),
                         ("steps=-3", "out of range: train.py needs steps >=1"),
                         ("top_p=1.5", "needs top_p (0,1]"), ("fused_adapter=yes", "takes true or false"),
                         ("steps", "need FIELD=VALUE")):
        with pytest.raises(cli.UserError, match=re.escape(needle)):
            sweep.preset_fields("full", (item,))


def test_bad_set_stops_the_sweep_before_anything_runs(tmp_path, capsys):
    """`--set` is checked when the sweep is planned, not when each job starts; the plan names its backend."""
    assert sweep.cli(["grid", "--name", "bad", "--out-root", str(tmp_path), "--dry-run", "--set",
                      "stepz=3"]) == 2
    assert not (tmp_path / "sweeps" / "bad").exists()
    assert sweep.main(cfg(tmp_path, dry_run=True)) == 0
    assert "# backend: local" in capsys.readouterr().out


def test_analytic_estimate_is_labelled(tmp_path, capsys):
    """No bench json: bench_step's analytic model at the smoke preset's tiny shape (meta device,
    no weights)."""
    assert sweep.main(cfg(tmp_path, sec_per_step=0.0, dry_run=True)) == 0
    out = capsys.readouterr().out
    assert "# step time source: ESTIMATE (analytic, nothing measured at shape tiny" in out
    assert "[ESTIMATE, not measured]" in out


def test_cli_bad_input_is_one_line(tmp_path):
    p = subprocess.run([PY, "scripts/sweep.py", "grid", "--arms", "erasee", "--out-root", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"sweep.py: --arms: unknown arm 'erasee'; arms.py knows {', '.join(arms.NAMES)}"]


def primary_reference(out_root: Path, name: str, method: str, control: str, seeds) -> dict:
    """The primary comparison recomputed from the runs' eval.json files: means, the brute-force permutation p
    (all (2n)! orderings, the first n as the method), breakouts and Fisher's p from binomial coefficients."""
    def final(arm, s, metric):
        return json.loads(
            (out_root / "runs" / f"{name}-{arm}-s{s}" / "eval.json").read_text())["modes"]["deploy"][metric]

    x = [final(method, s, "hack_strict") for s in seeds]
    y = [final(control, s, "hack_strict") for s in seeds]
    z, n = x + y, len(x)
    obs = np.mean(x) - np.mean(y)
    diffs = [np.mean(o[:n]) - np.mean(o[n:]) for o in itertools.permutations(z)]
    p = float(np.mean([d <= obs + 1e-12 for d in diffs]))
    km, kc = sum(v >= 0.2 for v in x), sum(v >= 0.2 for v in y)
    K, N = km + kc, 2 * n
    fisher = (sum(math.comb(K, j) * math.comb(N - K, n - j) for j in range(kc, min(K, n) + 1))
              / math.comb(N, n))
    return dict(x=x, y=y, p=p, km=km, kc=kc, fisher=fisher)


def check_primary(out_root: Path, name: str, method: str, control: str, seeds) -> str:
    ref = primary_reference(out_root, name, method, control, seeds)
    md = (out_root / "sweeps" / name / "results.md").read_text()
    primary = md.split("## Primary comparison")[1].split("\n## ")[0]
    assert "Preregistered (written before the first run" in primary, primary[:400]
    row = next(ln for ln in primary.splitlines() if ln.startswith(f"| {method} vs {control} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    n = len(seeds)
    assert cells[1] == f"{n} vs {n}" and cells[2] == f"{np.mean(ref['x']):.3f} vs {np.mean(ref['y']):.3f}"
    assert cells[3].startswith(f"{np.mean(ref['x']) - np.mean(ref['y']):+.3f} [")
    assert cells[5] == f"{ref['p']:.3f}"
    want = "SUPPORTED" if ref["p"] <= 0.05 + 1e-9 else "NOT supported"
    assert f"**primary: {want}" in primary
    assert f"{method} {ref['km']}/{n}, {control} {ref['kc']}/{n}" in primary
    assert f"vs {control}: p = {ref['fisher']:.3f}" in primary
    return primary


def test_end_to_end_primary_section_matches_recomputation(tmp_path):
    """Fast variant (tests/fixtures/fake_train.py): 2 arms x 3 seeds through the local backend, then
    summarize; the primary section against primary_reference.
    The fake's erase hacks less on every seed: p = 1/20."""
    c = cfg(tmp_path, arms=("vanilla", "erase"), seeds=(0, 1, 2), primary_controls=("vanilla",))
    assert sweep.main(c) == 0
    summarize.main(summarize.Config(sweep="t", out_root=tmp_path / "out"))
    primary = check_primary(tmp_path / "out", "t", "erase", "vanilla", (0, 1, 2))
    assert "**primary: SUPPORTED" in primary and "| 0.050 |" in primary


# -------------------------------------------------------------------------------------------- ray
def check_summary_against_runs(out_root: Path, name: str, arms, seeds) -> None:
    """results.tsv final deploy rows == numpy over the runs' eval.json; the train curves match log.tsv."""
    summarize.main(summarize.Config(sweep=name, out_root=out_root))
    d = out_root / "sweeps" / name
    with open(d / "results.tsv") as f:
        tab = list(csv.DictReader(f, delimiter="\t"))
    for arm in arms:
        for metric in ("hack_strict", "gt_pass"):
            vals = [json.loads((out_root / "runs" / f"{name}-{arm}-s{s}" / "eval.json").read_text())
                    ["modes"]["deploy"][metric] for s in seeds]
            row = [r for r in tab
                   if (r["arm"], r["mode"], r["metric"], r["final"]) == (arm, "deploy", metric, "True")]
            assert len(row) == 1, (arm, metric)
            lo, mean, hi = (float(row[0][k]) for k in ("min", "mean", "max"))
            assert mean == pytest.approx(np.mean(vals), abs=1e-5)
            assert (lo, hi) == pytest.approx((min(vals), max(vals)), abs=1e-5)
    for png in ("hack_vs_step.png", "pass_vs_step.png", "hack_vs_pass.png", "projection_vs_step.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"
    assert "Missing or incomplete runs" in (d / "results.md").read_text()


def test_ray_backend_local_cluster(tmp_path):
    pytest.importorskip("ray", reason="ray is the optional extra: EXTRAS=dev,ray bash scripts/setup.sh")
    c = cfg(tmp_path, backend="ray", ray_address="local", gpus_per_run=0.0)
    assert sweep.main(c) == 0
    runs = tmp_path / "out/runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        f"t-{a}-s{s}" for a in ("vanilla", "erase", "erase-random") for s in (0, 1))
    assert all((p / "DONE").exists() for p in runs.iterdir())
    check_summary_against_runs(tmp_path / "out", "t", ("vanilla", "erase", "erase-random"), (0, 1))


def test_local_backend_then_summarize(tmp_path):
    assert sweep.main(cfg(tmp_path)) == 0
    check_summary_against_runs(tmp_path / "out", "t", ("vanilla", "erase", "erase-random"), (0, 1))


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_real_smoke_sweep_end_to_end(tmp_path, backend):
    """2 arms x 3 seeds x 2 steps of the real train.py smoke preset (tiny-random, CPU) through sweep.py, then
    summarize: the primary section (erase-random vs vanilla, preregistered via the parameters) against an
    independent recomputation from the runs' eval.json files."""
    if backend == "ray":
        pytest.importorskip("ray", reason="ray is the optional extra")
    if not list((REPO / "out/pools/synthetic-tiny-random").glob("step_*.jsonl.gz")):
        # the smoke preset's pool
        subprocess.run([PY, "scripts/make_synthetic_pool.py"], cwd=REPO, check=True)
    arm_list = ("vanilla", "erase-random")  # no v_hack needed
    c = cfg(tmp_path, fakes=False, arms=arm_list, seeds=(0, 1, 2), set=("steps=2",), backend=backend,
            ray_address="local", gpus_per_run=0.0, primary_method="erase-random",
            primary_controls=("vanilla",))
    assert sweep.main(c) == 0, [p.read_text()[-2000:] for p in (tmp_path / "out/sweeps/t/logs").glob("*.log")]
    check_summary_against_runs(tmp_path / "out", "t", arm_list, (0, 1, 2))
    check_primary(tmp_path / "out", "t", "erase-random", "vanilla", (0, 1, 2))
    log = (tmp_path / "out/runs/t-vanilla-s0/log.tsv").read_text().splitlines()
    assert len(log) == 3  # header + 2 steps
    assert sweep.main(c) == 0  # finished: nothing runs again


def test_local_backend_runs_jobs_in_parallel_and_respects_dependencies(tmp_path):
    """--local-jobs 2: two jobs that each wait for the other's start file both succeed (with 1 job at a time
    the first would time out); a job after a failed one is skipped;
    a job after a succeeded one runs after it ended."""
    d = tmp_path
    wait = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); "
            "(d / (sys.argv[2] + '.start')).touch(); t = time.time()\n"
            "while not (d / (sys.argv[3] + '.start')).exists():\n    time.sleep(0.05)\n"
            "    if time.time() - t > 5: sys.exit(7)\n(d / (sys.argv[2] + '.end')).touch()")
    after_a = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); "
               "sys.exit(0 if (d / 'a.end').exists() else 9)")
    py = sys.executable
    jobs = [
        sweep.Job("a", "train", (py, "-c", wait, str(d), "a", "b"), (), "why: test"),
        sweep.Job("b", "train", (py, "-c", wait, str(d), "b", "a"), (), "why: test"),
        sweep.Job("c", "train", (py, "-c", after_a, str(d)), ("a",), "why: test"),
        sweep.Job("f", "train", (py, "-c", "import sys; sys.exit(3)"), (), "why: test"),
        sweep.Job("g", "train", (py, "-c", "pass"), ("f",), "why: test"),
    ]
    cfg = sweep.SweepConfig(name="par", out_root=tmp_path / "out", local_jobs=2)
    assert sweep.run_local(cfg, jobs) == {"a": 0, "b": 0, "c": 0, "f": 3, "g": -1}
    # one at a time: b cannot start before a ends, so a times out (rc 7) and c is skipped;
    # b then finds a's start file
    for f in [*d.glob("*.start"), *d.glob("*.end")]:
        f.unlink()
    assert sweep.run_local(dataclasses.replace(cfg, name="seq", local_jobs=1), jobs[:3]) == {
        "a": 7, "b": 0, "c": -1}
