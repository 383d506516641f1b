"""summarize.py: one table and four plots for a sweep: did erase/route cut deploy hack rate at matched pass rate,
beyond the random-direction and shrinkage controls?

    python scripts/summarize.py SWEEP                         # runs listed in out/sweeps/SWEEP/sweep.json
    python scripts/summarize.py SWEEP --runs out/runs/a out/runs/b ...   # explicit run dirs (no manifest)
    python scripts/summarize.py SWEEP --out-root /tmp/out --n-boot 10000 --seed 0 --broke-out 0.2

Writes to <out-root>/sweeps/SWEEP/:
    results.tsv   long format, one row per (arm, mode, step, metric): n seeds, mean, 95% bootstrap CI across
                  seeds, min/max, the per-seed values, difference vs vanilla with its bootstrap CI, broke-out
                  count (final deploy hack_strict > --broke-out), flags (placebo / shrinkage)
    runs.tsv      every run of the sweep with its status (done / incomplete / missing / done_without_eval)
    gate.tsv      gate arms: per run, the mean over steps of the logged gate columns (zone sizes, precision/recall)
    results.md    the headline tables, missing/incomplete runs listed, plot links
    hack_vs_step.png, pass_vs_step.png, hack_vs_pass.png, projection_vs_step.png

Statistics: percentile bootstrap of the mean across seeds (B resamples, numpy Generator seeded from --seed
and the cell's key, so every number is reproducible); a difference vs vanilla resamples both arms'
seeds independently (runs are independent, not paired). With 3 seeds these CIs are coarse: read them
as "how spread are the seeds", not as a test. Flags (final step, deploy mode):
    within-placebo   erase/route/gate-route's difference vs vanilla lies inside the CI of its placebo's
                     (erase-random / route-random / gate-route-random and gate-random)
    within-shrinkage route's deploy mean lies inside the CI of route's own shrinkage-control mode
Final numbers come from each run's eval.json (only runs with DONE); intermediate ones from evals/step_*.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tyro  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import arms as arm_table  # noqa: E402  (`arms` names arm lists below)
import runs  # noqa: E402

METRICS = ("hack_strict", "hack_loose", "gt_pass", "compile")
# arm -> its placebo controls (arms.py's placebo_of: the same edit with a random direction, or a random gate)
PLACEBOS = {a: arm_table.placebos(a) for a in arm_table.ARMS if arm_table.placebos(a)}
ARM_STYLE = {  # color, linestyle (plot looks only; arms not listed get a cycle colour): placebos dashed, lighter
    "vanilla": ("black", "-"),
    "measure": ("dimgray", ":"),
    "erase": ("tab:blue", "-"),
    "erase-random": ("lightskyblue", "--"),
    "route": ("tab:red", "-"),
    "route-random": ("lightsalmon", "--"),
    "oracle-penalty": ("tab:green", "-."),
    "gate-route": ("tab:purple", "-"),
    "gate-route-random": ("plum", "--"),
    "gate-random": ("thistle", ":"),
    "vanilla-2x": ("gray", "--"),
    "shrinkage": ("tab:brown", "-."),
    "am": ("tab:olive", "-"),
}
GATE_LOG_COLUMNS = arm_table.COLUMN_GROUPS["gate"]


@dataclasses.dataclass
class Config:
    sweep: tyro.conf.Positional[str]
    """sweep name: reads <out-root>/sweeps/<sweep>/sweep.json, writes results there"""
    out_root: Path = REPO / "out"
    runs: tuple[Path, ...] = ()
    """explicit run directories instead of the manifest (arm/seed read from their config.json)"""
    n_boot: int = 10000
    seed: int = 0
    """bootstrap RNG seed"""
    broke_out: float = 0.2
    """a seed 'broke out' when its final deploy hack_strict exceeds this (the benchmark's >20% rule)"""
    smooth: int = 0
    """rolling-mean window for per-step training curves (0 = steps/20, at least 1)"""


# -------------------------------------------------------------------------------------------- loading
def arm_seed_from_dir(run_dir: Path) -> tuple[str, int]:
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no config.json, cannot tell its arm/seed; list it in a sweep.json")
    cfg = runs.read_config(run_dir)
    return cfg["arm"], int(cfg["seed"])


def list_runs(c: Config) -> list[dict]:
    """[{name, arm, seed, run_dir}] from --runs, else the sweep's manifest."""
    if c.runs:
        out = []
        for d in c.runs:
            arm, seed = arm_seed_from_dir(Path(d))
            out.append(dict(name=Path(d).name, arm=arm, seed=seed, run_dir=str(d)))
        return out
    man = c.out_root / "sweeps" / c.sweep / "sweep.json"
    if not man.exists():
        raise FileNotFoundError(f"{man} not found: run scripts/sweep.py with --name {c.sweep} first, or pass --runs DIR ...")
    return list(json.loads(man.read_text())["runs"].values())


def last_log_step(run_dir: Path) -> int | None:
    log = run_dir / "log.tsv"
    if not log.exists():
        return None
    lines = log.read_text().strip().splitlines()
    return int(lines[-1].split("\t")[0]) + 1 if len(lines) > 1 else 0  # log `step` is 0-based: +1 = completed


def run_status(run_dir: Path) -> tuple[str, str]:
    """(status, detail): done | done_without_eval | incomplete | missing."""
    if not run_dir.exists():
        return "missing", "no run directory (never started, or started elsewhere)"
    ck = runs.latest_checkpoint(run_dir) or "none"
    if (run_dir / "DONE").exists():
        if (run_dir / "eval.json").exists():
            return "done", ""
        return "done_without_eval", "DONE but no eval.json (eval_at_end off?): no final numbers"
    return "incomplete", f"no DONE: crashed, killed or still running; {last_log_step(run_dir)} steps logged, checkpoint {ck}"


def load_evals(runs: list[dict]) -> pd.DataFrame:
    """Long frame: name, arm, seed, step, final, mode, metric, value."""
    rows = []
    for r in runs:
        d = Path(r["run_dir"])
        final_path = d / "eval.json"
        final = json.loads(final_path.read_text()) if (d / "DONE").exists() and final_path.exists() else None
        files = sorted((d / "evals").glob("step_*.json")) if (d / "evals").exists() else []
        results = [(json.loads(f.read_text()), False) for f in files]
        if final is not None:
            results = [(res, False) for res, _ in results if res["step"] != final["step"]] + [(final, True)]
        for res, is_final in results:
            for mode, m in res["modes"].items():
                for metric in METRICS:
                    if metric in m:
                        rows.append(dict(name=r["name"], arm=r["arm"], seed=int(r["seed"]), step=int(res["step"]),
                                         final=is_final, mode=mode, metric=metric, value=float(m[metric])))
    cols = ["name", "arm", "seed", "step", "final", "mode", "metric", "value"]
    return pd.DataFrame(rows, columns=cols)


def load_logs(runs: list[dict]) -> pd.DataFrame:
    frames = []
    for r in runs:
        log = Path(r["run_dir"]) / "log.tsv"
        if log.exists():
            df = pd.read_csv(log, sep="\t")
            if len(df):
                df["arm"], df["seed"], df["name"] = r["arm"], int(r["seed"]), r["name"]
                frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------------------ statistics
def cell_rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def bootstrap_mean_ci(x, n_boot: int, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of x (1-D); degenerate [x, x] for one value."""
    x = np.asarray(x, dtype=float)
    assert x.ndim == 1 and len(x) > 0, f"bootstrap needs a non-empty 1-D sample, got shape {x.shape}"
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # (B,)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def bootstrap_diff_ci(x, y, n_boot: int, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(x) - mean(y), resampling x and y independently."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    assert len(x) and len(y), "bootstrap_diff_ci needs two non-empty samples"
    mx = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # (B,)
    my = y[rng.integers(0, len(y), size=(n_boot, len(y)))].mean(axis=1)  # (B,)
    a = (1 - level) / 2
    return float(np.quantile(mx - my, a)), float(np.quantile(mx - my, 1 - a))


def arm_order(arms) -> list[str]:
    known = [a for a in arm_table.ARMS if a in set(arms)]
    return known + sorted(set(arms) - set(known))


def summarize(ev: pd.DataFrame, c: Config) -> pd.DataFrame:
    """One row per (arm, mode, step/final, metric) with mean, CI, diff vs vanilla, broke-out, flags."""
    rows = []
    for (final, step_key), g_step in ev.groupby([ev["final"], np.where(ev["final"], -1, ev["step"])], sort=True):
        for (arm, mode, metric), g in g_step.groupby(["arm", "mode", "metric"], sort=False):
            g = g.sort_values("seed")
            x = g["value"].to_numpy()
            key = (arm, mode, "final" if final else int(step_key), metric)
            lo, hi = bootstrap_mean_ci(x, c.n_boot, cell_rng(c.seed, *key))
            row = dict(arm=arm, mode=mode, step=int(g["step"].max()), final=bool(final), metric=metric, n=len(x),
                       mean=float(x.mean()), ci_lo=lo, ci_hi=hi, min=float(x.min()), max=float(x.max()),
                       values=",".join(f"s{s}:{v:.4f}" for s, v in zip(g["seed"], x)),
                       diff_vs_vanilla=math.nan, diff_ci_lo=math.nan, diff_ci_hi=math.nan, broke_out="", flags="")
            van = g_step[(g_step["arm"] == "vanilla") & (g_step["mode"] == "deploy") & (g_step["metric"] == metric)]
            if arm != "vanilla" and len(van):
                y = van.sort_values("seed")["value"].to_numpy()
                row["diff_vs_vanilla"] = float(x.mean() - y.mean())
                row["diff_ci_lo"], row["diff_ci_hi"] = bootstrap_diff_ci(x, y, c.n_boot, cell_rng(c.seed, "diff", *key))
            if final and mode == "deploy" and metric == "hack_strict":
                row["broke_out"] = f"{int((x > c.broke_out).sum())}/{len(x)}"
            rows.append(row)
    tab = pd.DataFrame(rows)
    if not len(tab):
        return tab
    # flags at the final step, deploy mode
    fin = tab[tab["final"]]
    for i, row in fin.iterrows():
        if row["mode"] != "deploy":
            continue
        flags = []
        for placebo in PLACEBOS.get(row["arm"], ()):
            pl = fin[(fin["arm"] == placebo) & (fin["mode"] == "deploy") & (fin["metric"] == row["metric"])]
            if len(pl) and not math.isnan(row["diff_vs_vanilla"]) and not math.isnan(pl.iloc[0]["diff_ci_lo"]):
                if pl.iloc[0]["diff_ci_lo"] <= row["diff_vs_vanilla"] <= pl.iloc[0]["diff_ci_hi"]:
                    flags.append(f"within-placebo({placebo})")
        sh = fin[(fin["arm"] == row["arm"]) & (fin["mode"] == "shrinkage") & (fin["metric"] == row["metric"])]
        if len(sh) and sh.iloc[0]["ci_lo"] <= row["mean"] <= sh.iloc[0]["ci_hi"]:
            flags.append("within-shrinkage")
        tab.loc[i, "flags"] = ";".join(flags)
    tab["_order"] = tab["arm"].map({a: k for k, a in enumerate(arm_order(tab["arm"]))})
    tab = tab.sort_values(["final", "step", "_order", "mode", "metric"]).drop(columns="_order")
    return tab.reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ plots
def style(arm: str, k: int) -> tuple[str, str]:
    return ARM_STYLE.get(arm, (f"C{k % 10}", "-"))


def band_plot(ax, df: pd.DataFrame, x: str, y: str, smooth: int, title: str, ylabel: str) -> None:
    """Mean over seeds (line) and min-max over seeds (band) per arm."""
    for k, arm in enumerate(arm_order(df["arm"].unique())):
        d = df[df["arm"] == arm]
        per_seed = d.pivot_table(index=x, columns="seed", values=y)  # (steps, seeds)
        if smooth > 1:
            per_seed = per_seed.rolling(smooth, min_periods=1).mean()
        color, ls = style(arm, k)
        n = per_seed.shape[1]
        ax.plot(per_seed.index, per_seed.mean(axis=1), color=color, ls=ls, lw=2, marker="o" if len(per_seed) < 15 else None,
                ms=4, label=f"{arm} (n={n})")
        if n > 1:
            ax.fill_between(per_seed.index, per_seed.min(axis=1), per_seed.max(axis=1), color=color, alpha=0.15)
    xs = df[x].unique()
    if len(xs) == 1:  # a single eval step: keep integer ticks around it
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_metric_vs_step(ev: pd.DataFrame, logs: pd.DataFrame, metric: str, label: str, path: Path, smooth: int) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    if len(logs) and metric in logs:
        lg = logs.assign(done=logs["step"] + 1)
        band_plot(axes[0], lg, "done", metric, smooth, f"training rollouts: {label}\n(rolling mean {smooth} steps; band = seed min-max)", label)
    else:
        axes[0].text(0.5, 0.5, "no log.tsv rows", ha="center", transform=axes[0].transAxes)
    de = ev[(ev["mode"] == "deploy") & (ev["metric"] == metric)]
    if len(de):
        band_plot(axes[1], de, "step", "value", 1, f"deploy eval (test set): {label}\n(band = seed min-max)", label)
    else:
        axes[1].text(0.5, 0.5, "no evals", ha="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
    handles, labels = axes[1].get_legend_handles_labels() if len(de) else axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="arm")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hack_vs_pass(ev: pd.DataFrame, path: Path, broke_out: float) -> None:
    fin = ev[ev["final"] & (ev["mode"] == "deploy")]
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    markers = "osD^v<>PX*"
    arms = arm_order(fin["arm"].unique())
    for k, arm in enumerate(arms):
        d = fin[fin["arm"] == arm].pivot_table(index="seed", columns="metric", values="value")
        d["gt_pass"] += (k - (len(arms) - 1) / 2) * 0.008  # tiny per-arm x offset: identical points stay visible
        color, _ = style(arm, k)
        ax.scatter(d["gt_pass"], d["hack_strict"], s=70, color=color, marker=markers[k % len(markers)],
                   edgecolor="black", lw=0.6, label=arm, zorder=3)
        for s, row in d.iterrows():
            ax.annotate(f"s{s}", (row["gt_pass"], row["hack_strict"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(broke_out, color="gray", ls=":", lw=1, label=f"broke-out threshold {broke_out}")
    ax.set_xlabel("deploy gt pass@1 (final eval)")
    ax.set_ylabel("deploy strict hack rate (final eval)")
    ax.set_title("final deploy hack vs pass, one point per seed\n(x offset by <= 0.02 per arm so equal points stay visible)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_projection(logs: pd.DataFrame, path: Path, smooth: int) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    have = logs[logs["cos_in"].notna()] if len(logs) and "cos_in" in logs else pd.DataFrame()
    if len(have):
        lg = have.assign(done=have["step"] + 1)
        band_plot(axes[0], lg, "done", "cos_in", smooth, f"cos(grad, direction) before surgery\n(rolling mean {smooth}; band = seed min-max)", "cos_in")
        band_plot(axes[1], lg, "done", "frac_fired", smooth, "fraction of modules where the edit fired (cos > 0)", "frac_fired")
        axes[1].set_ylim(-0.03, 1.03)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", title="arm")
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no projected arm logged cos_in", ha="center", transform=ax.transAxes)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- report
def fmt_ci(row) -> str:
    return f"{row['mean']:.3f} [{row['ci_lo']:.3f}, {row['ci_hi']:.3f}]"


def fmt_diff(row) -> str:
    if math.isnan(row["diff_vs_vanilla"]):
        return "-"
    return f"{row['diff_vs_vanilla']:+.3f} [{row['diff_ci_lo']:+.3f}, {row['diff_ci_hi']:+.3f}]"


def gate_table(logs: pd.DataFrame) -> pd.DataFrame:
    """One row per gate-arm run: the mean over its logged steps of each gate column (NaN steps skipped)."""
    if not len(logs) or "gate_n_route" not in logs:
        return pd.DataFrame()
    g = logs[logs["gate_n_route"].notna()]
    if not len(g):
        return pd.DataFrame()
    cols = [c for c in GATE_LOG_COLUMNS if c in g]
    out = g.groupby(["arm", "seed", "name"], sort=False)[cols].mean().reset_index()
    out["_order"] = out["arm"].map({a: k for k, a in enumerate(arm_order(out["arm"]))})
    return out.sort_values(["_order", "seed"]).drop(columns="_order").reset_index(drop=True)


def write_markdown(c: Config, tab: pd.DataFrame, runs_tab: pd.DataFrame, plots: list[str], path: Path,
                   logs: pd.DataFrame | None = None) -> None:
    L = [f"# Sweep `{c.sweep}`: results", "",
         f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by `scripts/summarize.py {c.sweep}`: {len(runs_tab)} runs, "
         f"{int((runs_tab['status'] == 'done').sum())} done. Mean over seeds with a 95% percentile-bootstrap CI "
         f"({c.n_boot} resamples, seed {c.seed}); Δ = arm − vanilla (independent bootstrap). Broke out = final "
         f"deploy hack_strict > {c.broke_out}. Flags: `within-placebo(X)` = the arm's Δ vs vanilla lies inside X's "
         f"Δ CI; `within-shrinkage` = the deploy mean lies inside the arm's own shrinkage-control CI.", ""]
    bad = runs_tab[runs_tab["status"] != "done"]
    L += ["## Missing or incomplete runs", ""]
    if len(bad):
        L += [f"- `{r['name']}` ({r['arm']}, seed {r['seed']}): **{r['status']}**: {r['detail']}" for _, r in bad.iterrows()]
    else:
        L += ["None: every run of the sweep has DONE and eval.json."]
    L += [""]
    fin = tab[tab["final"]] if len(tab) else tab
    if len(fin):
        step = int(fin["step"].max())
        L += [f"## Final eval (step {step}), deploy mode", "",
              "| arm | n | hack_strict | Δ hack_strict | hack_loose | gt_pass | Δ gt_pass | compile | broke out | flags (hack_strict) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for arm in arm_order(fin["arm"].unique()):
            d = fin[(fin["arm"] == arm) & (fin["mode"] == "deploy")].set_index("metric")
            if "hack_strict" not in d.index:
                continue
            hs = d.loc["hack_strict"]
            cells = [arm, str(hs["n"]), fmt_ci(hs), fmt_diff(hs),
                     fmt_ci(d.loc["hack_loose"]) if "hack_loose" in d.index else "-",
                     fmt_ci(d.loc["gt_pass"]) if "gt_pass" in d.index else "-",
                     fmt_diff(d.loc["gt_pass"]) if "gt_pass" in d.index else "-",
                     fmt_ci(d.loc["compile"]) if "compile" in d.index else "-", hs["broke_out"], hs["flags"] or "-"]
            L.append("| " + " | ".join(cells) + " |")
        L += [""]
        other = fin[fin["mode"] != "deploy"]
        if len(other):
            L += ["## Final eval, route controls (quarantine on; shrinkage control)", "",
                  "| arm | mode | n | hack_strict | gt_pass |", "|---|---|---|---|---|"]
            for (arm, mode), d in other.groupby(["arm", "mode"], sort=False):
                d = d.set_index("metric")
                L.append(f"| {arm} | {mode} | {d.loc['hack_strict', 'n']} | {fmt_ci(d.loc['hack_strict'])} | "
                         f"{fmt_ci(d.loc['gt_pass']) if 'gt_pass' in d.index else '-'} |")
            L += [""]
    gt = gate_table(logs) if logs is not None else pd.DataFrame()
    if len(gt):
        L += ["## Gate arms: per-step gate statistics from log.tsv (measurement only)", "",
              "Mean over steps, then mean [min, max] over seeds. precision = strict hacks among routed rollouts, "
              "recall = routed among strict hacks (the grader's labels; never used for training); placebo pairing: "
              "gate-route vs gate-route-random (same gate, Haar-random direction) and gate-random (random q fraction).", "",
              "| arm | seeds | routed / step | precision | recall | AUC | hack rate route | hack rate keep |", "|---|---|---|---|---|---|---|---|"]
        for arm, d in gt.groupby("arm", sort=False):
            def cell(c):
                x = d[c].dropna()
                return f"{x.mean():.3f} [{x.min():.3f}, {x.max():.3f}]" if len(x) else "-"
            L.append(f"| {arm} | {len(d)} | {cell('gate_n_route')} | {cell('gate_precision')} | {cell('gate_recall')} | "
                     f"{cell('gate_auc')} | {cell('gate_hack_route')} | {cell('gate_hack_keep')} |")
        L += [""]
    mid = tab[(~tab["final"]) & (tab["mode"] == "deploy")] if len(tab) else tab
    if len(mid):
        L += ["## Intermediate evals, deploy mode", "", "| step | arm | n | hack_strict | Δ hack_strict | gt_pass | Δ gt_pass |",
              "|---|---|---|---|---|---|---|"]
        for (step, arm), d in mid.groupby(["step", "arm"], sort=False):
            d = d.set_index("metric")
            L.append(f"| {step} | {arm} | {d.loc['hack_strict', 'n']} | {fmt_ci(d.loc['hack_strict'])} | {fmt_diff(d.loc['hack_strict'])} | "
                     f"{fmt_ci(d.loc['gt_pass'])} | {fmt_diff(d.loc['gt_pass'])} |")
        L += [""]
    L += ["## Runs", "", "| run | arm | seed | status | steps logged |", "|---|---|---|---|---|"]
    L += [f"| {r['name']} | {r['arm']} | {r['seed']} | {r['status']} | {r['steps_logged']} |" for _, r in runs_tab.iterrows()]
    L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    L += ["Full table: `results.tsv` (every arm x mode x step x metric); run statuses: `runs.tsv`.", ""]
    path.write_text("\n".join(L))


def main(c: Config) -> Path:
    out = c.out_root / "sweeps" / c.sweep
    out.mkdir(parents=True, exist_ok=True)
    runs = list_runs(c)
    assert runs, f"sweep {c.sweep}: no runs listed"
    runs_tab = pd.DataFrame([dict(name=r["name"], arm=r["arm"], seed=int(r["seed"]), run_dir=r["run_dir"],
                                  status=run_status(Path(r["run_dir"]))[0], detail=run_status(Path(r["run_dir"]))[1],
                                  steps_logged=last_log_step(Path(r["run_dir"])))
                             for r in runs])
    ev = load_evals(runs)
    logs = load_logs(runs)
    tab = summarize(ev, c)
    tab.to_csv(out / "results.tsv", sep="\t", index=False, float_format="%.6g")
    runs_tab.to_csv(out / "runs.tsv", sep="\t", index=False)
    n_steps = int(logs["step"].max()) + 1 if len(logs) else 1
    smooth = c.smooth or max(1, n_steps // 20)
    plots = ["hack_vs_step.png", "pass_vs_step.png", "hack_vs_pass.png", "projection_vs_step.png"]
    plot_metric_vs_step(ev, logs, "hack_strict", "strict hack rate", out / plots[0], smooth)
    plot_metric_vs_step(ev, logs, "gt_pass", "gt pass@1", out / plots[1], smooth)
    plot_hack_vs_pass(ev, out / plots[2], c.broke_out)
    plot_projection(logs, out / plots[3], smooth)
    write_markdown(c, tab, runs_tab, plots, out / "results.md", logs)
    gate_table(logs).to_csv(out / "gate.tsv", sep="\t", index=False, float_format="%.6g")
    print(f"[summarize] {out}/results.md, results.tsv, runs.tsv, {', '.join(plots)}")
    bad = runs_tab[runs_tab["status"] != "done"]
    if len(bad):
        print(f"[summarize] {len(bad)} runs not done: " + ", ".join(f"{n} ({s})" for n, s in zip(bad["name"], bad["status"])))
    return out


if __name__ == "__main__":
    main(tyro.cli(Config))
