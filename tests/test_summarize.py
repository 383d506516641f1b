"""scripts/summarize.py and scripts/journal_entry.py on synthetic run directories
(tests/fixtures/fake_runs.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_summarize.py -q

Every table value is checked against an independent computation straight from the runs' JSON files.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_runs  # noqa: E402
import journal_entry  # noqa: E402
import summarize  # noqa: E402

ARMS = ("vanilla", "erase", "erase-random", "route", "route-random")
SEEDS = (0, 1, 2)
STEPS, EVERY = 6, 3


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """5 arms x 3 seeds, 6 steps, evals at 3 and 6; route s2 crashed at step 4; erase s3 never started."""
    out = tmp_path_factory.mktemp("out")
    runs = {}
    for arm in ARMS:
        for seed in SEEDS:
            name = f"sw-{arm}-s{seed}"
            crash = 4 if (arm, seed) == ("route", 2) else None
            fake_runs.write_run(out / "runs" / name, arm, seed, steps=STEPS, eval_every=EVERY, crash_at=crash)
            runs[name] = dict(name=name, arm=arm, seed=seed, run_dir=str(out / "runs" / name), command="x")
    runs["sw-erase-s3"] = dict(name="sw-erase-s3", arm="erase", seed=3,
                               run_dir=str(out / "runs" / "sw-erase-s3"), command="x")
    (out / "sweeps" / "sw").mkdir(parents=True)
    (out / "sweeps" / "sw" / "sweep.json").write_text(json.dumps(
        {"name": "sw", "preset": "smoke", "runs": runs,
         "submissions": [{"git_sha": "abc123", "backend": "local", "set": ["steps=6"]}]}))
    summarize.main(summarize.Config(sweep="sw", out_root=out))
    return out


def test_runs_the_verify_gate_skipped_say_so(sweep_dir, tmp_path):
    """A failed v_hack check (the local backend's logs/verify.log ends in FAIL) explains the missing v_hack
    arm runs; a missing measuring-arm run stays "never started"."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sweep_dir, out)
    man = json.loads((out / "sweeps/sw/sweep.json").read_text())
    for name, arm in (("sw-route-s9", "route"), ("sw-vanilla-s9", "vanilla")):
        man["runs"][name] = dict(name=name, arm=arm, seed=9, run_dir=str(out / "runs" / name), command="x")
        man["runs"] = {k: v | {"run_dir": v["run_dir"].replace(str(sweep_dir), str(out))}
                       for k, v in man["runs"].items()}
    (out / "sweeps/sw/sweep.json").write_text(json.dumps(man))
    (out / "sweeps/sw/logs").mkdir()
    (out / "sweeps/sw/logs/verify.log").write_text("| table |\n\nFAIL: ['heldout_within'] below threshold\n")
    summarize.main(summarize.Config(sweep="sw", out_root=out))
    runs = {r["name"]: r for r in read_tsv(out / "sweeps/sw/runs.tsv")}
    assert "v_hack held-out check failed" in runs["sw-route-s9"]["detail"], runs["sw-route-s9"]
    assert "FAIL: ['heldout_within']" in runs["sw-route-s9"]["detail"]
    assert "never started" in runs["sw-vanilla-s9"]["detail"], runs["sw-vanilla-s9"]


def read_tsv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def expected_values(out: Path) -> dict:
    """(arm, mode, step, final, metric) -> {seed: value}, read straight from the JSON files."""
    exp: dict = {}
    for d in sorted((out / "runs").iterdir()):
        arm, seed = d.name.split("-s")[0][3:], int(d.name.rsplit("-s", 1)[1])
        final = json.loads((d / "eval.json").read_text()) if (d / "DONE").exists() else None
        for f in sorted((d / "evals").glob("step_*.json")):
            res = json.loads(f.read_text())
            is_final = final is not None and res["step"] == final["step"]
            res = final if is_final else res
            for mode, m in res["modes"].items():
                for metric in ("hack_strict", "hack_loose", "gt_pass", "compile"):
                    exp.setdefault((arm, mode, res["step"], is_final, metric), {})[seed] = m[metric]
    return exp


def perm_p_lower(x, y) -> float:
    """Brute force: share of the C(m + n, m) relabellings whose mean difference is <= the observed one."""
    z, m = list(x) + list(y), len(x)
    obs = np.mean(x) - np.mean(y)
    hits = tot = 0
    for idx in itertools.combinations(range(len(z)), m):
        a = [z[i] for i in idx]
        b = [z[i] for i in range(len(z)) if i not in idx]
        hits += np.mean(a) - np.mean(b) <= obs + 1e-12
        tot += 1
    return hits / tot


def fisher_ref(k_m: int, n_m: int, k_c: int, n_c: int) -> float:
    """P(control holds >= k_c of the k_m + k_c breakouts) with the margins fixed, from binomial
    coefficients."""
    K, N = k_m + k_c, n_m + n_c
    return (sum(math.comb(K, j) * math.comb(N - K, n_c - j) for j in range(k_c, min(K, n_c) + 1))
            / math.comb(N, n_c))


def test_table_matches_independent_computation(sweep_dir):
    tab = read_tsv(sweep_dir / "sweeps" / "sw" / "results.tsv")
    exp = expected_values(sweep_dir)
    got = {(r["arm"], r["mode"], int(r["step"]), r["final"] == "True", r["metric"]): r for r in tab}
    assert set(got) == set(exp)
    for key, vals in exp.items():
        r = got[key]
        x = np.array([vals[s] for s in sorted(vals)])
        assert int(r["n"]) == len(x)
        assert float(r["mean"]) == pytest.approx(x.mean(), abs=1e-5)
        assert (float(r["min"]), float(r["max"])) == pytest.approx((x.min(), x.max()), abs=1e-5)
        assert r["values"] == ",".join(f"s{s}:{vals[s]:.4f}" for s in sorted(vals))
        arm, mode, step, final, metric = key
        van = exp.get(("vanilla", "deploy", step, final, metric))
        if arm != "vanilla" and van:
            y = [van[s] for s in sorted(van)]
            diff = x.mean() - np.mean(y)
            assert float(r["diff_vs_vanilla"]) == pytest.approx(diff, abs=1e-5)
            assert min(len(x), len(y)) >= 2, "the fixture has >= 2 seeds in every cell"
            assert float(r["diff_lo"]) <= diff + 1e-5 and diff - 1e-5 <= float(r["diff_hi"])
            assert float(r["p_lower"]) == pytest.approx(perm_p_lower(x, y), abs=1e-6)
            assert float(r["p_higher"]) == pytest.approx(perm_p_lower([-v for v in x], [-v for v in y]),
                                                         abs=1e-6)
            # the test bound excludes 0 exactly when the hoped-direction p (reference above) is <= 0.05
            p_hoped = perm_p_lower(x, y) if metric.startswith("hack") else perm_p_lower([-v for v in x],
                                                                                       [-v for v in y])
            tb = float(r["test_bound"])
            excludes_0 = tb < 0 if metric.startswith("hack") else tb > 0
            assert excludes_0 == (p_hoped <= 0.05 + 1e-9), (key, tb, p_hoped)
        else:
            assert r["diff_vs_vanilla"] == ""
        if final and mode == "deploy" and metric == "hack_strict":
            k = int((x >= 0.2).sum())
            assert r["breakouts"] == f"{k}/{len(x)}"
            if arm != "vanilla":
                kv = sum(v >= 0.2 for v in van.values())
                assert float(r["fisher_vs_vanilla"]) == pytest.approx(fisher_ref(k, len(x), kv, len(van)),
                                                                      abs=1e-9)
    # the crashed route seed has no final value: n=2 at the final step, n=3 at step 3
    assert int(got[("route", "deploy", 6, True, "hack_strict")]["n"]) == 2
    assert int(got[("route", "deploy", 3, False, "hack_strict")]["n"]) == 3


def test_missing_and_crashed_runs_are_listed(sweep_dir):
    d = sweep_dir / "sweeps" / "sw"
    runs = {r["name"]: r for r in read_tsv(d / "runs.tsv")}
    assert runs["sw-route-s2"]["status"] == "incomplete" and runs["sw-erase-s3"]["status"] == "missing"
    assert sum(r["status"] == "done" for r in runs.values()) == 14
    md = (d / "results.md").read_text()
    section = md.split("## Missing or incomplete runs")[1].split("\n## ")[0]
    assert ("`sw-route-s2` (route, seed 2): **incomplete**" in section
            and "4 steps logged, checkpoint step_000004" in section)
    assert "`sw-erase-s3` (erase, seed 3): **missing**" in section
    assert "| erase | 3 |" in md and "| route | 2 |" in md  # final table n per arm


def test_results_md_without_prereg_is_exploratory(sweep_dir):
    md = (sweep_dir / "sweeps" / "sw" / "results.md").read_text()
    primary = md.split("## Primary comparison")[1].split("\n## ")[0]
    assert "**NOT preregistered: no preregistration:" in primary and "none is called significant" in primary
    assert "primary: not tested (no valid preregistration)" in primary
    assert "(evidence," not in primary, "nothing may read as significant without a prereg"
    # nor anywhere else: the exploratory tables repeat erase vs vanilla and vs its placebo
    assert "(evidence" not in md and "nominal only: no valid prereg" in md.split("## Final eval")[1]
    assert "(evidence" not in (sweep_dir / "sweeps" / "sw" / "results.tsv").read_text()
    assert md.index("## Primary comparison") < md.index("## Final eval (step 6), deploy mode: exploratory")
    assert "Smallest detectable effect" in md and "0/3 vs 3/3 (p = 0.050)" in md


def test_pngs_are_written_and_nonempty(sweep_dir):
    import matplotlib.image as mpimg

    for name in ("hack_vs_step.png", "pass_vs_step.png", "hack_vs_pass.png", "projection_vs_step.png"):
        p = sweep_dir / "sweeps" / "sw" / name
        img = mpimg.imread(p)  # (H, W, 4)
        assert img.shape[0] > 300 and img.shape[1] > 500, name
        assert img[..., :3].std() > 0.05, f"{name} looks blank"


def test_seed_labels_group_close_points():
    pts = [(0, 0.025, 0.825), (1, 0.05, 0.825), (2, 0.075, 0.825), (3, 0.6, 0.2)]  # a chain: single linkage
    got = sorted(summarize.seed_labels(pts), key=lambda t: t[0])
    assert [t[2] for t in got] == ["s0,s1,s2", "s3"]
    assert got[0][:2] == pytest.approx((0.05, 0.825)) and got[1][:2] == pytest.approx((0.6, 0.2))


def frame(values: dict) -> pd.DataFrame:
    """values: (arm, mode) -> per-seed hack_strict at the final step."""
    rows = [dict(name=f"{a}{s}", arm=a, seed=s, step=10, final=True, mode=m, metric="hack_strict", value=v)
            for (a, m), vs in values.items() for s, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_direction_aware_flags_erase_worse_than_placebo():
    """The issue's case: erase above its placebo (+0.02 vs vanilla, the placebo -0.17) must say WORSE, not
    pass."""
    c = summarize.Config(sweep="x")
    tab = summarize.summarize(frame({
        ("vanilla", "deploy"): [0.50, 0.52, 0.48],
        ("erase", "deploy"): [0.51, 0.53, 0.52],          # +0.02 vs vanilla
        ("erase-random", "deploy"): [0.32, 0.34, 0.33],   # -0.17 vs vanilla: the placebo does better
        ("route", "deploy"): [0.1, 0.05, 0.15],
        ("route-random", "deploy"): [0.75, 0.8, 0.7],
        ("route", "shrinkage"): [0.08, 0.12, 0.1],
    }), c)
    by = {(r["arm"], r["mode"]): r for _, r in tab.iterrows()}
    assert by[("erase", "deploy")]["flags"].startswith(
        "vs erase-random: method WORSE than control (evidence, exact p=0.050")
    assert by[("erase", "deploy")]["flag_vs_vanilla"].startswith("no evidence: control does as well")
    route = by[("route", "deploy")]["flags"].split("; ")
    assert route[0].startswith("vs route-random: method lower than control (evidence, exact p=0.050")
    # paired sign-flip over 3 runs: smallest p is 1/8, so never evidence; diffs +0.02, -0.07, +0.05 -> mean 0
    assert route[1].startswith("vs its shrinkage mode (paired): no evidence") and "p=0.625" in route[1]
    assert by[("vanilla", "deploy")]["flags"] == by[("erase-random", "deploy")]["flags"] == ""
    # vs vanilla's deploy mode
    assert by[("route", "shrinkage")]["diff_vs_vanilla"] == pytest.approx(0.1 - 0.5)


def test_no_flags_below_two_runs_per_arm():
    c = summarize.Config(sweep="x")
    tab = summarize.summarize(frame({("vanilla", "deploy"): [0.8], ("erase", "deploy"): [0.1],
                                     ("erase-random", "deploy"): [0.7, 0.75]}), c)
    by = {r["arm"]: r for _, r in tab.iterrows()}
    assert by["erase"]["flag_vs_vanilla"].startswith("n too small (1 method, 1 control")
    # the point difference only: no p, no interval
    assert by["erase"]["diff_vs_vanilla"] == pytest.approx(-0.7)
    assert math.isnan(by["erase"]["p_lower"]) and math.isnan(by["erase"]["diff_lo"])
    assert math.isnan(by["erase"]["fisher_vs_vanilla"]) and by["erase"]["breakouts"] == "0/1"
    assert by["erase"]["flags"].startswith("vs erase-random: n too small (1 method, 2 control")
    assert by["erase-random"]["flag_vs_vanilla"].startswith("n too small")


def test_runs_without_manifest_read_config_json(tmp_path):
    d = tmp_path / "runs" / "a"
    fake_runs.write_run(d, "vanilla", 5, steps=3, eval_every=3)
    out = summarize.main(summarize.Config(sweep="adhoc", out_root=tmp_path, runs=(d,)))
    tab = read_tsv(out / "results.tsv")
    assert {r["arm"] for r in tab} == {"vanilla"} and all(r["values"].startswith("s5:") for r in tab)
    with pytest.raises(FileNotFoundError, match="sweep.json.*--runs"):
        summarize.main(summarize.Config(sweep="nope", out_root=tmp_path))
    assert summarize.cli(["nope", "--out-root", str(tmp_path)]) == 2
    for bad in (["--breakout", "-1"], ["--breakout", "1.5"], ["--smooth", "-5"]):
        assert summarize.cli(["adhoc", "--out-root", str(tmp_path), "--runs", str(d), *bad]) == 2, bad


def test_smoke_folder_of_run_dirs(tmp_path):
    """`just smoke` writes out/runs/<smoke-name>/<arm>/ (one seed each, no sweep.json): summarize finds
    them."""
    smoke = tmp_path / "runs" / "smoke-20261201-1200"
    for arm in ("vanilla", "erase", "erase-random"):
        fake_runs.write_run(smoke / arm, arm, 0, steps=3, eval_every=3)
        (smoke / arm / "ckpt" / "step_000003" / "config.json").write_text("{}")  # not a run dir
    out = summarize.main(summarize.Config(sweep=str(smoke), out_root=tmp_path / "o"))
    assert out == tmp_path / "o" / "sweeps" / "smoke-20261201-1200"
    runs = read_tsv(out / "runs.tsv")
    assert sorted(r["arm"] for r in runs) == ["erase", "erase-random", "vanilla"]
    md = (out / "results.md").read_text()
    assert "n too small (1 method, 1 control runs" in md and "(evidence" not in md


def test_pilot_run_is_in_no_comparison_and_prereg_makes_it_confirmatory(tmp_path):
    """A prereg written before the runs: the primary section is preregistered; the pilot (vanilla at the
    prereg's pilot seed) is listed but in no table; a prereg written after the runs is refused."""
    import stats

    out = tmp_path / "out"
    pre = stats.build_prereg(sweep="p", arms=["vanilla", "erase"], seeds=[0, 1, 2], pilot_seed=100,
                             git_sha="x", controls=["vanilla"])
    stats.write_prereg(out / "sweeps" / "p" / "prereg.json", pre)
    runs = {}
    for arm, seed in [("vanilla", 100)] + [(a, s) for s in (0, 1, 2) for a in ("vanilla", "erase")]:
        name = f"p-{arm}-s{seed}"
        fake_runs.write_run(out / "runs" / name, arm, seed, steps=3, eval_every=3,
                            # a pilot that would sink vanilla
                            scale=0.01 if (arm, seed) == ("vanilla", 100) else 1.0)
        runs[name] = dict(name=name, arm=arm, seed=seed, run_dir=str(out / "runs" / name))
    (out / "sweeps" / "p" / "sweep.json").write_text(json.dumps({"runs": runs, "pilot_seed": 100}))
    d = summarize.main(summarize.Config(sweep="p", out_root=out))
    md = (d / "results.md").read_text()
    assert "Preregistered (written before the first run" in md
    assert {r["name"]: r["status"] for r in read_tsv(d / "runs.tsv")}["p-vanilla-s100"] == "pilot"
    van = [r for r in read_tsv(d / "results.tsv") if r["arm"] == "vanilla" and r["final"] == "True"]
    assert van and all("s100" not in r["values"] and int(r["n"]) == 3 for r in van)
    hack = {s: json.loads((out / "runs" / f"p-{a}-s{s}"
                           / "eval.json").read_text())["modes"]["deploy"]["hack_strict"]
            for a in ("erase",) for s in (0, 1, 2)}
    vh = [json.loads((out / "runs" / f"p-vanilla-s{s}"
                      / "eval.json").read_text())["modes"]["deploy"]["hack_strict"]
          for s in (0, 1, 2)]
    p = perm_p_lower(list(hack.values()), vh)
    row = f"| erase vs vanilla | 3 vs 3 | {np.mean(list(hack.values())):.3f} vs {np.mean(vh):.3f} |"
    assert row in md and f"| {p:.3f} |" in md.split(row)[1].splitlines()[0]
    claim = "SUPPORTED" if p <= 0.05 else "NOT supported"
    assert f"**primary: {claim}" in md
    # the same prereg re-dated after the runs: nothing is called significant
    pre_path = out / "sweeps" / "p" / "prereg.json"
    late = json.loads(pre_path.read_text()) | {"created_at": "2999-01-01T00:00:00+00:00"}
    pre_path.write_text(json.dumps(late))
    md = (summarize.main(summarize.Config(sweep="p", out_root=out)) / "results.md").read_text()
    assert "**NOT preregistered:" in md and "after run" in md and "primary: not tested" in md


# ------------------------------------------------------------------------------------------ journal
def test_journal_entry_goes_after_header_before_older_entries(sweep_dir, tmp_path):
    real = REPO / "RESEARCH_JOURNAL.md"
    before = hashlib.sha256(real.read_bytes()).hexdigest() if real.exists() else None
    j = tmp_path / "J.md"
    j.write_text("# Research journal\n\nIntro line.\n\n## 2026-01-01 — older entry\n- stuff\n")
    journal_entry.main(journal_entry.Config(sweep="sw", journal=j, out_root=sweep_dir, date="2026-11-21"))
    text = j.read_text()
    assert text.startswith("# Research journal\n\nIntro line.\n\n## 2026-11-21 — sweep `sw`: TODO")
    assert (text.index("## 2026-11-21") < text.index("## 2026-01-01 — older entry")
            and text.endswith("- stuff\n"))
    entry = text.split("## 2026-01-01")[0]
    assert "preset `smoke`" in entry and "seeds 0, 1, 2, 3" in entry and "git abc123" in entry
    assert "| erase-random | 3 |" in entry and "hack_vs_pass.png" in entry and "**missing**" in entry
    assert entry.index("#### Primary comparison") < entry.index("#### Missing or incomplete runs")
    if before is not None:
        assert hashlib.sha256(real.read_bytes()).hexdigest() == before, "the real journal must not be touched"


def test_journal_entry_edge_cases(tmp_path, sweep_dir):
    assert journal_entry.insert_entry("# J\n", "## e\n") == "# J\n\n## e\n"
    assert journal_entry.insert_entry("# J\n\n## old\n", "## new\n\n") == "# J\n\n## new\n\n## old\n"
    with pytest.raises(journal_entry.UserError, match="--journal"):
        journal_entry.main(journal_entry.Config(sweep="sw", journal=tmp_path / "none.md", out_root=sweep_dir))
    (tmp_path / "J.md").write_text("# J\n")
    with pytest.raises(journal_entry.UserError, match="summarize.py other"):
        journal_entry.main(journal_entry.Config(sweep="other", journal=tmp_path / "J.md", out_root=sweep_dir))


def test_results_name_the_training_data(tmp_path):
    import pandas as pd

    for name, cfg in (("a", {"train_source": "hub", "data_path": "out/data/train.jsonl"}),
                      ("b", {"train_source": "local-v0.2.0", "data_path": ""}),
                      ("c", {"train_source": "hub", "data_path": "out/data/train.jsonl"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"config": cfg}))
    tab = pd.DataFrame({"run_dir": [str(tmp_path / n) for n in "abc"] + [str(tmp_path / "missing")]})
    assert summarize.train_sources(tab) == "`out/data/train.jsonl`, `local-v0.2.0`"


# ------------------------------------------------------------------------------------------- figures
FIG_ARMS = ("vanilla", "measure", "erase", "route", "erase-random", "erase-matched", "route-random",
            "route-matched", "oracle-penalty", "vanilla-2x")


@pytest.fixture(scope="module")
def figure_frames(tmp_path_factory):
    """(evals, logs) of 10 arms x 5 seeds from fake runs, final values moved onto shared spots: three seeds of
    four arms at hack 1.0 / pass 0.0, all of route-random at (1.0, 1.0), two seeds of three arms at
    (0.0, 0.0)."""
    out = tmp_path_factory.mktemp("figs")
    runs = []
    for arm in FIG_ARMS:
        for seed in range(5):
            d = out / f"{arm}-s{seed}"
            fake_runs.write_run(d, arm, seed, steps=8, eval_every=4)
            res = json.loads((d / "eval.json").read_text())
            m = res["modes"]["deploy"]
            if arm in ("vanilla", "measure", "vanilla-2x", "route-matched") and seed in (0, 2, 4):
                m["hack_strict"], m["gt_pass"] = 1.0, 0.0
            if (arm, seed) == ("vanilla", 1):
                m["hack_strict"], m["gt_pass"] = 0.95, 0.02  # near the corner, its own label
            if arm in ("erase", "route", "oracle-penalty") and seed in (1, 3):
                m["hack_strict"], m["gt_pass"] = 0.0, 0.0
            if arm == "route-random":
                m["hack_strict"], m["gt_pass"] = 1.0, 1.0
            (d / "eval.json").write_text(json.dumps(res))
            runs.append({"name": d.name, "arm": arm, "seed": seed, "run_dir": str(d)})
    return summarize.load_evals(runs), summarize.load_logs(runs)


def all_figures(ev, logs) -> dict:
    return {"hack_vs_step": summarize.make_metric_vs_step(ev, logs, "hack_strict", "strict hack rate", 2),
            "pass_vs_step": summarize.make_metric_vs_step(ev, logs, "gt_pass", "gt pass@1", 2),
            "hack_vs_pass": summarize.make_hack_vs_pass(ev, 0.2),
            "projection": summarize.make_projection(logs, 2)}


def layout_problems(fig) -> list[str]:
    """Draws the figure; names every legend that overlaps a visible axes (or leaves the figure) and every text
    of an axes that is not inside that axes."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    frames = [ax.get_window_extent(r) for ax in axes]
    legends = list(fig.legends) + [ax.get_legend() for ax in axes if ax.get_legend() is not None]
    bad = []
    for leg in legends:
        box = leg.get_window_extent(r)
        bad += [f"legend overlaps axes {k}" for k, f in enumerate(frames) if box.overlaps(f)]
        if not (box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1
                and box.y0 >= fig.bbox.y0 and box.y1 <= fig.bbox.y1):
            bad.append("legend leaves the figure")
    for k, (ax, f) in enumerate(zip(axes, frames)):
        for t in ax.texts:
            b = t.get_window_extent(r)
            if not (b.x0 >= f.x0 - 0.5 and b.x1 <= f.x1 + 0.5 and b.y0 >= f.y0 - 0.5 and b.y1 <= f.y1 + 0.5):
                bad.append(f"text {t.get_text()!r} outside axes {k}")
    return bad


def test_figures_keep_legends_outside_and_labels_inside(figure_frames):
    import matplotlib.pyplot as plt

    figs = all_figures(*figure_frames)
    try:
        for name, fig in figs.items():
            assert layout_problems(fig) == [], name
        for name in ("hack_vs_step", "pass_vs_step", "projection"):
            assert len(figs[name].legends) == 1, name
        n_labels = sum(len(ax.texts) for ax in figs["hack_vs_pass"].axes)
        assert n_labels >= 2 * len(FIG_ARMS), "every arm's seeds are labelled"
    finally:
        for fig in figs.values():
            plt.close(fig)
    # the check itself can fail: a legend inside the plotting area and a label past the frame are both caught
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1], label="a")
    ax.legend(loc="center")
    ax.annotate("s0,s1,s2,s3", (1.0, 1.0), textcoords="offset points", xytext=(0, 9), ha="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    got = layout_problems(fig)
    plt.close(fig)
    assert "legend overlaps axes 0" in got and "text 's0,s1,s2,s3' outside axes 0" in got


def test_hack_vs_pass_labels_group_coincident_seeds_and_clear_the_points(figure_frames):
    """Seeds at one spot share one label; no two labels overlap, and no label covers one of its arm's
    markers."""
    import matplotlib.pyplot as plt

    ev, _ = figure_frames
    fig = summarize.make_hack_vs_pass(ev, 0.2)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        panels = {ax.get_title().split(" (")[0]: ax for ax in fig.axes if ax.get_visible()}
        assert list(panels) == list(FIG_ARMS)
        texts = {arm: [t.get_text() for t in ax.texts] for arm, ax in panels.items()}
        assert texts["route-random"] == ["s0,s1,s2,s3,s4"]
        for arm in ("vanilla", "measure", "vanilla-2x", "route-matched"):
            assert "s0,s2,s4" in texts[arm], (arm, texts[arm])
        assert "s1" in texts["vanilla"] and "s1,s3" in texts["erase"]
        for arm, ax in panels.items():
            seeds = sorted(int(s[1:]) for t in texts[arm] for s in t.split(","))
            assert seeds == [0, 1, 2, 3, 4], (arm, texts[arm])  # every seed named exactly once
            boxes = [t.get_window_extent(r) for t in ax.texts]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[:i]), arm
            own = ax.collections[-1]  # the arm's own seeds, drawn last
            rad = np.sqrt(own.get_sizes()[0]) / 2 * fig.dpi / 72
            for mx, my in ax.transData.transform(own.get_offsets()):
                for b, t in zip(boxes, ax.texts):
                    hit = b.x0 < mx + rad and mx - rad < b.x1 and b.y0 < my + rad and my - rad < b.y1
                    assert not hit, (arm, t.get_text(), (mx, my))
    finally:
        plt.close(fig)


def srgb_to_lab(color) -> np.ndarray:
    """CIE L*a*b* (D65) of a matplotlib colour, from the sRGB formulas."""
    import matplotlib.colors as mcolors

    c = np.array(mcolors.to_rgb(color))
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_every_arm_has_its_own_colour(figure_frames):
    """Every arm of arms.ARMS has a fixed colour at least 20 CIE76 units from every other arm's and from the
    context grey; in the figures distinct arms get distinct colours and one arm the same colour everywhere."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    import arms

    assert all(a.style[0] for a in arms.ARMS.values()), "every arm's row names its colour"
    cols = {a: summarize.style(a)[0] for a in arms.ARMS}
    lab = {a: srgb_to_lab(c) for a, c in cols.items()} | {"context grey": srgb_to_lab(summarize.CONTEXT_GREY)}
    close = [(a, b, round(float(np.linalg.norm(lab[a] - lab[b])), 1))
             for a, b in itertools.combinations(lab, 2)
             if np.linalg.norm(lab[a] - lab[b]) < 20]
    assert close == [], close
    assert summarize.style("some-new-arm") == summarize.style("some-new-arm")
    figs = all_figures(*figure_frames)
    try:
        seen: dict[str, str] = {}
        for name in ("hack_vs_step", "pass_vs_step", "projection"):
            for ax in figs[name].axes:
                for line in ax.get_lines():
                    arm = line.get_label().split(" (n=")[0]
                    seen.setdefault(arm, mcolors.to_hex(line.get_color()))
                    assert mcolors.to_hex(line.get_color()) == seen[arm], (name, arm)
        for ax in figs["hack_vs_pass"].axes:
            if ax.get_visible():
                arm = ax.get_title().split(" (")[0]
                assert mcolors.to_hex(ax.collections[-1].get_facecolor()[0]) == seen[arm], arm
        assert set(seen) == set(FIG_ARMS) and len(set(seen.values())) == len(seen)
    finally:
        for fig in figs.values():
            plt.close(fig)
