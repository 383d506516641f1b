"""sweep.py: expand seeds x arms x preset into train.py commands and submit them to a backend.

    python scripts/sweep.py queue-full [--seeds 0 1 2] [--arms ...] [--backend auto|pueue|ray|local] [--dry-run]
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

`probe-full-seed SEED` runs extract -> verify -> vanilla seed SEED, then a gate reads that run's
eval.json and stops with a clear message unless deploy `hack_strict` >= --min-hack (default 0.2); when it
passes, the rest of the full grid is submitted with the same backend (for pueue the gate is itself a
queued task, `probe-full-seed SEED --stage gate`, so the whole chain runs unattended).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import json
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
import runs  # noqa: E402

# The arm lists come from arms.ARMS: `grid` runs the core arms by default, queue-full / probe-full-seed the core
# and extra ones.
FULL_ARMS = arms.grid("core")
QUEUE_FULL_ARMS = arms.grid("core", "extra")
# gate arms capture per-rollout gradients, which activation checkpointing breaks (train.py refuses the
# combination): they run without it, with a smaller train micro-batch on the GPU presets (docs/gating.md, "Memory";
# a later `--set micro_batch=N` overrides this)
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
    """extra arguments for extract_vhack_grad.py, one shell-quoted string: --extract-args="--model X --device cuda" """
    verify_args: str = ""
    """extra arguments for scripts/verify_vhack_heldout.py, one shell-quoted string (as --extract-args)"""
    gpus: str = ""
    """comma-separated GPU ids for pueue slots; default: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`"""
    gpus_per_run: float = 1.0
    """ray: num_gpus of each task (0 for a CPU-only test cluster)"""
    ray_address: str = "auto"
    """ray: `auto` = a running cluster (`ray start --head` first), `local` = start a fresh local one"""
    python: str = sys.executable
    """interpreter for every command"""
    train_script: str = "train.py"
    extract_script: str = "extract_vhack_grad.py"
    verify_script: str = "scripts/verify_vhack_heldout.py"


@dataclasses.dataclass
class ProbeConfig(SweepConfig):
    """Gated start of a full sweep: extract -> verify -> one vanilla seed -> gate -> the rest."""

    seed: tyro.conf.Positional[int] = 0
    """the vanilla seed that must hack before anything else is queued"""
    min_hack: float = 0.2
    """the gate: vanilla's final deploy metric must reach this"""
    gate_metric: Literal["hack_strict", "hack_loose"] = "hack_strict"
    stage: Literal["probe", "gate"] = "probe"
    """probe = submit the chain; gate = check the vanilla run and submit the rest (what the chain's last task runs)"""


Command = Union[
    Annotated[SweepConfig, tyro.conf.subcommand("grid", default=SweepConfig())],
    Annotated[
        SweepConfig,
        tyro.conf.subcommand("queue-full", default=SweepConfig(name="full", preset="full", arms=QUEUE_FULL_ARMS)),
    ],
    Annotated[
        SweepConfig,
        tyro.conf.subcommand("queue-vanilla", default=SweepConfig(name="full", preset="full", arms=("vanilla",))),
    ],
    Annotated[
        ProbeConfig,
        tyro.conf.subcommand("probe-full-seed", default=ProbeConfig(name="full", preset="full", arms=QUEUE_FULL_ARMS)),
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
            raise ValueError(f"--set {s!r}: expected FIELD=VALUE (e.g. --set steps=3 eval_every=50)")
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
            raise ValueError(f"--arms: unknown arm {a!r}; arms.py knows {', '.join(arms.NAMES)}")
        a = arms.ALIASES.get(a, a)
        if a not in out:
            out.append(a)
    if not out or not cfg.seeds:
        raise ValueError("--arms and --seeds must each name at least one value")
    return tuple(out)


def vhack_file(cfg: SweepConfig) -> Path:
    if cfg.vhack_path is not None:
        return Path(cfg.vhack_path).resolve()
    return (cfg.out_root / "vhack" / f"{cfg.vhack_name or cfg.vhack_preset or cfg.preset}.safetensors").resolve()


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
            return (f"{script} has no preset {preset!r} (it has {', '.join(known)}): pass --vhack-preset NAME "
                    f"(+ --extract-args/--verify-args for the model), or --vhack-path an existing v_hack file")
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
            raise FileNotFoundError(f"--vhack-path {cfg.vhack_path} does not exist; drop the flag to extract one")
        return []
    path = vhack_file(cfg)
    if path.exists():
        return []
    problem = check_vhack_presets(cfg)
    if problem and not cfg.dry_run:
        raise ValueError(problem)
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
        argv=(cfg.python, cfg.verify_script, preset, "--vhack", str(path)) + tuple(shlex.split(cfg.verify_args)),
        after=("extract",),
        label=f"why: held-out check that {path.name} separates hack from clean pairs before arms train on it; "
        f"resolve: below threshold -> do not trust erase/route, re-extract (more pairs/steps), delete {path.name}, re-run",
    )
    return [extract, verify]


def plan_grid(cfg: SweepConfig, arms: tuple[str, ...] | None = None, seeds: tuple[int, ...] | None = None,
              after: tuple[str, ...] = ()) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for the grid (extract/verify first when needed) and the skipped runs as (run name, reason)."""
    arms = normalise_arms(cfg) if arms is None else arms
    seeds = cfg.seeds if seeds is None else seeds
    vhack_arms = {a.name for a in arms.ARMS.values() if a.direction == "vhack"}
    runs_dir = cfg.out_root.resolve() / "runs"
    jobs: list[Job] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, int, str, Path]] = []
    check_manifest(cfg, {run_name(cfg, a, s): shlex.join(train_argv(cfg, a, s, a in vhack_arms))
                         for s in seeds for a in arms})
    for seed in seeds:
        for arm in arms:
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
        needs_v = arm in vhack_arms
        argv = train_argv(cfg, arm, seed, needs_v)
        action = "fresh"
        if state == "resume":
            argv += ["--resume", str(rdir)]
            action = "resume"
        dep = ("verify",) if (needs_v and vjobs) else after
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
    jobs, skipped = plan_grid(cfg, arms=("vanilla",), seeds=(cfg.seed,), after=after)
    jobs = vjobs + jobs  # plan_grid adds no v_hack jobs for vanilla
    if backend == "pueue":
        gate_argv = gate_command(cfg, backend)
        vanilla_key = run_name(cfg, "vanilla", cfg.seed)
        gate_after = (vanilla_key,) if any(j.key == vanilla_key for j in jobs) else after
        jobs.append(Job(
            key="gate", kind="gate", argv=tuple(gate_argv), after=gate_after,
            label=f"why: gate: queue the rest of sweep {cfg.name} only if vanilla seed {cfg.seed} reaches deploy "
            f"{cfg.gate_metric} >= {cfg.min_hack}; resolve: if it failed vanilla did not hack (see its log): "
            f"do not queue the full grid, change the setup first",
        ))
    return jobs


def gate_command(cfg: ProbeConfig, backend: str) -> list[str]:
    """The exact sweep.py invocation that re-creates cfg with --stage gate."""
    argv = [cfg.python, str(Path(__file__).resolve()), "probe-full-seed", str(cfg.seed), "--stage", "gate",
            "--backend", backend, "--name", cfg.name, "--preset", cfg.preset,
            "--seeds", *map(str, cfg.seeds), "--arms", *cfg.arms, "--out-root", str(cfg.out_root.resolve()),
            "--min-hack", str(cfg.min_hack), "--gate-metric", cfg.gate_metric,
            "--python", cfg.python, "--train-script", cfg.train_script, "--extract-script", cfg.extract_script,
            "--verify-script", cfg.verify_script, "--gpus-per-run", str(cfg.gpus_per_run),
            "--ray-address", cfg.ray_address]
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
        return False, (f"GATE: vanilla probe run {rdir} has no DONE/eval.json (crashed or still running); "
                       f"resolve: finish it (re-run this command resumes it) before queueing the sweep")
    res = json.loads(ev.read_text())
    deploy = res.get("modes", {}).get("deploy")
    if deploy is None or cfg.gate_metric not in deploy:
        return False, f"GATE: {ev} has no modes.deploy.{cfg.gate_metric}; it does not follow docs/interfaces.md"
    val = float(deploy[cfg.gate_metric])
    step = res.get("step", "?")
    if val < cfg.min_hack:
        return False, (f"GATE STOP: vanilla seed {cfg.seed} reached deploy {cfg.gate_metric} = {val:.3f} < "
                       f"{cfg.min_hack} at step {step} ({ev}). Not queueing the rest of sweep {cfg.name}: "
                       f"vanilla must be shown to hack before the arms can show anything. Resolve: longer run, "
                       f"stronger hint, or a lower --min-hack if that is really intended.")
    return True, (f"GATE PASS: vanilla seed {cfg.seed} deploy {cfg.gate_metric} = {val:.3f} >= {cfg.min_hack} "
                  f"at step {step}; queueing the rest of sweep {cfg.name}")


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
    """command -> id of tasks in `group` that are queued/running/paused/stashed/locked (no double-queueing)."""
    proc = subprocess.run(["pueue", "status", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[sweep] warning: `pueue status --json` failed ({proc.stderr.strip()}); cannot check for "
              f"already-queued duplicates", file=sys.stderr)
        return {}
    state = json.loads(proc.stdout)
    active = {}
    for tid, task in state.get("tasks", {}).items():
        status = task.get("status")
        status = status if isinstance(status, str) else next(iter(status or {"?": 0}))  # v3 str, v4 {"Name": {..}}
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
            print(f"[sweep] {key}: identical task {ids[key]} already queued/running in group {cfg.name}; not re-added")
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
    """Sequential subprocesses in plan order; a job whose dependency failed is skipped (rc -1)."""
    rcs: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if any(rcs.get(k, 0) != 0 for k in job.after):
            rcs[job.key] = -1
            print(f"[local] {i + 1}/{len(jobs)} {job.key}: SKIPPED (a dependency failed: {job.after})")
            continue
        log = _log_path(cfg, job)
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "w") as f:
            rcs[job.key] = subprocess.run(job.argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"[local] {i + 1}/{len(jobs)} {job.key}: rc={rcs[job.key]} ({time.time() - t0:.1f} s) log {log}")
        if rcs[job.key] != 0:
            print(_tail(log))
    return rcs


def run_ray(cfg: SweepConfig, jobs: list[Job]) -> dict[str, int]:
    """One Ray task per job (num_gpus=--gpus-per-run); dependencies passed as object refs."""
    try:
        import ray
    except ImportError as e:
        raise SystemExit("--backend ray needs the optional extra: EXTRAS=dev,ray bash scripts/setup.sh") from e

    started_here = not ray.is_initialized()
    if started_here:
        if cfg.ray_address == "local":
            ray.init(num_gpus=None if cfg.gpus_per_run > 0 else 0, include_dashboard=False, log_to_driver=False)
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
        refs[job.key] = run_job.options(**opts).remote(list(job.argv), str(REPO), str(_log_path(cfg, job)), *deps)
    rcs = dict(zip(refs, ray.get(list(refs.values()))))
    for job in jobs:
        print(f"[ray] {job.key}: rc={rcs[job.key]} log {_log_path(cfg, job)}")
        if rcs[job.key] > 0:
            print(_tail(_log_path(cfg, job)))
    if started_here and cfg.ray_address == "local":
        ray.shutdown()
    return rcs


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
            raise ValueError(
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
    man.update(preset=cfg.preset, vhack=str(vhack_file(cfg)))
    man["submissions"].append(dict(
        time=datetime.datetime.now().isoformat(timespec="seconds"), git_sha=runs.git_sha(), backend=cfg.backend,
        seeds=list(cfg.seeds), arms=list(cfg.arms), set=list(cfg.set),
        jobs=[j.key for j in jobs], skipped=[f"{n} ({why})" for n, why in skipped]))
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
        stale = "  [run dir has no checkpoint yet: --resume restarts it from step 0]" if job.run and job.run.get("no_ckpt") else ""
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


def main(cfg: SweepConfig) -> int:
    backend = resolve_backend(cfg.backend)
    if not isinstance(cfg, ProbeConfig):
        jobs, skipped = plan_grid(cfg)
        return execute(cfg, jobs, skipped, backend)
    if cfg.stage == "gate":
        ok, msg = gate_check(cfg)
        print(msg, file=sys.stdout if ok else sys.stderr)
        if not ok:
            return 3
        jobs, skipped = plan_grid(cfg)
        return execute(cfg, jobs, skipped, backend)
    # stage probe
    jobs = plan_probe(cfg, backend)
    if cfg.dry_run or backend == "pueue":
        rc = execute(cfg, jobs, [], backend)
        if cfg.dry_run:
            print(f"# then, if vanilla seed {cfg.seed} reaches deploy {cfg.gate_metric} >= {cfg.min_hack}, the "
                  f"gate submits the rest of the grid ({len(cfg.seeds)} seeds x {len(cfg.arms)} arms, DONE runs skipped)")
        return rc
    rc = execute(cfg, jobs, [], backend)  # local / ray: run the chain, then gate in this process
    if rc != 0:
        print("[sweep] probe chain failed; the gate was not checked", file=sys.stderr)
        return rc
    gate = dataclasses.replace(cfg, stage="gate")
    return main(gate)


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Command)))
