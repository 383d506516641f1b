"""sweep.py: expand seeds x arms x preset into train.py commands and submit them to a backend.

    python scripts/sweep.py queue-full [--seeds 0 1 2] [--arms ...] [--backend auto|pueue|ray|local]
                                       [--dry-run]
    python scripts/sweep.py queue-vanilla [--dry-run]
    python scripts/sweep.py probe-full-seed SEED [--min-hack 0.2] [--dry-run]
    python scripts/sweep.py grid --name NAME --preset smoke --seeds 0 1 --arms vanilla erase-random \
        --set steps=3 --backend local
    python scripts/sweep.py grid ... --backend ray --ray-address auto     # a running Ray cluster
    python scripts/sweep.py grid ... --backend ray --ray-address local --gpus-per-run 0   # CPU-only local Ray

Each run `<name>-<arm>-s<seed>` lives in `<out-root>/runs/<run>/` (docs/interfaces.md, "Run directories").
Before submitting, every run's directory decides what happens to it:
    DONE exists                        -> skipped (re-running a finished sweep submits nothing)
    a checkpoint (ckpt/latest) exists  -> the same command + `--resume <run dir>` (resumed, not restarted)
    otherwise                          -> the fresh command
Arms that need v_hack (measure/erase/route) depend on an extraction task (skipped when
`<out-root>/vhack/<vhack-name>.safetensors` exists) followed by its held-out verification.

Backends:
    pueue  one task per job in a group named after the sweep; `pueue parallel <#GPUs> -g <group>`; each task
           runs `CUDA_VISIBLE_DEVICES=$PUEUE_WORKER_ID ...` so slot k of the group uses GPU k (PUEUE_WORKER_ID
           is the slot index pueue gives a running task inside its group); dependencies via `--after ID`;
           labels follow the researchers' `why: ...; resolve: ...` convention.
    ray    one `@ray.remote(num_gpus=--gpus-per-run)` task per job that runs the command as a subprocess;
           dependencies are passed as object refs. Across machines the repo and out/ must be on a shared
           filesystem at the same path (the commands use absolute paths).
    local  sequential subprocesses, logs in <out-root>/sweeps/<name>/logs/.
The sweep writes `<out-root>/sweeps/<name>/sweep.json` (runs, commands, git sha) for scripts/summarize.py.

`probe-full-seed SEED` runs extract -> verify -> the pilot vanilla run with seed SEED (default 100, outside
--seeds), then a gate reads that run's eval.json and stops with a clear message unless deploy `hack_strict` >=
--min-hack (default 0.2); when it passes, the rest of the full grid is submitted with the same backend (for
pueue the gate is itself a queued task, `probe-full-seed SEED --stage gate`, so the whole chain runs
unattended). The pilot run was kept because it hacked, so it never enters a comparison (docs/sweeps.md).

Preregistration (issue 15): every submission first writes `<out-root>/sweeps/<name>/prereg.json`
(stats.build_prereg: primary comparison --primary-method vs --primary-controls on the final deploy
hack_strict, gt-pass non-inferiority, the test, alpha, seeds, arms, pilot rule, git SHA); a dry run prints
it. The grid is submitted round-robin (every arm of seed k before seed k+1); `--budget-gpu-hours H` keeps
only the complete rounds that fit, from a step time measured by scripts/bench_step.py / scripts/gpu_check.py
(newest matching out/bench/*.json) or else the analytic model, labelled as an estimate.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Union

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import arms  # noqa: E402
from cli import UserError, in_range  # noqa: E402
import runs  # noqa: E402
import stats  # noqa: E402

# The arm lists come from arms.ARMS: `grid` runs the core arms by default; every arm stays available by name.
FULL_ARMS = arms.grid("core")
ALL_GRID_ARMS = arms.grid("core", "extra")
# The preregistered design of queue-full / queue-vanilla / probe-full-seed: vanilla, erase and its placebos.
# erase-matched (issue 18, erase's mass-matched placebo) may not be an arm yet: prereg_arms() keeps the names
# that arms.ARMS has and says which it dropped.
PREREG_ARMS = ("vanilla", "erase", "erase-random", "erase-matched")
PILOT_SEED = 100  # the gate's pilot vanilla run: outside the sweep seeds, never in a comparison


def prereg_arms(names: tuple[str, ...] = PREREG_ARMS, note: bool = False) -> tuple[str, ...]:
    """`names` that are arms in arms.ARMS (table order of `names`); note=True prints the ones left out."""
    have = tuple(a for a in names if a in arms.ARMS)
    if note and len(have) < len(names):
        print(f"# note: {', '.join(a for a in names if a not in arms.ARMS)} not in arms.ARMS yet; the "
              f"preregistered grid uses {', '.join(have)}")
    return have


QUEUE_FULL_ARMS = prereg_arms()
# gate arms capture per-rollout gradients, which activation checkpointing breaks (train.py refuses the
# combination): they run without it, with a smaller train micro-batch on the GPU presets (docs/gating.md,
# "Memory"; a later `--set micro_batch=N` overrides this)
GATE_ARM_ARGS = {"fast": ("--no-grad-checkpointing", "--micro-batch", "4"),
                 "full": ("--no-grad-checkpointing", "--micro-batch", "2")}


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class SweepConfig:
    """A grid of train.py runs: seeds x arms on one preset, plus field overrides."""

    name: str = "sweep"
    """sweep name: pueue group, run-name prefix `<name>-<arm>-s<seed>`, out/sweeps/<name>/"""
    preset: str = "smoke"
    """train.py preset (tyro subcommand): smoke | smollm | fast | full"""
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = FULL_ARMS
    set: tuple[str, ...] = ()
    """train.py field overrides FIELD=VALUE, passed as `--FIELD VALUE` (e.g. --set steps=3 lr=1e-5)"""
    backend: Literal["auto", "pueue", "ray", "local"] = "auto"
    """auto = pueue when `pueue` is on PATH, else local"""
    dry_run: bool = False
    """print the commands (and pueue invocations) without running or submitting anything"""
    out_root: Path = REPO / "out"
    """runs go to <out-root>/runs, v_hack to <out-root>/vhack, sweep outputs to <out-root>/sweeps"""
    vhack_name: str = ""
    """v_hack file <out-root>/vhack/<vhack-name>.safetensors; default: the preset name"""
    vhack_path: Path | None = None
    """use this v_hack file as is (no extraction, no verification task)"""
    vhack_preset: str = ""
    """preset of extract_vhack_grad.py and scripts/verify_vhack_heldout.py; default: --preset"""
    extract_args: str = ""
    """extra arguments for extract_vhack_grad.py, one shell-quoted string:
    --extract-args="--model X --device cuda" """
    verify_args: str = ""
    """extra arguments for scripts/verify_vhack_heldout.py, one shell-quoted string (as --extract-args)"""
    gpus: str = ""
    """comma-separated GPU ids for pueue slots; default: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`"""
    local_jobs: int = 1
    """local backend: runs at once (2 on the 2-core box: each run keeps one torch thread)"""
    gpus_per_run: float = 1.0
    """ray: num_gpus of each task (0 for a CPU-only test cluster)"""
    ray_address: str = "auto"
    """ray: `auto` = a running cluster (`ray start --head` first), `local` = start a fresh local one"""
    python: str = sys.executable
    """interpreter for every command"""
    primary_method: str = stats.PRIMARY_METHOD
    """the preregistered method arm (prereg.json's primary comparison)"""
    primary_controls: tuple[str, ...] = stats.PRIMARY_CONTROLS
    """its preregistered controls; names not in arms.ARMS yet (erase-matched before issue 18) are left out"""
    prereg_arms: tuple[str, ...] = ()
    """arms of the preregistered design (default: --arms); queue-vanilla preregisters the grid it is in"""
    pilot_seed: int = PILOT_SEED
    """seed of the gate's pilot vanilla run (probe-full-seed SEED); outside --seeds, never in a comparison"""
    budget_gpu_hours: float | None = None
    """keep only the complete rounds (one run of every arm for a seed) that fit this many GPU-hours"""
    sec_per_step: float = 0.0
    """step time for the GPU-hour estimate (0 = newest matching out/bench/*.json, else the analytic model)"""
    train_script: str = "train.py"
    extract_script: str = "extract_vhack_grad.py"
    verify_script: str = "scripts/verify_vhack_heldout.py"


@dataclasses.dataclass
class ProbeConfig(SweepConfig):
    """Gated start of a full sweep: extract -> verify -> one vanilla seed -> gate -> the rest."""

    seed: tyro.conf.Positional[int] = PILOT_SEED
    """the pilot vanilla seed that must hack before anything else is queued; outside --seeds (it is the
    prereg's pilot seed and never enters a comparison)"""
    min_hack: float = 0.2
    """the gate: vanilla's final deploy metric must reach this"""
    gate_metric: Literal["hack_strict", "hack_loose"] = "hack_strict"
    stage: Literal["probe", "gate"] = "probe"
    """probe = submit the chain; gate = check the vanilla run and submit the rest (what the chain's last task
    runs)"""


Command = Union[
    Annotated[SweepConfig, tyro.conf.subcommand("grid", default=SweepConfig())],
    Annotated[
        SweepConfig,
        tyro.conf.subcommand("queue-full",
                             default=SweepConfig(name="full", preset="full", arms=QUEUE_FULL_ARMS)),
    ],
    Annotated[
        SweepConfig,
        tyro.conf.subcommand("queue-vanilla",
                             default=SweepConfig(name="full", preset="full", arms=("vanilla",),
                                                 prereg_arms=QUEUE_FULL_ARMS)),
    ],
    Annotated[
        ProbeConfig,
        tyro.conf.subcommand("probe-full-seed",
                             default=ProbeConfig(name="full", preset="full", arms=QUEUE_FULL_ARMS)),
    ],
]


# ------------------------------------------------------------------------------------------------- jobs
@dataclasses.dataclass(frozen=True)
class Job:
    key: str  # unique within a plan: "extract", "verify", "<run name>", "gate"
    kind: Literal["extract", "verify", "train", "gate"]
    argv: tuple[str, ...]
    after: tuple[str, ...]  # keys of jobs that must succeed first
    label: str  # "why: ...; resolve: ..."
    run: dict | None = None  # train jobs: {name, arm, seed, run_dir, action}


def run_name(cfg: SweepConfig, arm: str, seed: int) -> str:
    return f"{cfg.name}-{arm}-s{seed}"


def overrides_to_args(sets: tuple[str, ...]) -> list[str]:
    """FIELD=VALUE -> `--field VALUE`; VALUE true/false -> tyro's `--field` / `--no-field` flags."""
    args = []
    for s in sets:
        if "=" not in s or not s.split("=", 1)[0].strip():
            raise UserError(f"--set {s!r}: expected FIELD=VALUE (e.g. --set steps=3 eval_every=50)")
        k, v = s.split("=", 1)
        k = k.strip().replace("_", "-")
        if v.lower() in ("true", "false"):
            args.append(f"--{k}" if v.lower() == "true" else f"--no-{k}")
        else:
            args += [f"--{k}", v]
    return args


def normalise_arms(cfg: SweepConfig) -> tuple[str, ...]:
    out = []
    for a in cfg.arms:
        if arms.ALIASES.get(a, a) not in arms.ARMS:
            raise UserError(f"--arms: unknown arm {a!r}; arms.py knows {', '.join(arms.NAMES)}")
        a = arms.ALIASES.get(a, a)
        if a not in out:
            out.append(a)
    if not out or not cfg.seeds:
        raise UserError("--arms and --seeds must each name at least one value")
    return tuple(out)


def vhack_file(cfg: SweepConfig) -> Path:
    if cfg.vhack_path is not None:
        return Path(cfg.vhack_path).resolve()
    return (cfg.out_root / "vhack"
            / f"{cfg.vhack_name or cfg.vhack_preset or cfg.preset}.safetensors").resolve()


def script_presets(script: Path) -> tuple[str, ...] | None:
    """String keys of a top-level `PRESETS = {...}` dict in a script (read with ast), None if not found."""
    if not script.exists():
        return None
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets):
                return tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return None


def check_vhack_presets(cfg: SweepConfig) -> str:
    """'' if extract/verify know the v_hack preset, else the problem (an error, or a warning in a dry run)."""
    preset = cfg.vhack_preset or cfg.preset
    for script in (cfg.extract_script, cfg.verify_script):
        known = script_presets(REPO / script)
        if known is not None and preset not in known:
            return (f"{script} has no preset {preset!r} (it has {', '.join(known)}): "
                    f"pass --vhack-preset NAME (+ --extract-args/--verify-args for the model), "
                    f"or --vhack-path an existing v_hack file")
    return ""


def train_argv(cfg: SweepConfig, arm: str, seed: int, needs_vhack: bool) -> list[str]:
    name = run_name(cfg, arm, seed)
    argv = [cfg.python, cfg.train_script, cfg.preset, "--arm", arm, "--seed", str(seed), "--run-name", name]
    if needs_vhack:
        argv += ["--vhack-path", str(vhack_file(cfg))]
    if arms.get(arm).per_sample:
        argv += list(GATE_ARM_ARGS.get(cfg.preset, ("--no-grad-checkpointing",)))
    if cfg.out_root.resolve() != (REPO / "out").resolve():
        argv += ["--out-dir", str(cfg.out_root.resolve() / "runs")]
    return argv + overrides_to_args(cfg.set)


def vhack_jobs(cfg: SweepConfig, after: tuple[str, ...] = ()) -> list[Job]:
    """Extraction + held-out verification, or nothing when the v_hack file already exists."""
    if cfg.vhack_path is not None:
        if not Path(cfg.vhack_path).exists():
            raise UserError(f"--vhack-path {cfg.vhack_path} does not exist; drop the flag to extract one")
        return []
    path = vhack_file(cfg)
    if path.exists():
        return []
    problem = check_vhack_presets(cfg)
    if problem and not cfg.dry_run:
        raise UserError(problem)
    if problem:
        print(f"# WARNING: {problem}")
    preset = cfg.vhack_preset or cfg.preset
    extract = Job(
        key="extract",
        kind="extract",
        argv=(cfg.python, cfg.extract_script, preset, "--name", path.stem, "--out-dir", str(path.parent))
        + tuple(shlex.split(cfg.extract_args)),
        after=after,
        label=f"why: v_hack ({path.name}) for the measure/erase/route arms of sweep {cfg.name}; "
        f"resolve: if it failed the dependent arms fail too: read `pueue log`, fix, re-run the sweep command",
    )
    verify = Job(
        key="verify",
        kind="verify",
        argv=(cfg.python, cfg.verify_script, preset, "--vhack", str(path))
        + tuple(shlex.split(cfg.verify_args)),
        after=("extract",),
        label=f"why: held-out check that {path.name} separates hack from clean pairs before arms train on "
        f"it; resolve: below threshold -> do not trust erase/route, re-extract (more pairs/steps), "
        f"delete {path.name}, re-run",
    )
    return [extract, verify]


def plan_grid(cfg: SweepConfig, arm_list: tuple[str, ...] | None = None, seeds: tuple[int, ...] | None = None,
              after: tuple[str, ...] = ()) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for the grid (extract/verify first when needed, then the runs round-robin: every arm of seed k
    before seed k + 1) and the skipped runs as (run name, reason)."""
    arm_list = normalise_arms(cfg) if arm_list is None else arm_list
    seeds = cfg.seeds if seeds is None else seeds
    vhack_arms = {a.name for a in arms.ARMS.values() if a.direction == "vhack"}
    # when the grid has a v_hack arm, every arm gets the file: the others only measure with it (cos of the
    # gradient and of the applied step with v_hack in an unedited run), which never changes their training
    measure_all = any(a in vhack_arms for a in arm_list)
    runs_dir = cfg.out_root.resolve() / "runs"
    jobs: list[Job] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, int, str, Path]] = []
    check_manifest(cfg, {run_name(cfg, a, s): shlex.join(train_argv(cfg, a, s, measure_all))
                         for a, s in stats.round_robin(arm_list, seeds)})
    for arm, seed in stats.round_robin(arm_list, seeds):
        name = run_name(cfg, arm, seed)
        state = runs.state(runs_dir / name)
        if state == "done":
            skipped.append((name, "DONE"))
        else:
            pending.append((arm, seed, state, runs_dir / name))
    needs = any(arm in vhack_arms for arm, *_ in pending)
    vjobs = vhack_jobs(cfg, after=after) if needs else []
    jobs += vjobs
    for arm, seed, state, rdir in pending:
        argv = train_argv(cfg, arm, seed, measure_all)
        action = "fresh"
        if state == "resume":
            argv += ["--resume", str(rdir)]
            action = "resume"
        # measuring needs no verify
        dep = (("verify",) if arm in vhack_arms else ("extract",)) if vjobs else after
        label = (
            f"why: sweep {cfg.name}, preset {cfg.preset}, arm {arm}, seed {seed} ({action}); "
            f"resolve: if it failed read `pueue log` / {rdir}/log.tsv, fix, re-run the sweep command "
            f"(it resumes from the last checkpoint)"
        )
        no_ckpt = state == "resume" and not (rdir / "ckpt" / "latest").exists()
        run = dict(name=rdir.name, arm=arm, seed=seed, run_dir=str(rdir), action=action, no_ckpt=no_ckpt)
        jobs.append(Job(key=rdir.name, kind="train", argv=tuple(argv), after=dep, label=label, run=run))
    return jobs, skipped


def plan_probe(cfg: ProbeConfig, backend: str) -> list[Job]:
    """extract -> verify -> vanilla seed -> (pueue only) gate task."""
    vjobs = vhack_jobs(cfg)
    after = ("verify",) if vjobs else ()
    jobs, skipped = plan_grid(cfg, arm_list=("vanilla",), seeds=(cfg.seed,), after=after)
    jobs = vjobs + jobs  # plan_grid adds no v_hack jobs for vanilla
    if backend == "pueue":
        gate_argv = gate_command(cfg, backend)
        vanilla_key = run_name(cfg, "vanilla", cfg.seed)
        gate_after = (vanilla_key,) if any(j.key == vanilla_key for j in jobs) else after
        jobs.append(Job(
            key="gate", kind="gate", argv=tuple(gate_argv), after=gate_after,
            label=f"why: gate: queue the rest of sweep {cfg.name} only if vanilla seed {cfg.seed} reaches "
            f"deploy {cfg.gate_metric} >= {cfg.min_hack}; resolve: if it failed vanilla did not hack "
            f"(see its log): do not queue the full grid, change the setup first",
        ))
    return jobs


def gate_command(cfg: ProbeConfig, backend: str) -> list[str]:
    """The exact sweep.py invocation that re-creates cfg with --stage gate."""
    argv = [cfg.python, str(Path(__file__).resolve()), "probe-full-seed", str(cfg.seed), "--stage", "gate",
            "--backend", backend, "--name", cfg.name, "--preset", cfg.preset,
            "--seeds", *map(str, cfg.seeds), "--arms", *cfg.arms, "--out-root", str(cfg.out_root.resolve()),
            "--min-hack", str(cfg.min_hack), "--gate-metric", cfg.gate_metric,
            "--python", cfg.python, "--train-script", cfg.train_script,
            "--extract-script", cfg.extract_script,
            "--verify-script", cfg.verify_script, "--gpus-per-run", str(cfg.gpus_per_run),
            "--ray-address", cfg.ray_address]
    argv += ["--primary-method", cfg.primary_method, "--primary-controls", *cfg.primary_controls]
    if cfg.prereg_arms:
        argv += ["--prereg-arms", *cfg.prereg_arms]
    if cfg.set:
        argv += ["--set", *cfg.set]
    if cfg.vhack_name:
        argv += ["--vhack-name", cfg.vhack_name]
    if cfg.vhack_preset:
        argv += ["--vhack-preset", cfg.vhack_preset]
    if cfg.extract_args:
        argv.append(f"--extract-args={cfg.extract_args}")
    if cfg.vhack_path is not None:
        argv += ["--vhack-path", str(cfg.vhack_path)]
    if cfg.verify_args:
        argv.append(f"--verify-args={cfg.verify_args}")
    gpus = detect_gpus(cfg.gpus)  # resolved now: inside a pueue slot CUDA_VISIBLE_DEVICES names one GPU only
    if gpus:
        argv += ["--gpus", ",".join(gpus)]
    return argv


def gate_check(cfg: ProbeConfig) -> tuple[bool, str]:
    """(passed, message) from the vanilla probe run's final eval.json."""
    rdir = cfg.out_root.resolve() / "runs" / run_name(cfg, "vanilla", cfg.seed)
    ev = rdir / "eval.json"
    if not (rdir / "DONE").exists() or not ev.exists():
        return False, (f"GATE: vanilla pilot run {rdir} has no DONE/eval.json (crashed or still running); "
                       f"resolve: finish it (re-run this command resumes it) before queueing the sweep")
    res = json.loads(ev.read_text())
    deploy = res.get("modes", {}).get("deploy")
    if deploy is None or cfg.gate_metric not in deploy:
        return False, (f"GATE: {ev} has no modes.deploy.{cfg.gate_metric}; "
                       "it does not follow docs/interfaces.md")
    val = float(deploy[cfg.gate_metric])
    step = res.get("step", "?")
    if val < cfg.min_hack:
        return False, (f"GATE STOP: pilot vanilla seed {cfg.seed} reached deploy {cfg.gate_metric} = "
                       f"{val:.3f} < {cfg.min_hack} at step {step} ({ev}). Not queueing the rest of sweep "
                       f"{cfg.name}: vanilla must be shown to hack before the arms can show anything. "
                       f"Resolve: longer run, stronger hint, or a lower --min-hack if that is really "
                       f"intended.")
    return True, (f"GATE PASS: pilot vanilla seed {cfg.seed} deploy {cfg.gate_metric} = {val:.3f} >= "
                  f"{cfg.min_hack} at step {step}; queueing the rest of sweep {cfg.name}")


# -------------------------------------------------------------------------------------------- backends
def detect_gpus(spec: str = "") -> list[str]:
    """GPU ids for pueue slots: --gpus, else CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`, else none."""
    if spec.strip():
        return [g.strip() for g in spec.split(",") if g.strip()]
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [g.strip() for g in cvd.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]
    return []


def cuda_prefix(gpus: list[str]) -> str:
    """Shell prefix mapping pueue slot $PUEUE_WORKER_ID (0..N-1) to one GPU; '' without GPUs."""
    if not gpus:
        return ""
    if gpus == [str(i) for i in range(len(gpus))]:
        return "CUDA_VISIBLE_DEVICES=$PUEUE_WORKER_ID "
    return f"CUDA_VISIBLE_DEVICES=$(echo {','.join(gpus)} | cut -d, -f$((PUEUE_WORKER_ID+1))) "


TASK_ID = re.compile(r"(?:New task added \(id (\d+)\)|^(\d+)$)", re.M)


def pueue_active_tasks(group: str) -> dict[str, int]:
    """command -> id of tasks in `group` that are queued/running/paused/stashed/locked (no
    double-queueing)."""
    proc = subprocess.run(["pueue", "status", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[sweep] warning: `pueue status --json` failed ({proc.stderr.strip()}); cannot check for "
              f"already-queued duplicates", file=sys.stderr)
        return {}
    state = json.loads(proc.stdout)
    active = {}
    for tid, task in state.get("tasks", {}).items():
        status = task.get("status")
        # v3 str, v4 {"Name": {..}}
        status = status if isinstance(status, str) else next(iter(status or {"?": 0}))
        if task.get("group") == group and status in {"Queued", "Running", "Paused", "Stashed", "Locked"}:
            active[task.get("command", "").strip()] = int(task.get("id", tid))
    return active


PLACEHOLDER = re.compile(r"<id:(.+)>")


def pueue_calls(cfg: SweepConfig, jobs: list[Job], gpus: list[str]) -> list[tuple[str | None, list[str]]]:
    """(job key or None, pueue argv) in order; `--after` names other jobs as `<id:KEY>` placeholders."""
    n = max(1, len(gpus))
    calls: list[tuple[str | None, list[str]]] = [(None, ["pueue", "group", "add", cfg.name]),
                                                (None, ["pueue", "parallel", str(n), "-g", cfg.name])]
    prefix = cuda_prefix(gpus)
    for job in jobs:
        argv = ["pueue", "add", "--group", cfg.name, "--working-directory", str(REPO), "--label", job.label]
        for k in job.after:
            argv += ["--after", f"<id:{k}>"]
        argv += ["--", (prefix if job.kind != "gate" else "") + shlex.join(job.argv)]
        calls.append((job.key, argv))
    return calls


def submit_pueue(cfg: SweepConfig, jobs: list[Job], dry_run: bool) -> dict[str, int]:
    """Create/size the group and add one task per job; returns job key -> pueue task id."""
    gpus = detect_gpus(cfg.gpus)
    calls = pueue_calls(cfg, jobs, gpus)
    if dry_run:
        for _, argv in calls:
            print(shlex.join(argv))
        return {}
    group_add = subprocess.run(calls[0][1], capture_output=True, text=True)
    if group_add.returncode != 0 and "exist" not in (group_add.stdout + group_add.stderr).lower():
        raise RuntimeError(f"`{shlex.join(calls[0][1])}` failed: {group_add.stdout}{group_add.stderr}")
    subprocess.run(calls[1][1], check=True, capture_output=True, text=True)
    active = pueue_active_tasks(cfg.name)
    ids: dict[str, int] = {}
    for key, argv in calls[2:]:
        if argv[-1].strip() in active:
            ids[key] = active[argv[-1].strip()]
            print(f"[sweep] {key}: identical task {ids[key]} already queued/running in group {cfg.name}; "
                  "not re-added")
            continue
        real = []
        for a in argv:
            m = PLACEHOLDER.fullmatch(a)
            assert m is None or m.group(1) in ids, f"{key}: dependency {a} was not submitted before it"
            real.append(str(ids[m.group(1)]) if m else a)
        proc = subprocess.run(real, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pueue add for {key} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        m = TASK_ID.search(proc.stdout)
        assert m, f"could not parse a task id from pueue's answer {proc.stdout!r}"
        ids[key] = int(m.group(1) or m.group(2))
        print(f"[sweep] pueue task {ids[key]}: {key}")
    return ids


def _log_path(cfg: SweepConfig, job: Job) -> Path:
    return cfg.out_root.resolve() / "sweeps" / cfg.name / "logs" / f"{job.key}.log"


def _tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def run_local(cfg: SweepConfig, jobs: list[Job]) -> dict[str, int]:
    """Subprocesses in plan order, at most --local-jobs at once; a job starts once its dependencies succeeded
    and is skipped (rc -1) when one failed."""
    rcs: dict[str, int] = {}
    running: dict[str, tuple[subprocess.Popen, float, Path, object]] = {}
    pending = list(jobs)
    order = {job.key: i + 1 for i, job in enumerate(jobs)}
    while pending or running:
        for job in list(pending):
            if any(rcs.get(k, 0) != 0 for k in job.after if k in rcs):
                pending.remove(job)
                rcs[job.key] = -1
                print(f"[local] {order[job.key]}/{len(jobs)} {job.key}: "
                      f"SKIPPED (a dependency failed: {job.after})")
            elif len(running) < max(1, cfg.local_jobs) and all(rcs.get(k) == 0 for k in job.after
                                                               if k in order):
                pending.remove(job)
                log = _log_path(cfg, job)
                log.parent.mkdir(parents=True, exist_ok=True)
                f = open(log, "w")
                proc = subprocess.Popen(job.argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
                running[job.key] = (proc, time.time(), log, f)
        for key, (proc, t0, log, f) in list(running.items()):
            # rusage: the job + every descendant it reaped (sandboxes)
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            f.close()
            del running[key]
            rcs[key] = proc.returncode = os.waitstatus_to_exitcode(status)
            print(f"[local] {order[key]}/{len(jobs)} {key}: rc={rcs[key]} ({time.time() - t0:.1f} s wall, "
                  f"{ru.ru_utime + ru.ru_stime:.1f} CPU-s) log {log}")
            if rcs[key] != 0:
                print(_tail(log))
        if running:
            time.sleep(0.2)
    return rcs


def run_ray(cfg: SweepConfig, jobs: list[Job]) -> dict[str, int]:
    """One Ray task per job (num_gpus=--gpus-per-run); dependencies passed as object refs."""
    try:
        import ray
    except ImportError as e:
        raise SystemExit("--backend ray needs the optional extra: "
                         "EXTRAS=dev,ray bash scripts/setup.sh") from e

    started_here = not ray.is_initialized()
    if started_here:
        if cfg.ray_address == "local":
            ray.init(num_gpus=None if cfg.gpus_per_run > 0 else 0, include_dashboard=False,
                     log_to_driver=False)
        else:
            ray.init(address=cfg.ray_address, log_to_driver=False)

    @ray.remote
    def run_job(argv: list[str], cwd: str, log: str, *deps: int) -> int:
        if any(d != 0 for d in deps):
            return -1
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            return subprocess.run(argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode

    refs = {}
    for job in jobs:
        deps = [refs[k] for k in job.after if k in refs]
        opts = dict(num_gpus=cfg.gpus_per_run, name=job.key, max_retries=0)
        refs[job.key] = run_job.options(**opts).remote(list(job.argv), str(REPO), str(_log_path(cfg, job)),
                                                       *deps)
    rcs = dict(zip(refs, ray.get(list(refs.values()))))
    for job in jobs:
        print(f"[ray] {job.key}: rc={rcs[job.key]} log {_log_path(cfg, job)}")
        if rcs[job.key] > 0:
            print(_tail(_log_path(cfg, job)))
    if started_here and cfg.ray_address == "local":
        ray.shutdown()
    return rcs


# ------------------------------------------------------------------------------------- budget estimate
MODEL_SHAPES = {"Qwen/Qwen3-4B": "qwen3-4b", "Qwen/Qwen3-1.7B": "qwen3-1.7b", "Qwen/Qwen3-0.6B": "qwen3-0.6b",
                "tiny-random": "tiny"}  # train.py model name -> scripts/bench_step.py --shape
# bench json fields (its "config") that must equal the preset's for its step time to count as this preset's
BENCH_MATCH = (("shape", "model"), ("rollouts", "rollouts_per_step"), ("group_size", "group_size"),
               ("max_new_tokens", "max_new_tokens"), ("grad_checkpointing", "grad_checkpointing"),
               ("fused_adapter", "fused_adapter"))
BENCH_GEN_LEN = "typical"  # and its lengths: a sweep's step at typical lengths (what gpu-check runs)
N_TEST_PROBLEMS = 119  # the benchmark's test split (docs/data.md); eval_problems = 0 evaluates all of them


def preset_fields(preset: str, sets: tuple[str, ...] = (), train_script: Path = REPO / "train.py") -> dict:
    """train.py's TrainConfig fields for `preset` with the --set overrides applied, read from the source with
    ast (literal defaults and preset keywords only; importing train.py would load torch)."""
    tree = ast.parse(Path(train_script).read_text())
    fields: dict = {}
    names: set[str] = set()  # every TrainConfig field, literal default or not
    presets: dict = {}
    ranges: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainConfig":
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    names.add(st.target.id)
                    if st.value is not None:
                        try:
                            fields[st.target.id] = ast.literal_eval(st.value)
                        except ValueError:
                            pass
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if (any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets)
                and isinstance(node.value, ast.Dict)):
            for k, v in zip(node.value.keys, node.value.values):
                call = v.elts[1] if isinstance(v, ast.Tuple) else v
                presets[ast.literal_eval(k)] = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if any(isinstance(t, ast.Name) and t.id == "RANGES" for t in targets):
            ranges = ast.literal_eval(node.value)
    if preset not in presets:
        raise UserError(f"--preset {preset!r}: train.py has presets {', '.join(presets)}")
    out = fields | presets[preset]
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set {item!r}: need FIELD=VALUE (a train.py flag without its dashes)")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            raise UserError(f"--set {item!r}: train.py has no field {k!r}"
                            + (f" (did you mean {close[0]}?)" if close else ""))
        old = out.get(k)
        if isinstance(old, bool):
            if v.lower() not in ("true", "false"):
                raise UserError(f"--set {item!r}: {k} takes true or false, got {v!r}")
            out[k] = v.lower() == "true"
        elif isinstance(old, (int, float)):
            try:
                out[k] = type(old)(v)
            except ValueError as e:
                raise UserError(f"--set {item!r}: {k} takes a number, got {v!r}") from e
        else:
            out[k] = v
        if k in ranges and isinstance(out[k], (int, float)) and not in_range(out[k], ranges[k]):
            raise UserError(f"--set {item!r} is out of range: train.py needs {k} {ranges[k]}")
    return out


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, seconds of generation per rollout (for the evals), and where they came
    from."""

    sec_per_step: float
    sec_gen_per_rollout: float
    source: str
    measured: bool


