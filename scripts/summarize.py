"""summarize.py: results.md (preregistered primary comparison first, then exploratory tables), results.tsv and
four plots for a sweep.

    python scripts/summarize.py SWEEP                         # runs listed in out/sweeps/SWEEP/sweep.json
    python scripts/summarize.py out/runs/smoke-20261201-1200  # a folder of run dirs (as `just smoke` writes);
                                                              # results in out/sweeps/smoke-20261201-1200/
    python scripts/summarize.py NAME --runs out/runs/a out/runs/b ...   # explicit run dirs (no manifest)
    python scripts/summarize.py SWEEP --out-root /tmp/out --breakout 0.2

Writes to <out-root>/sweeps/<name>/:
    results.md    the primary comparison (stats.analyze + stats.primary_markdown, from prereg.json; called
                  significant only when prereg.json exists and was written before the first run started),
                  then exploratory tables, missing/incomplete runs, plot links. docs/sweeps.md explains it.
    results.tsv   long format, one row per (arm, mode, step, metric): n seeds, mean, min, max, the per-seed
                  values, the comparison with vanilla (difference, conservative 95% interval, exact one-sided
                  permutation p-values, direction-aware flag), breakouts (final deploy
                  hack_strict >= --breakout) with Fisher's one-sided p vs vanilla, and flags vs the arm's
                  placebos / shrinkage mode
    runs.tsv      every run with its status (done / incomplete / missing / done_without_eval / pilot)
    gate.tsv      gate arms: per run, the mean over steps of the logged gate columns
    hack_vs_step.png, pass_vs_step.png, hack_vs_pass.png, projection_vs_step.png

Statistics (stats.py, docs/sweeps_stats.md): runs are independent across arms; every comparison is the exact
permutation test over seed labels with a conservative bounded-outcome interval; no flag below 2 runs per arm.
The pilot run (vanilla at the prereg's pilot seed, kept because it hacked) is in no comparison.
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
import matplotlib.transforms  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tyro  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import arms as arm_table  # noqa: E402  (`arms` names arm lists below)
import cli as cli_lib  # noqa: E402  (`cli` is this script's entry point)
import runs  # noqa: E402
import stats  # noqa: E402

METRICS = ("hack_strict", "hack_loose", "gt_pass", "compile")
LOWER_IS_BETTER = {"hack_strict": True, "hack_loose": True, "gt_pass": False, "compile": False}
# arm -> its placebo controls (arms.py's placebo_of: the same edit with a random direction, or a random gate)
PLACEBOS = {a: arm_table.placebos(a) for a in arm_table.ARMS if arm_table.placebos(a)}
# Arms not in arms.ARMS (or with no colour there) get a FALLBACK_COLORS colour fixed by their name.
FALLBACK_COLORS = ("#5254a3", "#8ca252", "#ad494a", "#a55194", "#6b6ecf", "#b5cf6b")
CONTEXT_GREY = "0.85"  # the other arms' seeds in hack_vs_pass
GATE_LOG_COLUMNS = arm_table.COLUMN_GROUPS["gate"]
PLOTS = ("hack_vs_step.png", "pass_vs_step.png", "hack_vs_pass.png", "projection_vs_step.png")


@dataclasses.dataclass
class Config:
    """Summarize a sweep's runs into results.md / results.tsv / PNGs."""

    sweep: tyro.conf.Positional[str]
    """sweep name (reads <out-root>/sweeps/<sweep>/sweep.json), or a folder of run dirs such as
    out/runs/smoke-<time>"""
    out_root: Path = REPO / "out"
    """reads <out-root>/sweeps/<name>/ (sweep.json, prereg.json), writes the results there"""
    runs: tuple[Path, ...] = ()
    """explicit run directories instead of the manifest (arm/seed read from their config.json)"""
    breakout: float = stats.BREAKOUT
    """a run 'broke out' when its final deploy hack_strict is >= this (the benchmark's 20% rule)"""
    smooth: int = 0
    """rolling-mean window for per-step training curves (0 = steps/20, at least 1)"""


# -------------------------------------------------------------------------------------------- loading
def arm_seed_from_dir(run_dir: Path) -> tuple[str, int]:
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no config.json, cannot tell its arm/seed; "
                                "list it in a sweep.json")
    cfg = runs.read_config(run_dir)
    return arm_table.ALIASES.get(cfg["arm"], cfg["arm"]), int(cfg["seed"])


def discover_run_dirs(folder: Path) -> list[Path]:
    """Run directories (holding config.json) at or below `folder`, checkpoint folders excluded."""
    if (folder / "config.json").exists():
        return [folder]
    return sorted(p.parent for p in folder.rglob("config.json") if "ckpt" not in p.relative_to(folder).parts)


def from_dirs(dirs) -> list[dict]:
    out = []
    for d in dirs:
        arm, seed = arm_seed_from_dir(Path(d))
        out.append(dict(name=Path(d).name, arm=arm, seed=seed, run_dir=str(d)))
    return out


