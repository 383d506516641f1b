"""Smoke test of the whole pipeline on tiny-random (CPU, ~1 min on a quiet 2-core box): synthetic teacher
pool, a v_hack extracted from the hand-written pairs, then every arm for a few steps with real sandboxed
grading and a deploy-mode eval; checks every run's log.tsv has the fixed columns and no NaN.

    python scripts/smoke.py                          # all arms (what `just smoke` runs)
    python scripts/smoke.py --arms vanilla erase     # a subset (`just smoke-vanilla`, `just smoke-projected`)
    python scripts/smoke.py --preset smollm --steps 2
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


@dataclass
class SmokeConfig:
    """Run every arm briefly and check the logs."""

    preset: str = "smoke"
    """train.py preset"""
    arms: tuple[str, ...] = ()
    """arms to run (empty = every arm in arms.ARMS)"""
    steps: int = 3
    """steps per arm"""
    name: str = ""
    """sweep folder under out/runs (default smoke-<time>)"""
    surgery_on: str = ""
    """pass --surgery-on to every arm (step | grad; empty = train.py's default)"""


def check_log(path: Path, n_steps: int, arm: str) -> None:
    """The TSV has exactly runs.LOG_COLUMNS, one row per step, no empty cell, and no NaN except in the
    arm-specific columns, which must be finite exactly where arms.expected_finite(arm, row) says they apply
    (e.g. gate columns for gate arms, a zone's hack rate only when the zone is non-empty) and NaN elsewhere,
    and in the teacher sources' columns, finite exactly when the step has rows of that source
    (grpo.source_defined)."""
    import arms
    import grpo
    import runs

    with path.open() as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert tuple(rows[0]) == runs.LOG_COLUMNS, f"{path}: header {rows[0]} != runs.LOG_COLUMNS"
    assert len(rows) - 1 == n_steps, f"{path}: {len(rows) - 1} rows, expected {n_steps}"
    for r in rows[1:]:
        empty = [c for c, v in zip(rows[0], r) if v == ""]
        assert not empty, f"{path} step {r[0]}: empty cells in {empty}"
        vals = {c: float(v) for c, v in zip(rows[0], r)}
        rule = arms.expected_finite(arm, vals) | grpo.source_defined(vals)
        bad = [c for c, v in vals.items() if math.isfinite(v) != rule.get(c, True)]
        assert not bad, (f"{path} step {r[0]} (arm {arm}): "
                         f"{[(c, vals[c], 'want finite' if rule.get(c, True) else 'want NaN') for c in bad]}")


def main(cfg: SmokeConfig) -> None:
    import arms as arm_table
    import make_synthetic_pool
    import train

    import cli

    t0 = time.time()
    cli.check_ranges(cfg, {"steps": ">=1"}, {"preset": tuple(train.PRESETS)})  # before anything builds
    base = train.PRESETS[cfg.preset][1]
    arms = cfg.arms or tuple(arm_table.ARMS)
    for a in arms:  # a one-line error for an unknown arm before anything builds
        arm_table.get(a)
    name = cfg.name or f"smoke-{time.strftime('%Y%m%d-%H%M%S')}"
    model_tag = base.model.replace("/", "_")
    pool = Path(base.teacher_pool_dir or f"out/pools/synthetic-{model_tag}")
    if not (pool / "step_000.jsonl.gz").exists():
        print(f"[smoke] building synthetic teacher pool {pool}")
        make_synthetic_pool.build(make_synthetic_pool.PoolConfig(
            model=base.model, n_problems=base.max_problems or 24, out=str(pool)))
    vhack = Path(f"out/vhack/smoke-{model_tag}.safetensors")
    if not vhack.exists():
        print(f"[smoke] extracting v_hack -> {vhack}")
        # OMP_NUM_THREADS, when set, also sets the extraction's threads (one thread: bit-reproducible)
        threads = ["--threads", os.environ["OMP_NUM_THREADS"]] if os.environ.get("OMP_NUM_THREADS") else []
        subprocess.run([sys.executable, str(ROOT / "extract_vhack_grad.py"), cfg.preset, "--name", vhack.stem,
                        *threads], check=True, cwd=ROOT)
    for k, arm in enumerate(arms, 1):
        print(f"[smoke] ---- arm {k}/{len(arms)} {arm} ({cfg.steps} steps, {time.time() - t0:.0f} s so far)")
        run = train.main(dataclasses.replace(
            base, arm=arm, steps=cfg.steps, run_name=f"{name}/{arm}", teacher_pool_dir=str(pool),
            mix_ratio=base.mix_ratio or 0.5, vhack_path=str(vhack),
            **({"surgery_on": cfg.surgery_on} if cfg.surgery_on else {})))
        check_log(run / "log.tsv", cfg.steps, arm_table.get(arm).name)
        assert (run / "eval.json").exists() and (run / "DONE").exists(), f"{run}: eval.json/DONE missing"
    print(f"[smoke] OK: {len(arms)} arms x {cfg.steps} steps in {time.time() - t0:.0f} s; "
          f"logs in out/runs/{name}/<arm>/log.tsv")


if __name__ == "__main__":
    import cli

    cli.run(lambda: main(tyro.cli(SmokeConfig)))