def bench_records(bench_dir: Path) -> list[tuple[Path, dict]]:
    """Every bench_step result in bench_dir/*.json: a `bench_step.py --json` file, or each entry of the
    "results" of scripts/gpu_check.py's gpu-check.json. Unreadable files are skipped with a warning."""
    out = []
    for f in sorted(Path(bench_dir).glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"# warning: {f} is not readable JSON ({e}); ignored for the budget")
            continue
        cands = [d] + list((d.get("results") or {}).values()) if isinstance(d, dict) else []
        out += [(f, r) for r in cands if isinstance(r, dict) and "config" in r and "t_step" in r]
    return out


def bench_want(p: dict) -> dict:
    """The bench config fields a measurement must have to stand for preset fields p (BENCH_MATCH, and
    gen_len BENCH_GEN_LEN: fixed or max lengths are not a sweep's step)."""
    return {bk: (MODEL_SHAPES.get(p.get("model")) if pk == "model" else p.get(pk))
            for bk, pk in BENCH_MATCH} | {"gen_len": BENCH_GEN_LEN}


def measured_step(bench_dir: Path, p: dict) -> StepTime | None:
    """The newest bench record (by its `date`, then file mtime) matching bench_want(p), or None."""
    want = bench_want(p)
    hits = [(f, r) for f, r in bench_records(bench_dir)
            if all(r["config"].get(k) == v for k, v in want.items()) and float(r["t_step"]) > 0]
    if not hits:
        return None
    f, r = max(hits, key=lambda fr: (str(fr[1].get("date", "")), fr[0].stat().st_mtime))
    gen = float(r.get("t_generate", 0.5 * r["t_step"])) / max(1, int(r["config"]["rollouts"]))
    extra = ", generation partly extrapolated" if r.get("t_generate_extrapolated") else ""
    src = (f"measured: {f} ({r.get('device_name', r.get('device', '?'))}, {r.get('date', '?')}, gen-len "
           f"{BENCH_GEN_LEN}, {'fused' if want['fused_adapter'] else 'unfused'} "
           f"adapter{extra})")
    return StepTime(float(r["t_step"]), gen, src, True)