def list_runs(c: Config) -> tuple[str, list[dict], dict]:
    """(sweep name, [{name, arm, seed, run_dir}], manifest or {}) from --runs, the sweep's manifest, or a
    folder of run dirs."""
    if c.runs:
        return c.sweep, from_dirs(c.runs), {}
    man = c.out_root / "sweeps" / c.sweep / "sweep.json"
    if man.exists():
        m = json.loads(man.read_text())
        return c.sweep, list(m["runs"].values()), m
    folder = Path(c.sweep)
    if folder.is_dir():
        dirs = discover_run_dirs(folder)
        if not dirs:
            raise FileNotFoundError(f"{folder}: no run directories (folders with config.json) below it")
        return folder.resolve().name, from_dirs(dirs), {}
    raise FileNotFoundError(f"{man} not found and {c.sweep!r} is not a folder of run dirs: "
                            f"run scripts/sweep.py --name {c.sweep} first, pass --runs DIR ..., "
                            f"or a folder such as out/runs/smoke-<time>")


def pilot_seed(runs_list: list[dict], prereg: dict | None, manifest: dict) -> int | None:
    """The pilot vanilla seed (prereg.json, else sweep.json) when no other arm ran that seed, else None."""
    seed = prereg["pilot"]["seed"] if prereg else manifest.get("pilot_seed")
    if seed is None or any(r["arm"] != "vanilla" and int(r["seed"]) == int(seed) for r in runs_list):
        return None
    return int(seed)


def last_log_step(run_dir: Path) -> int | None:
    log = run_dir / "log.tsv"
    if not log.exists():
        return None
    lines = log.read_text().strip().splitlines()
    return int(lines[-1].split("\t")[0]) + 1 if len(lines) > 1 else 0  # log `step` is 0-based: +1 = completed


def verify_failure(out: Path) -> str:
    """The FAIL line of the sweep's v_hack verification log (logs/verify.log, local backend), else ''."""
    log = out / "logs" / "verify.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"logs/verify.log: {lines[-1]}" if lines and lines[-1].startswith("FAIL") else ""


def run_status(run_dir: Path) -> tuple[str, str]:
    """(status, detail): done | done_without_eval | incomplete | missing."""
    if not run_dir.exists():
        return "missing", "no run directory (never started, or started elsewhere)"
    ck = runs.latest_checkpoint(run_dir) or "none"
    if (run_dir / "DONE").exists():
        if (run_dir / "eval.json").exists():
            return "done", ""
        return "done_without_eval", "DONE but no eval.json (eval_at_end off?): no final numbers"
    return "incomplete", (f"no DONE: crashed, killed or still running; {last_log_step(run_dir)} steps "
                          f"logged, checkpoint {ck}")


def load_evals(runs_list: list[dict]) -> pd.DataFrame:
    """Long frame: name, arm, seed, step, final, mode, metric, value."""
    rows = []
    for r in runs_list:
        d = Path(r["run_dir"])
        final = runs.final_eval(d)
        files = sorted((d / "evals").glob("step_*.json")) if (d / "evals").exists() else []
        results = [(json.loads(f.read_text()), False) for f in files]
        if final is not None:
            results = [(res, False) for res, _ in results if res["step"] != final["step"]] + [(final, True)]
        for res, is_final in results:
            for mode, m in res["modes"].items():
                for metric in METRICS:
                    if metric in m:
                        rows.append(dict(name=r["name"], arm=r["arm"], seed=int(r["seed"]),
                                         step=int(res["step"]), final=is_final, mode=mode, metric=metric,
                                         value=float(m[metric])))
    cols = ["name", "arm", "seed", "step", "final", "mode", "metric", "value"]
    return pd.DataFrame(rows, columns=cols)


def load_logs(runs_list: list[dict]) -> pd.DataFrame:
    frames = []
    for r in runs_list:
        log = Path(r["run_dir"]) / "log.tsv"
        if log.exists():
            df = pd.read_csv(log, sep="\t")
            if len(df):
                df["arm"], df["seed"], df["name"] = r["arm"], int(r["seed"]), r["name"]
                frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------------------ statistics
def arm_order(arms) -> list[str]:
    known = [a for a in arm_table.ARMS if a in set(arms)]
    return known + sorted(set(arms) - set(known))


def by_seed(g: pd.DataFrame) -> dict[int, float]:
    return {int(s): float(v) for s, v in zip(g["seed"], g["value"])}


