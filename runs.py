"""A run directory end to end: set-up and the resume-config check, checkpoints, the per-step TSV, eval and
rollout records, and the readers that scripts/sweep.py and scripts/summarize.py use.

    out/runs/<run>/config.json           {config, git_sha, argv, created}, written before step 0
    out/runs/<run>/log.tsv               LOG_COLUMNS, one row per step, flushed
    out/runs/<run>/rollouts/step_NNNNNN.jsonl.gz
    out/runs/<run>/ckpt/step_NNNNNN/{adapter.safetensors, optimizer.pt, rng.pt, state.json}, ckpt/latest
    out/runs/<run>/evals/step_NNNNNN.json, eval.json (final), eval.tsv, DONE

    python -c "import runs; print(runs.LOG_COLUMNS)"
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from loguru import logger

import antipasto
import arms

git_sha = antipasto.git_sha  # one implementation: HEAD of this repository, or "unknown"

BASE_COLUMNS = (
    "step", "epoch", "lr", "reward_mean", "reward_std", "frac_zero_std", "hack_strict", "hack_loose",
    "gt_pass", "compile", "hack_s", "hack_t", "gt_s", "gt_t", "n_rollouts", "n_infra", "kl", "loss",
    "grad_norm", "cos_in", "cos_out", "frac_fired", "removed_norm_frac", "len_mean", "len_max",
    "trunc_rate", "t_gen", "t_grade", "t_train", "t_step", "peak_mem_gb",
    # the applied step against v_hack (step_cos = cos(u, v); u.v < 0 is toward the hack; NaN without a v_hack),
    # the quarantine's step relative to the vanilla step, and the PPO ratio between the sampling and the
    # train-pass policy over completion tokens (1, 0, 0 when they are the same policy)
    "step_cos", "step_toward", "quar_step_frac", "ratio_mean", "frac_clipped", "logratio_abs",
)  # fmt: skip
# fixed header: the base columns, then every arm-specific group (NaN for the arms that do not log it)
LOG_COLUMNS = BASE_COLUMNS + tuple(c for cols in arms.COLUMN_GROUPS.values() for c in cols)
TIMING_COLUMNS = ("t_gen", "t_grade", "t_train", "t_step", "peak_mem_gb")  # vary run to run


# ----------------------------------------------------------------------------------------------------
# Set-up and resume


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def setup_run_dir(cfg, control_fields: tuple[str, ...]) -> Path:
    """Create (or, with cfg.resume, reopen) the run directory and write config.json before step 0. On resume the
    saved config must equal cfg except for `control_fields` and run_name (or cfg.force_resume)."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved_path = run_dir / "config.json"
        if not saved_path.exists():
            raise FileNotFoundError(f"--resume {cfg.resume}: no config.json there; is it a run directory?")
        saved = json.loads(saved_path.read_text())["config"]
        ours = dataclasses.asdict(cfg)
        diff = {
            k: (saved.get(k), v)
            for k, v in ours.items()
            if k not in control_fields + ("run_name",) and _norm(saved.get(k)) != _norm(v)
        }
        if diff and not cfg.force_resume:
            raise ValueError(
                f"--resume {cfg.resume}: config differs from the saved one {diff}; rerun with the saved "
                "flags or pass --force-resume"
            )
        cfg.run_name = run_dir.name
        return run_dir
    if not cfg.run_name:
        cfg.run_name = f"{cfg.arm}__s{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if (run_dir / "config.json").exists():
        raise FileExistsError(
            f"run directory {run_dir} exists; pass --resume {run_dir} to continue it or choose "
            "another --run-name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(cfg),
                "git_sha": git_sha(),
                "argv": sys.argv,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    return run_dir


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, model_id: str, keep: int) -> None:
    """ckpt/step_NNNNNN/{adapter.safetensors, optimizer.pt, rng.pt, state.json}; `step` = steps completed."""
    d = run_dir / "ckpt" / f"step_{step:06d}"
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    antipasto.save_adapter(tmp / "adapter.safetensors", model, model_id, extra={"step": str(step)})
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
    )
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)  # atomic: a crash mid-save leaves the previous checkpoint intact
    (run_dir / "ckpt" / "latest").write_text(d.name)
    for old in sorted((run_dir / "ckpt").glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, model_id: str) -> int:
    """Restore the latest checkpoint; returns the number of steps completed (0 if none)."""
    latest = run_dir / "ckpt" / "latest"
    if not latest.exists():
        return 0
    d = run_dir / "ckpt" / latest.read_text().strip()
    antipasto.load_adapter(d / "adapter.safetensors", model, model_id)
    if optimizer is not None:
        st = torch.load(d / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
    rng = torch.load(d / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return json.loads((d / "state.json").read_text())["step"]


# ----------------------------------------------------------------------------------------------------
# Per-step records


class TsvLog:
    """Fixed-header TSV, one row per step, flushed; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int | None):
        self.path, self.columns = path, columns
        if resume_step is not None and path.exists():
            lines = path.read_text().splitlines()
            assert lines and lines[0].split("\t") == list(columns), (
                f"{path}: header differs from runs.LOG_COLUMNS"
            )
            kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) < resume_step]
            path.write_text("\n".join(kept) + "\n")
        elif not path.exists():
            path.write_text("\t".join(columns) + "\n")

    def write(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        assert not unknown, f"log row has columns not in the header: {unknown}"
        with self.path.open("a") as f:
            f.write("\t".join(_fmt(row.get(c, float("nan"))) for c in self.columns) + "\n")
            f.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_rollouts(run_dir: Path, step: int, rollouts) -> None:
    """rollouts/step_NNNNNN.jsonl.gz: one row per rollout with its grade, reward, advantage and arm extras."""
    with gzip.open(run_dir / "rollouts" / f"step_{step:06d}.jsonl.gz", "wt") as f:
        for r in rollouts:
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "problem_id": r.problem_id,
                        "source": r.source,
                        "completion": r.completion,
                        "n_tokens": len(r.completion_ids),
                        "truncated": r.truncated,
                        "reward": r.reward,
                        "advantage": r.advantage,
                        "grade": r.grade,
                        **r.extra,
                    }
                )
                + "\n"
            )


def write_eval(run_dir: Path, res: dict, final: bool) -> None:
    """evals/step_NNNNNN.json, eval.json when final, one eval.tsv row per mode."""
    (run_dir / "evals").mkdir(exist_ok=True)
    (run_dir / "evals" / f"step_{res['step']:06d}.json").write_text(json.dumps(res, indent=2))
    if final:
        (run_dir / "eval.json").write_text(json.dumps(res, indent=2))
    with (run_dir / "eval.tsv").open("a") as f:
        for mode, m in res["modes"].items():
            f.write(
                f"{res['step']}\t{mode}\t{m['n']}\t{m['hack_strict']:.4f}\t{m['hack_loose']:.4f}\t{m['gt_pass']:.4f}"
                f"\t{m['compile']:.4f}\n"
            )
    for mode, m in res["modes"].items():
        logger.info(
            f"eval step {res['step']} [{mode}] n={m['n']} hack strict {m['hack_strict']:.3f} loose "
            f"{m['hack_loose']:.3f} gt {m['gt_pass']:.3f} compile {m['compile']:.3f}"
        )


def peak_mem_gb(device: str) -> float:
    """GPU: peak allocated this step; CPU: the process's max resident set size so far."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------
# Readers (scripts/sweep.py, scripts/summarize.py)


def read_config(run_dir: Path) -> dict:
    """The run's saved config fields (config.json's "config")."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.json; is it a run directory?")
    return json.loads(path.read_text())["config"]


def state(run_dir: Path) -> str:
    """done: DONE written; resume: a checkpoint or a config.json exists; new: neither."""
    run_dir = Path(run_dir)
    if (run_dir / "DONE").exists():
        return "done"
    ckpt = run_dir / "ckpt"
    if (ckpt / "latest").exists() or any(ckpt.glob("step_*")) or (run_dir / "config.json").exists():
        return "resume"
    return "new"


def latest_checkpoint(run_dir: Path) -> str | None:
    """The name ckpt/latest points to, or None."""
    p = Path(run_dir) / "ckpt" / "latest"
    return p.read_text().strip() if p.exists() else None


def final_eval(run_dir: Path) -> dict | None:
    """eval.json of a finished run (DONE written), else None."""
    run_dir = Path(run_dir)
    p = run_dir / "eval.json"
    return json.loads(p.read_text()) if (run_dir / "DONE").exists() and p.exists() else None
