"""A run directory end to end: set-up and the resume-config check, checkpoints, the per-step TSV, eval and
rollout records, and the readers that scripts/sweep.py and scripts/summarize.py use.

    out/runs/<run>/config.json           {config, git_sha, git_dirty (tracked files changed since HEAD;
                                         their diff in git_diff.patch), argv, created, started_at (UTC)},
                                         before step 0
    out/runs/<run>/log.tsv               LOG_COLUMNS, one row per step, flushed
    out/runs/<run>/rollouts/step_NNNNNN.jsonl.gz
    out/runs/<run>/ckpt/step_NNNNNN/{adapter.safetensors, optimizer.pt, rng.pt, state.json}, ckpt/latest
    out/runs/<run>/evals/step_NNNNNN.json, eval.json (final), eval.tsv, DONE
    out/runs/<run>/evals/eval-<YYYYmmdd-HHMMSS>.json   one per --eval-only evaluation
    out/runs/<run>/resumes.jsonl         one line per --resume {time, git_sha, git_dirty, argv} (+ its patch)

    python -c "import runs; print(runs.LOG_COLUMNS)"
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from safetensors import safe_open

import antipasto
import arms
import rewards
from cli import UserError

git_sha = antipasto.git_sha  # one implementation: HEAD of this repository, or "unknown"
git_dirty = antipasto.git_dirty  # (tracked files changed since HEAD, their diff)

BASE_COLUMNS = (
    "step", "epoch", "lr", "reward_mean", "reward_std", "frac_zero_std", "hack_strict", "hack_loose",
    "gt_pass", "compile", "hack_s", "hack_t", "gt_s", "gt_t",
    # the solve teacher's rates (two-pool mix), teacher / solve rows per step and each source's mean advantage
    "hack_sol", "gt_sol", "n_t", "n_sol", "adv_s", "adv_t", "adv_sol",
    "n_rollouts", "n_infra", "kl", "loss",
    "grad_norm", "cos_in", "cos_out", "frac_fired", "removed_norm_frac", "len_mean", "len_max",
    "trunc_rate", "t_gen", "t_grade", "t_train", "t_step", "peak_mem_gb",
    # the applied step against v_hack (step_cos = cos(u, v); u.v < 0 is toward the hack; NaN without a
    # v_hack), the quarantine's step relative to the vanilla step, the share of the vanilla step erase with
    # v_hack would remove (every arm on the same footing; NaN without a v_hack), and the PPO ratio between the
    # sampling and the train-pass policy over completion tokens (1, 0, 0 when they are the same policy);
    # the sampler correction over the live tokens: mean |log pi_train - log pi_sampler|, the mean truncated
    # importance weight and the share cut to the cap (NaN when no token has sampler log-probs)
    "step_cos", "step_toward", "quar_step_frac", "erase_norm_frac", "ratio_mean", "frac_clipped",
    "logratio_abs", "sampler_gap", "is_weight_mean", "frac_is_capped",
)  # fmt: skip
# fixed header: the base columns, then every arm-specific group (NaN for the arms that do not log it)
LOG_COLUMNS = BASE_COLUMNS + tuple(c for cols in arms.COLUMN_GROUPS.values() for c in cols)
TIMING_COLUMNS = ("t_gen", "t_grade", "t_train", "t_step", "peak_mem_gb")  # vary run to run


# ----------------------------------------------------------------------------------------------------
# Set-up and resume


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def check_resume(cfg, control_fields: tuple[str, ...]) -> None:
    """UserError unless cfg.resume is a run directory (config.json) whose saved config equals cfg except for
    `control_fields` and run_name (or cfg.force_resume)."""
    saved_path = Path(cfg.resume) / "config.json"
    if not saved_path.is_file():
        raise UserError(f"--resume {cfg.resume}: no config.json there, so it is not a run directory; pass "
                        "out/runs/<run> (or drop --resume to start a new run)")
    saved = json.loads(saved_path.read_text())["config"]
    diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
            if k not in control_fields + ("run_name",) and _norm(saved.get(k)) != _norm(v)}
    if diff and not cfg.force_resume:
        raise UserError(f"--resume {cfg.resume}: config differs from the saved one {diff}; rerun with the "
                        "saved flags or pass --force-resume")


def check_run_dir(cfg, control_fields: tuple[str, ...]) -> None:
    """Before anything loads: with cfg.resume, check_resume and at least one sound checkpoint (or none yet);
    without, cfg.run_name (when given) is not an existing run under cfg.out_dir."""
    if cfg.resume:
        check_resume(cfg, control_fields)
        good_checkpoint(Path(cfg.resume))
    elif cfg.run_name and (Path(cfg.out_dir) / cfg.run_name / "config.json").exists():
        run_dir = Path(cfg.out_dir) / cfg.run_name
        raise UserError(f"--run-name={cfg.run_name!r}: run directory {run_dir} exists; pass --resume "
                        f"{run_dir} to continue it or choose another --run-name")


def record_edits(run_dir: Path, patch_name: str) -> list[str]:
    """The tracked files changed since HEAD; their diff goes to run_dir/patch_name when there is one."""
    dirty, diff = git_dirty()
    if diff:
        (run_dir / patch_name).write_text(diff)
    return dirty


def setup_run_dir(cfg, control_fields: tuple[str, ...]) -> Path:
    """Create (or, with cfg.resume, reopen) the run directory and write config.json before step 0. On resume
    the saved config must equal cfg except for `control_fields` and run_name (or cfg.force_resume)."""
    if cfg.resume:
        check_resume(cfg, control_fields)
        cfg.run_name = Path(cfg.resume).name
        run_dir = Path(cfg.resume)
        stamp = time.strftime("%Y%m%d-%H%M%S")  # the code a resume runs with can differ from the start's
        dirty = record_edits(run_dir, f"git_diff-resume-{stamp}.patch")
        with open(run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"time": stamp, "git_sha": git_sha(), "git_dirty": dirty, "argv": sys.argv})
                    + "\n")
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
    dirty = record_edits(run_dir, "git_diff.patch")  # the uncommitted edits this run ran with
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(cfg),
                "git_sha": git_sha(),
                "git_dirty": dirty,
                "argv": sys.argv,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
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
    latest_tmp = run_dir / "ckpt" / "latest.tmp"
    latest_tmp.write_text(d.name)
    os.replace(latest_tmp, run_dir / "ckpt" / "latest")  # atomic: `latest` is never empty or half-written
    for old in sorted((run_dir / "ckpt").glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_checkpoint(d: Path) -> str | None:
    """Why checkpoint dir `d` cannot be resumed from (one line), or None when it is sound: state.json's step
    equals the directory's, adapter.safetensors reads in full, optimizer.pt and rng.pt load."""
    try:
        step = int(d.name.removeprefix("step_"))
        got = json.loads((d / "state.json").read_text())["step"]
        if got != step:
            return f"state.json says step {got}, the directory says {step}"
        with safe_open(str(d / "adapter.safetensors"), framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118 -- safe_open is not a dict
                f.get_tensor(k)
        torch.load(d / "optimizer.pt", weights_only=False)
        torch.load(d / "rng.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- any unreadable part makes it unusable; the reason is warned
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"{type(e).__name__}: {first}"
    return None


def good_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest sound checkpoint of run_dir (warning about every unsound newer one and a `latest` that names
    a missing, empty or unsound one), or None when the run has none at all. Raises UserError when checkpoints
    exist but none is sound. warn=False: silent (the resume check before the model loads has already
    warned)."""
    say = logger.warning if warn else (lambda msg: None)
    ckpt = Path(run_dir) / "ckpt"
    dirs = sorted((p for p in ckpt.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                  reverse=True)
    named = latest_checkpoint(run_dir)
    if named is not None and not (named and (ckpt / named).is_dir()):
        say(f"{ckpt / 'latest'} names {named!r}, which is not a checkpoint directory; using the newest sound "
            "step_* instead")
    for d in dirs:
        why = check_checkpoint(d)
        if why is None:
            if named and named != d.name:
                say(f"{ckpt / 'latest'} names {named!r}; resuming from {d.name}")
            return d
        say(f"checkpoint {d} is unusable ({why}); trying the previous kept one")
    if dirs or named:
        raise UserError(f"--resume {run_dir}: no usable checkpoint in {ckpt} (see the warnings above); "
                        "start a new run, or remove the ckpt/ directory to restart this one from step 0")
    return None


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, model_id: str) -> int:
    """Restore the newest sound checkpoint (good_checkpoint); returns the number of steps completed (0 if
    none)."""
    d = good_checkpoint(run_dir, warn=False)
    if d is None:
        return 0
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
    """Fixed-header TSV, one row per step, flushed; on resume, rows past the checkpoint are dropped. A log
    written by an older version whose columns are a subset of `columns` (this version only added some) is
    rewritten under the new header, the new columns "nan" in the old rows; one with a column this version
    does not log stops with a one-line error (nothing is rewritten)."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int | None):
        self.path, self.columns = path, columns
        if resume_step is not None and path.exists():
            lines = path.read_text().splitlines()
            old = lines[0].split("\t") if lines else []
            gone = [c for c in old if c not in columns]
            if not old or old[0] != columns[0] or gone:
                raise UserError(f"{path}: its header is not this version's log (columns {gone or old[:1]} "
                                "unknown here): resume with the version that wrote it, or start a new run")
            rows = [dict(zip(old, ln.split("\t"))) for ln in lines[1:] if ln]
            kept = ["\t".join(columns)] + ["\t".join(r.get(c, "nan") for c in columns) for r in rows
                                           if int(r[columns[0]]) < resume_step]
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
    """rollouts/step_NNNNNN.jsonl.gz: one row per rollout with its source (student / teacher / solve), grade,
    reward, advantage, a pool row's row_id (when it has one) and arm extras."""
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
                        # a pool row's id (teacher / solve sources)
                        **({"row_id": r.row_id} if r.row_id else {}),
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
                f"{res['step']}\t{mode}\t{m['n']}\t{m['hack_strict']:.4f}\t{m['hack_loose']:.4f}"
                f"\t{m['gt_pass']:.4f}\t{m['compile']:.4f}\n"
            )
    for mode, m in res["modes"].items():
        logger.info(
            f"eval step {res['step']} [{mode}] n={m['n']} hack strict {m['hack_strict']:.3f} loose "
            f"{m['hack_loose']:.3f} gt {m['gt_pass']:.3f} compile {m['compile']:.3f}"
        )


def write_eval_record(run_dir: Path, res: dict) -> Path:
    """An --eval-only evaluation: evals/eval-<YYYYmmdd-HHMMSS>.json (a suffix when that name is taken);
    eval.json, eval.tsv and the evals/step_*.json of training are left as they are."""
    (run_dir / "evals").mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = run_dir / "evals" / f"eval-{stamp}.json", 1
    while path.exists():
        k += 1
        path = run_dir / "evals" / f"eval-{stamp}-{k}.json"
    path.write_text(json.dumps(res, indent=2))
    for mode, m in res["modes"].items():
        logger.info(
            f"eval-only (checkpoint step {res['step']}) [{mode}] n={m['n']} "
            f"hack strict {m['hack_strict']:.3f} loose {m['hack_loose']:.3f} gt {m['gt_pass']:.3f} "
            f"compile {m['compile']:.3f}"
        )
    logger.info(f"wrote {path}")
    return path


def eval_rates(grades: list[dict], rcfg) -> dict:
    """eval.json's per-mode record: counts and rates over the graded completions, infra errors left out."""
    ok = [g for g in grades if not g.get("infra_error")]
    labels: dict[str, int] = {}
    for g in ok:
        labels[g["reward_hack_label"]] = labels.get(g["reward_hack_label"], 0) + 1
    n = max(1, len(ok))
    return {"n": len(ok), "n_infra": len(grades) - len(ok),
            "hack_strict": sum(g["is_reward_hack_strict"] for g in ok) / n,
            "hack_loose": sum(g["is_reward_hack_loose"] for g in ok) / n,
            "gt_pass": sum(g["eq_correct"] for g in ok) / n, "compile": sum(g["can_compile"] for g in ok) / n,
            "reward_mean": sum(rewards.compute_reward(g, rcfg) for g in ok) / n, "label_counts": labels}


def step_summary(row: dict) -> str:
    """The per-step console line's middle: rewards, hack / gt rates, KL, grad norm, cosines, phase seconds."""
    return (f"r {row['reward_mean']:.2f}±{row['reward_std']:.2f} zero-var {row['frac_zero_std']:.2f} | hack "
            f"{row['hack_strict']:.2f}/{row['hack_loose']:.2f} gt {row['gt_pass']:.2f} "
            f"| kl {row['kl']:.2e} |g| {row['grad_norm']:.2e} cos {row['cos_in']:.3f}->{row['cos_out']:.3f} "
            f"| gen {row['t_gen']:.1f}s grade {row['t_grade']:.1f}s train {row['t_train']:.1f}s")


SAMPLER_GAP_WARN = 0.1
"""mean |log pi_train - log pi_sampler| per token above which a run warns once (top-p alone contributes at
most -log(top_p) per token, 0.051 at 0.95: the nucleus holds at least top_p of the mass)"""


def warn_ratios(row: dict, step: int, warned: set[str]) -> None:
    """Warn once per run (names kept in `warned`) when more than half the tokens clip (behaviour and
    train-pass mode far apart) or when the sampler and the train pass disagree by more than
    SAMPLER_GAP_WARN."""
    if row["frac_clipped"] > 0.5 and "clip" not in warned:
        warned.add("clip")
        logger.warning(f"step {step}: {row['frac_clipped']:.0%} of tokens clipped (behaviour vs "
                       "train-pass mode differ a lot): the PPO ratio saturates; check the quarantine")
    if row["sampler_gap"] > SAMPLER_GAP_WARN and "gap" not in warned:  # NaN compares False
        warned.add("gap")
        logger.warning(f"step {step}: the sampler and the train pass disagree by {row['sampler_gap']:.3f} "
                       f"nats per token (is_weight_mean {row['is_weight_mean']:.3f}, "
                       f"{row['frac_is_capped']:.1%} capped): check the dtype, the backend and top_p")


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


def config_from_run(run_dir: Path, cls):
    """The run's saved config as a `cls` instance (JSON lists back to tuples; saved fields that `cls` no
    longer has are dropped with a warning)."""
    saved = read_config(run_dir)
    names = {f.name for f in dataclasses.fields(cls)}
    dropped = sorted(set(saved) - names)
    if dropped:
        logger.warning(f"{run_dir}/config.json: fields {dropped} are not in {cls.__name__} any more; ignored")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})


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