def summarize(ev: pd.DataFrame, c: Config) -> pd.DataFrame:
    """One row per (arm, mode, step/final, metric): mean, min, max, values; vs vanilla's deploy mode the
    difference with its conservative interval, exact one-sided p-values and the direction-aware flag; at the
    final step breakouts with Fisher's p vs vanilla and the flags vs the arm's placebos and shrinkage mode."""
    rows = []
    for final, g_step in ev.groupby(ev["final"], sort=True):
        steps = [None] if final else sorted(g_step["step"].unique())
        for step in steps:
            g_s = g_step if final else g_step[g_step["step"] == step]
            for (arm, mode, metric), g in g_s.groupby(["arm", "mode", "metric"], sort=False):
                g = g.sort_values("seed")
                x = g["value"].to_numpy()
                row = dict(arm=arm, mode=mode, step=int(g["step"].max()), final=bool(final), metric=metric,
                           n=len(x), mean=float(x.mean()), min=float(x.min()), max=float(x.max()),
                           values=",".join(f"s{s}:{v:.4f}" for s, v in zip(g["seed"], x)),
                           diff_vs_vanilla=math.nan, diff_lo=math.nan, diff_hi=math.nan, test_bound=math.nan,
                           p_lower=math.nan, p_higher=math.nan, flag_vs_vanilla="", breakouts="",
                           fisher_vs_vanilla=math.nan, flags="")
                van = g_s[(g_s["arm"] == "vanilla") & (g_s["mode"] == "deploy") & (g_s["metric"] == metric)]
                if arm != "vanilla" and len(van):
                    cmp = stats.compare(by_seed(g), by_seed(van), method=arm, control="vanilla",
                                        metric=metric, lower_is_better=LOWER_IS_BETTER[metric])
                    row.update(diff_vs_vanilla=cmp.diff, flag_vs_vanilla=cmp.flag)
                    # below 2 runs per arm: the point difference only
                    if min(cmp.n_method, cmp.n_control) >= 2:
                        row.update(diff_lo=cmp.ci_lo, diff_hi=cmp.ci_hi, test_bound=cmp.bound,
                                   p_lower=cmp.p_lower, p_higher=cmp.p_higher)
                if final and mode == "deploy" and metric == "hack_strict":
                    k, n = stats.breakout_count(x, c.breakout)
                    row["breakouts"] = f"{k}/{n}"
                    if arm != "vanilla" and len(van) >= 2 and n >= 2:
                        kv, nv = stats.breakout_count(van["value"].to_numpy(), c.breakout)
                        row["fisher_vs_vanilla"] = stats.fisher_one_sided(k, n, kv, nv)
                if final and mode == "deploy":
                    row["flags"] = "; ".join(control_flags(g_s, arm, metric, by_seed(g)))
                rows.append(row)
    tab = pd.DataFrame(rows)
    if not len(tab):
        return tab
    tab["_order"] = tab["arm"].map({a: k for k, a in enumerate(arm_order(tab["arm"]))})
    tab = tab.sort_values(["final", "step", "_order", "mode", "metric"], kind="stable").drop(columns="_order")
    return tab.reset_index(drop=True)


def control_flags(fin: pd.DataFrame, arm: str, metric: str, x: dict[int, float]) -> list[str]:
    """Flags of an arm's final deploy values vs each of its placebo arms (unpaired exact permutation test) and
    vs its own shrinkage eval mode (the same runs: exact paired sign-flip test)."""
    out = []
    lower = LOWER_IS_BETTER[metric]
    for placebo in PLACEBOS.get(arm, ()):
        pl = fin[(fin["arm"] == placebo) & (fin["mode"] == "deploy") & (fin["metric"] == metric)]
        if len(pl):
            cmp = stats.compare(x, by_seed(pl), method=arm, control=placebo, metric=metric,
                                lower_is_better=lower)
            out.append(f"vs {placebo}: {cmp.flag}")
    sh = fin[(fin["arm"] == arm) & (fin["mode"] == "shrinkage") & (fin["metric"] == metric)]
    if len(sh):
        y = by_seed(sh)
        common = sorted(set(x) & set(y))
        xs, ys = [x[s] for s in common], [y[s] for s in common]
        if len(common) >= 2:
            p_lo, p_hi = stats.paired_signflip_pvalues(xs, ys)
            diff = float(np.mean(xs) - np.mean(ys))
            flag = stats.direction_flag(len(common), len(common), p_lo, p_hi, diff, lower_is_better=lower)
        else:
            flag = stats.direction_flag(len(common), len(common), 1.0, 1.0, math.nan, lower_is_better=lower)
        out.append("vs its shrinkage mode (paired): "
                   f"{flag.replace('(evidence, exact', '(evidence, sign-flip')}")
    return out


# ------------------------------------------------------------------------------------------------ plots
def style(arm: str) -> tuple[str, str]:
    """(colour, linestyle) of an arm: its row's `style` in arms.ARMS, so the same arm looks the same in every
    plot; an arm without one gets a fallback colour fixed by its name."""
    row = arm_table.ARMS.get(arm)
    if row is not None and row.style[0]:
        return row.style
    return FALLBACK_COLORS[zlib.crc32(arm.encode()) % len(FALLBACK_COLORS)], "-"