def analytic_step(p: dict) -> StepTime:
    """scripts/bench_step.py's analytic model at the preset's shape (H100 SXM): HBM decode lower bound + the
    train pass at 50% of the bf16 peak, at the assumed typical lengths. An estimate, not a measurement."""
    shape = MODEL_SHAPES.get(p.get("model"))
    if shape is None:
        raise UserError(f"no analytic shape for model {p.get('model')!r} "
                        f"(bench_step knows {', '.join(MODEL_SHAPES)}) "
                        f"and no matching out/bench/*.json: pass --sec-per-step S")
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_step  # torch + transformers: only imported when nothing measured matches

    rollouts = int(p["rollouts_per_step"])
    gen_batch = min(int(p.get("gen_batch") or rollouts), rollouts)
    b = bench_step.BenchConfig(shape=shape, gen_len="typical", max_new_tokens=int(p["max_new_tokens"]),
                               rollouts=rollouts, group_size=int(p["group_size"]), gen_batch=gen_batch,
                               micro_batch=int(p["micro_batch"]),
                               grad_checkpointing=bool(p["grad_checkpointing"]),
                               fused_adapter=bool(p["fused_adapter"]),
                               prompt_len_max=int(p.get("max_prompt_tokens", 1536)))
    g = bench_step.analytic(b, gen_batch)["gpus"]["H100"]
    train = g["train_fused_s_at_50pct"] if p["fused_adapter"] else g["train_s_at_50pct"]
    src = (f"ESTIMATE (analytic, nothing measured at shape {shape} in out/bench/): H100 SXM decode HBM "
           f"lower bound {g['decode_lb_s']:.1f} s + train pass at 50% of bf16 peak {train:.1f} s per step, "
           f"assumed typical lengths; grading and launch overheads not modelled. "
           f"Measure with `just gpu-check`")
    return StepTime(g["decode_lb_s"] + train, g["decode_lb_s"] / rollouts, src, False)