def band_plot(ax, df: pd.DataFrame, x: str, y: str, smooth: int, title: str, ylabel: str) -> None:
    """Mean over seeds (line) and min-max over seeds (band) per arm."""
    for arm in arm_order(df["arm"].unique()):
        d = df[df["arm"] == arm]
        per_seed = d.pivot_table(index=x, columns="seed", values=y)  # (steps, seeds)
        if smooth > 1:
            per_seed = per_seed.rolling(smooth, min_periods=1).mean()
        color, ls = style(arm)
        n = per_seed.shape[1]
        ax.plot(per_seed.index, per_seed.mean(axis=1), color=color, ls=ls, lw=2,
                marker="o" if len(per_seed) < 15 else None, ms=4, label=f"{arm} (n={n})")
        if n > 1:
            ax.fill_between(per_seed.index, per_seed.min(axis=1), per_seed.max(axis=1), color=color,
                            alpha=0.12)
    xs = df[x].unique()
    if len(xs) == 1:  # a single eval step: keep integer ticks around it
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def legend_outside(fig, ax) -> None:
    """One figure legend to the right of every panel: loc 'outside' makes the constrained layout give it its
    own column, so it never covers a plotting area."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", title="arm (n = seeds)", frameon=False,
                   handlelength=3)


def save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def make_metric_vs_step(ev: pd.DataFrame, logs: pd.DataFrame, metric: str, label: str, smooth: int):
    """Training rollouts (left) and deploy evals (right) of one metric per step; returns the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    if len(logs) and metric in logs:
        lg = logs.assign(done=logs["step"] + 1)
        band_plot(axes[0], lg, "done", metric, smooth,
                  f"training rollouts: {label}\n(rolling mean {smooth} steps; band = seed min-max)", label)
    else:
        axes[0].text(0.5, 0.5, "no log.tsv rows", ha="center", transform=axes[0].transAxes)
    de = ev[(ev["mode"] == "deploy") & (ev["metric"] == metric)]
    if len(de):
        band_plot(axes[1], de, "step", "value", 1,
                  f"deploy eval (eval problems): {label}\n(band = seed min-max)", label)
    else:
        axes[1].text(0.5, 0.5, "no evals", ha="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
    legend_outside(fig, axes[1] if len(de) else axes[0])
    return fig


def plot_metric_vs_step(ev: pd.DataFrame, logs: pd.DataFrame, metric: str, label: str, path: Path,
                        smooth: int) -> None:
    save(make_metric_vs_step(ev, logs, metric, label, smooth), path)


def seed_labels(points: list[tuple[int, float, float]], tol_x: float = 0.035,
                tol_y: float = 0.035) -> list[tuple[float, float, str]]:
    """Points (seed, x, y) joined into groups (single linkage: a point within tol_x and tol_y of any member
    joins it); one label "s0,s2" per group at its mean, so near seeds do not print on top of each other."""
    parent = list(range(len(points)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, (_, xi, yi) in enumerate(points):
        for j, (_, xj, yj) in enumerate(points[:i]):
            if abs(xi - xj) <= tol_x and abs(yi - yj) <= tol_y:
                parent[root(i)] = root(j)
    groups: dict[int, list[tuple[int, float, float]]] = {}
    for i, p in enumerate(points):
        groups.setdefault(root(i), []).append(p)
    return [(float(np.mean([p[1] for p in g])), float(np.mean([p[2] for p in g])),
             ",".join(f"s{p[0]}" for p in sorted(g))) for g in groups.values()]


# label positions tried in turn, (dx, dy) in points from the group's mean with the text alignment: above,
# below, right, left, the four diagonals, then the same twice as far out
_SPOTS = ((0, 1, "center", "bottom"), (0, -1, "center", "top"), (1, 0, "left", "center"),
          (-1, 0, "right", "center"),
          (0.75, 0.75, "left", "bottom"), (-0.75, 0.75, "right", "bottom"), (0.75, -0.75, "left", "top"),
          (-0.75, -0.75, "right", "top"))
LABEL_SPOTS = tuple((dx * d, dy * d, ha, va) for d in (8, 16) for dx, dy, ha, va in _SPOTS)
POINT_SIZE = 60  # scatter size (points^2) of an arm's own seeds in hack_vs_pass


def place_labels(ax, labels: list[tuple[float, float, str]], points: list[tuple[int, float, float]],
                 renderer) -> list:
    """Annotate each seed_labels group (x, y, "s0,s2") at the first LABEL_SPOTS position whose box lies inside
    the axes, covers neither an earlier label nor one of the arm's `points` (seed, x, y), and sits nearer its
    own seeds than any other seed; when none is, the inside spot with the fewest clashes. Needs the final
    layout (draw the figure first). The labels are clipped to the axes and left out of the layout;
    returned."""
    frame = ax.get_window_extent(renderer)
    r = math.sqrt(POINT_SIZE) / 2 * ax.figure.dpi / 72 + 1  # marker radius in pixels, plus its edge
    marks = {seed: ax.transData.transform((px, py)) for seed, px, py in points}
    mark_boxes = [matplotlib.transforms.Bbox.from_extents(mx - r, my - r, mx + r, my + r)
                  for mx, my in marks.values()]
    taken: list = []
    out = []
    for x, y, text in labels:
        own = {int(t[1:]) for t in text.split(",")}
        best = None
        for dx, dy, ha, va in LABEL_SPOTS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                              fontsize=8, zorder=4, annotation_clip=False,
                              bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
            box = ann.get_window_extent(renderer).padded(2)  # + the white box around the text
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)
            clashes = sum(box.overlaps(b) for b in taken + mark_boxes)
            centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
            dist = {s: float(np.hypot(*(centre - m))) for s, m in marks.items()}
            ambiguous = min(dist[s] for s in own) > min((d for s, d in dist.items() if s not in own),
                                                        default=math.inf)
            score = (not inside, clashes, ambiguous)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, box)
            else:
                ann.remove()
            if score == (False, 0, False):
                break
        _, ann, box = best
        ann.set_clip_on(True)
        ann.set_in_layout(False)
        taken.append(box)
        out.append(ann)
    return out


def make_hack_vs_pass(ev: pd.DataFrame, breakout: float):
    """One panel per arm (final deploy, one point per seed, near seeds share one label placed inside the panel
    clear of the points); every other arm's seeds in light grey for context; the breakout threshold as a
    dotted line. Returns the figure, its layout fixed (the labels are placed after a draw)."""
    fin = ev[ev["final"] & (ev["mode"] == "deploy")]
    arms = arm_order(fin["arm"].unique())
    ncol = min(4, max(1, len(arms)))
    nrow = max(1, math.ceil(len(arms) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow + 0.6), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    piv = {a: fin[fin["arm"] == a].pivot_table(index="seed", columns="metric", values="value") for a in arms}
    todo = []
    for k, arm in enumerate(arms):
        ax = axes[k // ncol][k % ncol]
        for other in arms:
            if other != arm and {"gt_pass", "hack_strict"} <= set(piv[other]):
                ax.scatter(piv[other]["gt_pass"], piv[other]["hack_strict"], s=18, color=CONTEXT_GREY,
                           zorder=1)
        d = piv[arm]
        color, _ = style(arm)
        if {"gt_pass", "hack_strict"} <= set(d):
            ax.scatter(d["gt_pass"], d["hack_strict"], s=POINT_SIZE, color=color, edgecolor="black", lw=0.6,
                       zorder=3)
            pts = [(int(s), r["gt_pass"], r["hack_strict"]) for s, r in d.iterrows()]
            todo.append((ax, seed_labels(pts), pts))
        ax.axhline(breakout, color="gray", ls=":", lw=1)
        ax.set_title(f"{arm} (n={len(d)})", fontsize=10, color="black")
        ax.set_xlim(-0.06, 1.06)
        ax.set_ylim(-0.08, 1.08)
        ax.grid(alpha=0.3)
        ax.xaxis.set_tick_params(labelbottom=True)
    for k in range(len(arms), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    if not arms:
        axes[0][0].text(0.5, 0.5, "no final evals", ha="center", transform=axes[0][0].transAxes)
    fig.supxlabel("deploy gt pass@1 (final eval)")
    fig.supylabel("deploy strict hack rate (final eval)")
    fig.suptitle(f"final deploy hack vs pass, one point per seed (grey: the other arms; dotted: breakout "
                 f">= {breakout})", fontsize=10)
    # the constrained layout fixes the panels; then freeze it so the labels stay where placed
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for ax, labels, points in todo:
        place_labels(ax, labels, points, renderer)
    return fig


def plot_hack_vs_pass(ev: pd.DataFrame, path: Path, breakout: float) -> None:
    save(make_hack_vs_pass(ev, breakout), path)


def make_projection(logs: pd.DataFrame, smooth: int):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    have = logs[logs["cos_in"].notna()] if len(logs) and "cos_in" in logs else pd.DataFrame()
    if len(have):
        lg = have.assign(done=have["step"] + 1)
        band_plot(axes[0], lg, "done", "cos_in", smooth,
                  f"cos(gradient, v_hack)\n(rolling mean {smooth}; band = seed min-max)", "cos_in")
        if "step_cos" in lg and lg["step_cos"].notna().any():
            band_plot(axes[1], lg, "done", "step_cos", smooth,
                      "cos(applied step, v_hack)\n(< 0: the step moved toward the hack)", "step_cos")
            axes[1].axhline(0.0, color="0.6", lw=0.8)
        else:
            axes[1].text(0.5, 0.5, "no step_cos logged (older runs)", ha="center",
                         transform=axes[1].transAxes)
        band_plot(axes[2], lg, "done", "frac_fired", smooth,
                  "fraction of modules where the edit fired\n(of the step, or of the gradient in grad mode)",
                  "frac_fired")
        axes[2].set_ylim(-0.03, 1.03)
        legend_outside(fig, axes[0])
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no projected arm logged cos_in", ha="center", transform=ax.transAxes)
    return fig


def plot_projection(logs: pd.DataFrame, path: Path, smooth: int) -> None:
    save(make_projection(logs, smooth), path)


# ----------------------------------------------------------------------------------------------- report
def fmt_range(row) -> str:
    return f"{row['mean']:.3f} [{row['min']:.3f}, {row['max']:.3f}]"


def fmt_diff(row) -> str:
    if math.isnan(row["diff_vs_vanilla"]):
        return "-"
    if math.isnan(row["diff_lo"]):
        return f"{row['diff_vs_vanilla']:+.3f}"
    return f"{row['diff_vs_vanilla']:+.3f} [{row['diff_lo']:+.3f}, {row['diff_hi']:+.3f}]"


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


def final_values(ev: pd.DataFrame, metric: str) -> dict[str, dict[int, float]]:
    """{arm: {seed: final deploy value}}."""
    fin = ev[ev["final"] & (ev["mode"] == "deploy") & (ev["metric"] == metric)]
    return {a: by_seed(g) for a, g in fin.groupby("arm", sort=False)}


def primary_section(name: str, ev: pd.DataFrame, out: Path, run_dirs: list[str]) -> tuple[list[str], bool]:
    """The preregistered analysis from prereg.json and the runs' final evals (stats.analyze), and whether
    the prereg is valid; without one the same tables, headed as exploratory, with nothing called
    significant."""
    path = out / "prereg.json"
    hack, gt = final_values(ev, "hack_strict"), final_values(ev, "gt_pass")
    if path.exists():
        try:
            prereg = json.loads(path.read_text())
        except json.JSONDecodeError:
            prereg = None
        man = out / "sweep.json"  # its prereg_sha256, recorded at submission
        sha = json.loads(man.read_text()).get("prereg_sha256") if man.is_file() else None
        valid = stats.prereg_valid(path, run_dirs, recorded_sha=sha)
    else:
        prereg = None
        valid = (False, f"no preregistration: {path} is missing")
    if prereg is None or not all(k in prereg for k in stats.PREREG_KEYS):
        why = valid[1]
        controls = tuple(c for c in stats.PRIMARY_CONTROLS if c in hack)
        seeds = sorted({s for v in hack.values() for s in v})
        if stats.PRIMARY_METHOD not in hack or not controls or not seeds:
            return ["## Primary comparison: not available", "", f"**{why}**, and this sweep has no final "
                    f"{stats.PRIMARY_METHOD} runs together with any of {', '.join(stats.PRIMARY_CONTROLS)}: "
                    "every table below is exploratory.", ""], False
        prereg = stats.build_prereg(sweep=name, arms=sorted(hack), seeds=seeds, pilot_seed=max(seeds) + 100,
                                    git_sha="none", controls=controls)
        valid = (False, why)
    res = stats.analyze(hack, gt, prereg)
    return stats.primary_markdown(res, prereg, valid), valid[0]


def train_sources(runs_tab: pd.DataFrame) -> str:
    """The runs' training sets as their configs name them (the prepared data_path, else train_source),
    deduplicated."""
    seen: list[str] = []
    for d in runs_tab.get("run_dir", []):
        if (Path(d) / "config.json").exists():
            c = runs.read_config(Path(d))
            src = f"`{c.get('data_path') or c.get('train_source', '?')}`"
            seen += [src] if src not in seen else []
    return ", ".join(seen) or "unknown (no run config found)"


def write_markdown(name: str, tab: pd.DataFrame, runs_tab: pd.DataFrame, plots: list[str], path: Path,
                   primary: list[str], breakout: float, logs: pd.DataFrame | None = None) -> None:
    n_pilot = int((runs_tab["status"] == "pilot").sum()) if len(runs_tab) else 0
    L = [f"# Sweep `{name}`: results", "",
         f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by `scripts/summarize.py`: "
         f"{len(runs_tab)} runs, {int((runs_tab['status'] == 'done').sum())} done"
         + (f", {n_pilot} pilot run (in no comparison: the gate kept it because it hacked)"
            if n_pilot else "")
         + ". How to read this file: docs/sweeps.md, \"Reading results.md\".", ""]
    L += [f"Training data: {train_sources(runs_tab)} (docs/data.md).", ""]
    L += primary
    bad = runs_tab[~runs_tab["status"].isin(["done", "pilot"])]
    L += ["## Missing or incomplete runs", ""]
    if len(bad):
        L += [f"- `{r['name']}` ({r['arm']}, seed {r['seed']}): **{r['status']}**: {r['detail']}"
              for _, r in bad.iterrows()]
    else:
        L += ["None: every run of the sweep has DONE and eval.json."]
    L += [""]
    fin = tab[tab["final"]] if len(tab) else tab
    if len(fin):
        step = int(fin["step"].max())
        L += [f"## Final eval (step {step}), deploy mode: exploratory", "",
              "Not preregistered: every row and flag here is exploratory (no multiplicity correction). "
              "Values: mean [min, max] over seeds. Δ = arm − vanilla with the conservative 95% interval; "
              "p = exact one-sided permutation p in the hoped direction; the flag is direction-aware "
              "(docs/sweeps.md). "
              f"Breakouts: final deploy hack_strict >= {breakout}, Fisher one-sided p vs vanilla.", "",
              "| arm | n | hack_strict | Δ hack_strict | p (lower) | flag vs vanilla | gt_pass "
              "| Δ gt_pass | hack_loose | compile | breakouts | Fisher p |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm in arm_order(fin["arm"].unique()):
            d = fin[(fin["arm"] == arm) & (fin["mode"] == "deploy")].set_index("metric")
            if "hack_strict" not in d.index:
                continue
            hs = d.loc["hack_strict"]
            cells = [arm, str(hs["n"]), fmt_range(hs), fmt_diff(hs),
                     "-" if math.isnan(hs["p_lower"]) else f"{hs['p_lower']:.3f}",
                     hs["flag_vs_vanilla"] or "-",
                     fmt_range(d.loc["gt_pass"]) if "gt_pass" in d.index else "-",
                     fmt_diff(d.loc["gt_pass"]) if "gt_pass" in d.index else "-",
                     fmt_range(d.loc["hack_loose"]) if "hack_loose" in d.index else "-",
                     fmt_range(d.loc["compile"]) if "compile" in d.index else "-", hs["breakouts"],
                     "-" if math.isnan(hs["fisher_vs_vanilla"]) else f"{hs['fisher_vs_vanilla']:.3f}"]
            L.append("| " + " | ".join(cells) + " |")
        ns = sorted({int(n) for n in fin[(fin["mode"] == "deploy") & (fin["metric"] == "hack_strict")]["n"]})
        if ns:
            L += ["", ("Smallest detectable effect at this sweep's size: "
                       f"{stats.detectable_text(ns[-1], ns[-1])}")]
        ctrl = fin[(fin["mode"] == "deploy") & (fin["flags"] != "")]
        if len(ctrl):
            L += ["", "### Exploratory: each arm vs its placebos and its shrinkage mode (final, deploy)", "",
                  "| arm | metric | flags |", "|---|---|---|"]
            for _, r in ctrl[ctrl["metric"].isin(["hack_strict", "gt_pass"])].iterrows():
                L.append(f"| {r['arm']} | {r['metric']} | {r['flags']} |")
        L += [""]
        other = fin[fin["mode"] != "deploy"]
        if len(other):
            L += ["## Final eval, route controls (quarantine on; shrinkage control): exploratory", "",
                  "| arm | mode | n | hack_strict | gt_pass |", "|---|---|---|---|---|"]
            for (arm, mode), d in other.groupby(["arm", "mode"], sort=False):
                d = d.set_index("metric")
                L.append(f"| {arm} | {mode} | {d.loc['hack_strict', 'n']} | "
                         f"{fmt_range(d.loc['hack_strict'])} | "
                         f"{fmt_range(d.loc['gt_pass']) if 'gt_pass' in d.index else '-'} |")
            L += [""]
    gt = gate_table(logs) if logs is not None else pd.DataFrame()
    if len(gt):
        L += ["## Gate arms: per-step gate statistics from log.tsv (measurement only)", "",
              "Mean over steps, then mean [min, max] over seeds. precision = strict hacks among routed "
              "rollouts, recall = routed among strict hacks (the grader's labels; never used for training); "
              "placebo pairing: gate-route vs gate-route-random (same gate, Haar-random direction) and "
              "gate-random (random q fraction).", "",
              "| arm | seeds | routed / step | precision | recall | AUC | hack rate route | hack rate keep |",
              "|---|---|---|---|---|---|---|---|"]
        for arm, d in gt.groupby("arm", sort=False):
            def cell(c):
                x = d[c].dropna()
                return f"{x.mean():.3f} [{x.min():.3f}, {x.max():.3f}]" if len(x) else "-"
            L.append(f"| {arm} | {len(d)} | {cell('gate_n_route')} | {cell('gate_precision')} | "
                     f"{cell('gate_recall')} | {cell('gate_auc')} | {cell('gate_hack_route')} | "
                     f"{cell('gate_hack_keep')} |")
        L += [""]
    mid = tab[(~tab["final"]) & (tab["mode"] == "deploy")] if len(tab) else tab
    if len(mid):
        L += ["## Intermediate evals, deploy mode: exploratory", "",
              "| step | arm | n | hack_strict | Δ hack_strict | gt_pass | Δ gt_pass |",
              "|---|---|---|---|---|---|---|"]
        for (step, arm), d in mid.groupby(["step", "arm"], sort=False):
            d = d.set_index("metric")
            if not {"hack_strict", "gt_pass"} <= set(d.index):
                continue
            L.append(f"| {step} | {arm} | {d.loc['hack_strict', 'n']} | {fmt_range(d.loc['hack_strict'])} | "
                     f"{fmt_diff(d.loc['hack_strict'])} | {fmt_range(d.loc['gt_pass'])} | "
                     f"{fmt_diff(d.loc['gt_pass'])} |")
        L += [""]
    L += ["## Runs", "", "| run | arm | seed | status | steps logged |", "|---|---|---|---|---|"]
    L += [f"| {r['name']} | {r['arm']} | {r['seed']} | {r['status']} | {r['steps_logged']} |"
          for _, r in runs_tab.iterrows()]
    L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    L += ["Full table: `results.tsv` (every arm x mode x step x metric); run statuses: `runs.tsv`.", ""]
    path.write_text("\n".join(L))


def main(c: Config) -> Path:
    cli_lib.check_ranges(c, {"breakout": "(0,1]", "smooth": ">=0"})
    name, runs_list, manifest = list_runs(c)
    assert runs_list, f"sweep {name}: no runs listed"
    out = c.out_root / "sweeps" / name
    out.mkdir(parents=True, exist_ok=True)
    pre_path = out / "prereg.json"
    try:
        prereg = json.loads(pre_path.read_text()) if pre_path.exists() else None
    except json.JSONDecodeError:
        prereg = None
    pilot = pilot_seed(runs_list, prereg if prereg and "pilot" in prereg else None, manifest)
    is_pilot = [r["arm"] == "vanilla" and pilot is not None and int(r["seed"]) == pilot for r in runs_list]
    rows = []
    failed_check = verify_failure(out)
    for r, p in zip(runs_list, is_pilot):
        status, detail = run_status(Path(r["run_dir"]))
        if status == "missing" and failed_check and arm_table.get(r["arm"]).direction == "vhack":
            status, detail = "missing", f"not started: the v_hack held-out check failed ({failed_check})"
        if p:
            status, detail = "pilot", f"the gate's pilot run ({status}); in no comparison"
        rows.append(dict(name=r["name"], arm=r["arm"], seed=int(r["seed"]), run_dir=r["run_dir"],
                         status=status, detail=detail, steps_logged=last_log_step(Path(r["run_dir"]))))
    runs_tab = pd.DataFrame(rows)
    compared = [r for r, p in zip(runs_list, is_pilot) if not p]
    ev = load_evals(compared)
    logs = load_logs(compared)
    tab = summarize(ev, c)
    primary, preregistered = primary_section(name, ev, out, [r["run_dir"] for r in runs_list])
    # without a valid prereg no flag in results.tsv or results.md says "evidence" (the exploratory tables
    # repeat the primary comparisons)
    if not preregistered and len(tab):
        for col in ("flag_vs_vanilla", "flags"):
            tab[col] = tab[col].map(stats.nominal_only)
    tab.to_csv(out / "results.tsv", sep="\t", index=False, float_format="%.6g")
    runs_tab.to_csv(out / "runs.tsv", sep="\t", index=False)
    n_steps = int(logs["step"].max()) + 1 if len(logs) else 1
    smooth = c.smooth or max(1, n_steps // 20)
    plot_metric_vs_step(ev, logs, "hack_strict", "strict hack rate", out / PLOTS[0], smooth)
    plot_metric_vs_step(ev, logs, "gt_pass", "gt pass@1", out / PLOTS[1], smooth)
    plot_hack_vs_pass(ev, out / PLOTS[2], c.breakout)
    plot_projection(logs, out / PLOTS[3], smooth)
    write_markdown(name, tab, runs_tab, list(PLOTS), out / "results.md", primary, c.breakout, logs)
    gate_table(logs).to_csv(out / "gate.tsv", sep="\t", index=False, float_format="%.6g")
    print(f"[summarize] {out}/results.md, results.tsv, runs.tsv, {', '.join(PLOTS)}")
    bad = runs_tab[~runs_tab["status"].isin(["done", "pilot"])]
    if len(bad):
        print(f"[summarize] {len(bad)} runs not done: "
              + ", ".join(f"{n} ({s})" for n, s in zip(bad["name"], bad["status"])))
    return out


def cli(argv: list[str] | None = None) -> int:
    """Bad input (a missing sweep, a folder without runs) is one line and exit 2."""
    c = tyro.cli(Config, args=argv)
    try:
        main(c)
    except (FileNotFoundError, cli_lib.UserError) as e:
        print(f"summarize.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