def step_time(cfg: SweepConfig, p: dict) -> StepTime:
    """--sec-per-step, else the newest matching measurement in <out-root>/bench/, else the analytic model."""
    if cfg.sec_per_step > 0:
        return StepTime(cfg.sec_per_step, 0.5 * cfg.sec_per_step / int(p["rollouts_per_step"]),
                        f"given: --sec-per-step {cfg.sec_per_step} (evals assume half of it is generation)",
                        False)
    return measured_step(cfg.out_root / "bench", p) or analytic_step(p)


def run_gpu_hours(p: dict, st: StepTime) -> tuple[float, str]:
    """GPU-hours of one run: steps x s/step + its evals (deploy-mode generation only), and the formula."""
    steps = int(p["steps"])
    n_evals = ((steps // int(p["eval_every"]) if int(p.get("eval_every") or 0) > 0 else 0)
               + int(bool(p.get("eval_at_end", True))))
    n_eval = (int(p.get("eval_problems") or 0) or N_TEST_PROBLEMS) * int(p.get("eval_samples", 1))
    train_s, eval_s = steps * st.sec_per_step, n_evals * n_eval * st.sec_gen_per_rollout
    return (train_s + eval_s) / 3600, (f"{steps} steps x {st.sec_per_step:.1f} s/step = "
                                       f"{train_s / 3600:.2f} h + {n_evals} evals x {n_eval} completions x "
                                       f"{st.sec_gen_per_rollout:.3f} s = {eval_s / 3600:.2f} h")


# ---------------------------------------------------------------------------------------- the design
def design_arms(cfg: SweepConfig) -> tuple[str, ...]:
    return (normalise_arms(dataclasses.replace(cfg, arms=cfg.prereg_arms)) if cfg.prereg_arms
            else normalise_arms(cfg))


def prepare(cfg: SweepConfig) -> tuple[SweepConfig, dict | None, list[str]]:
    """Resolve the pilot seed, the preregistered controls and the budget (cfg.seeds trimmed to the complete
    rounds that fit), and build the preregistration. Returns (cfg, prereg or None, lines to print)."""
    notes: list[str] = []
    if isinstance(cfg, ProbeConfig):
        if cfg.pilot_seed not in (PILOT_SEED, cfg.seed):
            raise UserError(f"--pilot-seed {cfg.pilot_seed} differs from probe-full-seed's SEED {cfg.seed}; "
                             f"the positional SEED is the pilot seed: drop --pilot-seed")
        cfg = dataclasses.replace(cfg, pilot_seed=cfg.seed)
    if cfg.pilot_seed in cfg.seeds:
        raise UserError(f"pilot seed {cfg.pilot_seed} is one of the sweep's --seeds "
                        f"{' '.join(map(str, cfg.seeds))}: the gate keeps the pilot only if it hacked, "
                        f"so it is in no comparison; use another seed, e.g. "
                        f"`just probe-full-seed {PILOT_SEED}`")
    arm_list = normalise_arms(cfg)
    controls = tuple(c for c in cfg.primary_controls if arms.ALIASES.get(c, c) in arms.ARMS)
    if len(controls) < len(cfg.primary_controls):
        notes.append(f"# note: primary control(s) "
                     f"{', '.join(c for c in cfg.primary_controls if c not in controls)} "
                     f"not in arms.ARMS yet; the prereg compares {cfg.primary_method} with "
                     f"{', '.join(controls) or 'nothing'}")
    cfg = dataclasses.replace(cfg, primary_controls=controls)
    p = preset_fields(cfg.preset, cfg.set)  # unknown or out-of-range --set fields stop the sweep here
    if cfg.budget_gpu_hours is not None or cfg.dry_run:
        try:
            st = step_time(cfg, p)
            hours, formula = run_gpu_hours(p, st)
        except (ValueError, KeyError, SyntaxError) as e:
            if cfg.budget_gpu_hours is not None:
                raise UserError(f"--budget-gpu-hours needs a step time: {e}") from e
            notes.append(f"# GPU-hour estimate unavailable: {e}")
        else:
            notes += [f"# step time source: {st.source}", f"# one run: {formula} = {hours:.2f} GPU-h"]
            budget = cfg.budget_gpu_hours
            if isinstance(cfg, ProbeConfig) and budget is not None:
                budget -= hours
                notes.append(f"# the pilot run (vanilla seed {cfg.pilot_seed}) takes {hours:.2f} of the "
                             f"{cfg.budget_gpu_hours:g} GPU-h budget")
            kept, dropped = stats.budget_trim(arm_list, cfg.seeds, hours,
                                              None if budget is None else max(budget, 0.0))
            if dropped:
                k = len(kept) // len(arm_list)
                notes.append(f"# budget {cfg.budget_gpu_hours:g} GPU-h: keeps {k} of {len(cfg.seeds)} "
                             f"complete rounds (seeds {', '.join(map(str, cfg.seeds[:k])) or 'none'}); "
                             f"DROPPED {len(dropped)} runs: "
                             + ", ".join(run_name(cfg, a, s) for a, s in dropped))
                if k == 0:
                    raise UserError(f"--budget-gpu-hours {cfg.budget_gpu_hours:g}: one round of "
                                     f"{len(arm_list)} runs needs {len(arm_list) * hours:.1f} GPU-h; "
                                     f"raise the budget or drop arms")
                cfg = dataclasses.replace(cfg, seeds=tuple(cfg.seeds[:k]))
            n = len(cfg.seeds)
            if not stats.min_detectable_breakouts(n, n) and 1 / math.comb(2 * n, n) > stats.ALPHA:
                notes.append(f"# WARNING: with {n} seed(s) per arm no comparison can reach one-sided p <= "
                             f"{stats.ALPHA} (3 seeds per arm are the minimum)")
            total = len(arm_list) * len(cfg.seeds) * hours
            notes.append(f"# GPU-hours: {len(arm_list) * len(cfg.seeds)} runs x {p['steps']} steps x "
                         f"{st.sec_per_step:.1f} s/step (+ evals) = {total:.1f} GPU-h"
                         + ("" if st.measured else " [ESTIMATE, not measured]")
                         + (f" (budget {cfg.budget_gpu_hours:g})"
                            if cfg.budget_gpu_hours is not None else ""))
    design = design_arms(cfg)
    missing = [a for a in (cfg.primary_method, *controls) if a not in design]
    if not controls or missing:
        notes.append(f"# NO preregistration: the primary comparison's arms {missing or [cfg.primary_method]} "
                     f"are not in this grid ({', '.join(design)}); every comparison of sweep {cfg.name} "
                     f"is exploratory")
        return cfg, None, notes
    gate = dict(gate_metric=cfg.gate_metric, gate_min=cfg.min_hack) if isinstance(cfg, ProbeConfig) else {}
    pre = stats.build_prereg(sweep=cfg.name, arms=design, seeds=cfg.seeds, pilot_seed=cfg.pilot_seed,
                             git_sha=runs.git_sha(), method=cfg.primary_method, controls=controls, **gate)
    pre["preset"], pre["train_overrides"] = cfg.preset, list(cfg.set)
    return cfg, pre, notes


def prereg_path(cfg: SweepConfig) -> Path:
    return cfg.out_root.resolve() / "sweeps" / cfg.name / "prereg.json"


def announce(cfg: SweepConfig, prereg: dict | None, notes: list[str]) -> None:
    """Print the design: the notes (budget, estimate), the round-robin order and, in a dry run, the prereg."""
    for line in notes:
        print(line)
    arm_list = normalise_arms(cfg)
    print("# round-robin order (every arm of seed k before seed k+1):")
    for s in cfg.seeds:
        print(f"#   seed {s}: " + " ".join(run_name(cfg, a, s) for a in arm_list))
    if prereg is not None and cfg.dry_run:
        print(f"# preregistration ({prereg_path(cfg)}; written before the first run, not in a dry run):")
        for k, v in prereg.items():
            print(f"#   {k}: {json.dumps(v)}")


def write_prereg(cfg: SweepConfig, prereg: dict | None) -> None:
    """prereg.json before anything is submitted; warns when a run of the sweep already started (then summarize
    treats the primary comparison as exploratory)."""
    if prereg is None or cfg.dry_run:
        return
    path = prereg_path(cfg)
    try:
        wrote = stats.write_prereg(path, prereg)
    except ValueError as e:  # a different design under this sweep's name: the user picks a new name
        raise UserError(str(e)) from None
    print(f"[sweep] preregistration {'written' if wrote else 'unchanged'}: {path}")
    run_dirs = [cfg.out_root.resolve() / "runs" / run_name(cfg, a, s) for a in prereg["arms"]
                for s in (*prereg["seeds"], prereg["pilot"]["seed"])]
    ok, why = stats.prereg_valid(path, run_dirs)
    if not ok:
        print(f"[sweep] WARNING: {why}; summarize will call nothing significant", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ main
def manifest_path(cfg: SweepConfig) -> Path:
    return cfg.out_root.resolve() / "sweeps" / cfg.name / "sweep.json"


def check_manifest(cfg: SweepConfig, commands: dict[str, str]) -> None:
    """Refuse a run name that an earlier submission of this sweep ran with a different command: its DONE
    would otherwise be taken as this config's result (or its resume refused by train.py)."""
    path = manifest_path(cfg)
    if not path.exists():
        return
    old = json.loads(path.read_text())["runs"]
    for name, cmd in commands.items():
        if name in old and old[name]["command"] != cmd:
            raise UserError(
                f"run {name} of sweep {cfg.name} was submitted before with a different command:\n  "
                f"{old[name]['command']}\nnow:\n  {cmd}\nresolve: pick another --name for a changed config "
                f"(run dirs are per name), or delete {path} and the old run dirs")


def write_manifest(cfg: SweepConfig, jobs: list[Job], skipped: list[tuple[str, str]]) -> Path:
    """Merge this submission into <out-root>/sweeps/<name>/sweep.json (read by scripts/summarize.py)."""
    path = manifest_path(cfg)
    man = json.loads(path.read_text()) if path.exists() else {"name": cfg.name, "runs": {}, "submissions": []}
    for job in jobs:
        if job.kind != "train":
            continue
        base = list(job.argv)
        if "--resume" in base:
            base = base[: base.index("--resume")]
        man["runs"][job.run["name"]] = {k: job.run[k] for k in ("name", "arm", "seed", "run_dir")} | {
            "command": shlex.join(base)}
    man.update(preset=cfg.preset, vhack=str(vhack_file(cfg)), pilot_seed=cfg.pilot_seed)
    pre = prereg_path(cfg)
    sha = stats.file_sha256(pre) if pre.exists() else None  # summarize checks the prereg against it
    if sha:
        man.setdefault("prereg_sha256", sha)
    man["submissions"].append(dict(
        time=datetime.datetime.now().isoformat(timespec="seconds"), git_sha=runs.git_sha(),
        backend=cfg.backend,
        seeds=list(cfg.seeds), arms=list(cfg.arms), set=list(cfg.set),
        jobs=[j.key for j in jobs], skipped=[f"{n} ({why})" for n, why in skipped], prereg_sha256=sha))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(man, indent=1))
    return path


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "pueue" if shutil.which("pueue") else "local"
    if backend == "pueue" and not shutil.which("pueue"):
        raise SystemExit("--backend pueue: `pueue` is not on PATH (install pueue, start `pueued -d`), "
                         "or use --backend local")
    return backend


def print_plan(jobs: list[Job], skipped: list[tuple[str, str]]) -> None:
    for name, why in skipped:
        print(f"# skip {name}: {why}")
    for job in jobs:
        after = f"  (after {', '.join(job.after)})" if job.after else ""
        stale = ("  [run dir has no checkpoint yet: --resume restarts it from step 0]"
                 if job.run and job.run.get("no_ckpt") else "")
        print(f"# {job.kind} {job.key}{after}{stale}\n{shlex.join(job.argv)}")


def execute(cfg: SweepConfig, jobs: list[Job], skipped: list[tuple[str, str]], backend: str) -> int:
    """Submit/run jobs; returns a process exit code."""
    if backend != "pueue" or cfg.dry_run:
        print_plan(jobs, skipped)
    if not jobs:
        print(f"[sweep] {cfg.name}: nothing to submit ({len(skipped)} runs already DONE)")
        return 0
    if backend == "pueue":
        if cfg.dry_run:
            print("# pueue invocations (<id:KEY> = the task id pueue printed for job KEY):")
        ids = submit_pueue(cfg, jobs, cfg.dry_run)
        if not cfg.dry_run:
            write_manifest(cfg, jobs, skipped)
            print(f"[sweep] {len(ids)} pueue tasks in group {cfg.name}; watch: pueue status -g {cfg.name}")
        return 0
    if cfg.dry_run:
        return 0
    write_manifest(cfg, jobs, skipped)
    rcs = run_local(cfg, jobs) if backend == "local" else run_ray(cfg, jobs)
    failed = {k: rc for k, rc in rcs.items() if rc != 0}
    if failed:
        print(f"[sweep] {len(failed)} of {len(jobs)} jobs failed or were skipped: {failed}", file=sys.stderr)
        return 1
    return 0


def backend_line(requested: str, backend: str) -> str:
    """What runs the jobs, said before anything is submitted."""
    if backend == "local":
        why = " (--backend auto: `pueue` is not on PATH)" if requested == "auto" else ""
        return (f"# backend: local{why}: the jobs run in this process, in this terminal (--local-jobs at "
                "once); for a queue that outlives the terminal, install pueue and start `pueued -d`")
    return f"# backend: {backend}" + (" (--backend auto: pueue on PATH)" if requested == "auto" else "")


def main(cfg: SweepConfig) -> int:
    backend = resolve_backend(cfg.backend)
    print(backend_line(cfg.backend, backend))
    cfg, prereg, notes = prepare(cfg)
    if not isinstance(cfg, ProbeConfig):
        jobs, skipped = plan_grid(cfg)
        announce(cfg, prereg, notes)
        write_prereg(cfg, prereg)
        return execute(cfg, jobs, skipped, backend)
    if cfg.stage == "gate":
        ok, msg = gate_check(cfg)
        print(msg, file=sys.stdout if ok else sys.stderr)
        if not ok:
            return 3
        jobs, skipped = plan_grid(cfg)
        write_prereg(cfg, prereg)
        return execute(cfg, jobs, skipped, backend)
    # stage probe: the prereg (with the gate rule) is written before the pilot run starts
    jobs = plan_probe(cfg, backend)
    announce(cfg, prereg, notes)
    write_prereg(cfg, prereg)
    if cfg.dry_run or backend == "pueue":
        rc = execute(cfg, jobs, [], backend)
        if cfg.dry_run:
            print(f"# then, if pilot vanilla seed {cfg.seed} reaches deploy {cfg.gate_metric} >= "
                  f"{cfg.min_hack}, the gate submits the rest of the grid ({len(cfg.seeds)} seeds x "
                  f"{len(cfg.arms)} arms, DONE runs skipped); the pilot run is in no comparison")
        return rc
    rc = execute(cfg, jobs, [], backend)  # local / ray: run the chain, then gate in this process
    if rc != 0:
        print("[sweep] probe chain failed; the gate was not checked", file=sys.stderr)
        return rc
    ok, msg = gate_check(cfg)
    print(msg, file=sys.stdout if ok else sys.stderr)
    if not ok:
        return 3
    jobs, skipped = plan_grid(cfg)
    return execute(cfg, jobs, skipped, backend)


def cli(argv: list[str] | None = None) -> int:
    """Entry point: bad input (a cli.UserError naming the field) is one line and exit 2; anything else keeps
    its traceback."""
    cfg = tyro.cli(Command, args=argv)
    try:
        return main(cfg)
    except UserError as e:
        print(f"sweep.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
