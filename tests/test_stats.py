"""tests/test_stats.py: stats.py against hand-computed values, brute-force re-implementations and simulated
sweeps from known distributions.

    .venv/bin/pytest tests/test_stats.py            # fast part (~7 s CPU)
    .venv/bin/pytest tests/test_stats.py -m slow    # the full coverage grid
"""

import datetime
import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stats  # noqa: E402


# --------------------------------------------------------------------------- independent reference code
def brute_pvalues(x, y):
    """Every ordering of the pooled runs (N! of them, each equally likely under no effect): the share whose
    first len(x) runs have a mean difference <= / >= the observed one."""
    z, m = list(x) + list(y), len(x)
    obs = np.mean(x) - np.mean(y)
    diffs = np.array([np.mean(p[:m]) - np.mean(p[m:]) for p in itertools.permutations(z)])
    return float(np.mean(diffs <= obs + 1e-12)), float(np.mean(diffs >= obs - 1e-12))


def breakout_sample(rng, p, size):
    """Binary breakout model: each run breaks out with prob p to ~U(0.4, 0.6), else stays near 0.02."""
    b = rng.random(size) < p
    return np.where(b, rng.uniform(0.4, 0.6, size), np.clip(rng.normal(0.02, 0.01, size), 0, 1))


def breakout_mean(p):
    return p * 0.5 + (1 - p) * 0.02


def coverage(rng, draw_m, draw_c, truth, interval, reps):
    hits = 0
    for _ in range(reps):
        lo, hi = interval(draw_m(rng), draw_c(rng))
        hits += lo <= truth <= hi
    return hits / reps


# ---------------------------------------------------------------------------------------- permutation
def test_perm_pvalues_hand_and_brute_force():
    # all three method runs below all three control runs: 1 of C(6, 3) = 20 relabellings is as extreme
    assert stats.perm_pvalues([0.02, 0.03, 0.01], [0.5, 0.48, 0.55]) == pytest.approx((1 / 20, 1.0))
    rng = np.random.default_rng(3)
    for m, n in ((3, 3), (2, 4), (3, 4)):
        x, y = rng.random(m).round(2), rng.random(n).round(2)  # rounding makes ties likely
        assert stats.perm_pvalues(x, y) == pytest.approx(brute_pvalues(x, y)), (x, y)


def test_perm_interval_is_the_test_inverted():
    """d is inside the interval iff neither brute-force one-sided test on (x - d, y) has p <= a."""
    rng = np.random.default_rng(4)
    for m, n, level in ((3, 3, 0.90), (3, 4, 0.90), (2, 5, 0.90)):
        x, y = rng.random(m), rng.random(n)
        lo, hi = stats.perm_interval(x, y, level)
        a = (1 - level) / 2
        assert -1 < lo < hi < 1, (lo, hi)
        for d, inside in ((lo - 1e-6, False), (lo + 1e-6, True), (hi - 1e-6, True), (hi + 1e-6, False)):
            p_lo, p_hi = brute_pvalues(np.asarray(x) - d, y)
            accepted = p_lo > a + 1e-12 and p_hi > a + 1e-12
            assert accepted == inside, (m, n, level, d, lo, hi, p_lo, p_hi)


def test_perm_interval_3v3_at_95_is_the_whole_range_and_bound_matches_p():
    x, y = [0.02, 0.03, 0.01], [0.5, 0.48, 0.55]
    assert stats.perm_interval(x, y, 0.95) == (-1.0, 1.0)  # 20 relabellings cannot put 2.5% in a tail
    # the one-sided 95% bound: the one swap of min(x) and max(y) crosses first -> max(x) - min(y)
    assert stats.perm_bound(x, y, 0.05, "upper") == pytest.approx(0.03 - 0.48)
    assert stats.perm_bound(x, y, 0.05, "lower") == pytest.approx(0.01 - 0.55)
    rng = np.random.default_rng(5)
    for _ in range(200):  # bound < 0 exactly when p_lower <= alpha
        x, y = rng.random(3).round(1), rng.random(4).round(1)
        assert (stats.perm_bound(x, y, 0.05) < 0) == (stats.perm_pvalues(x, y)[0] <= 0.05 + 1e-12), (x, y)


def test_perm_interval_exact_under_shift_model():
    """n = 5 + 5: 252 relabellings, floor(0.025 * 252) = 6 per tail, so coverage is exactly 1 - 12/252 = 0.952
    for any continuous F shifted by d (here a skewed beta and a heavy-tailed t)."""
    rng = np.random.default_rng(6)
    exact = 1 - 12 / 252
    reps = 1500
    se = math.sqrt(exact * (1 - exact) / reps)
    for draw in (lambda r, k: r.beta(0.5, 3, k), lambda r, k: 0.1 * r.standard_t(2, k)):
        cov = coverage(rng, lambda r: draw(r, 5) - 0.2, lambda r: draw(r, 5), -0.2,
                       lambda x, y: stats.perm_interval(x, y, 0.95, bounds=(-50, 50)), reps)
        assert abs(cov - exact) < 3.5 * se, (cov, exact)


@pytest.mark.parametrize("n", [3, 5])
def test_perm_test_size_under_null_breakout_model(n):
    """No effect (same breakout probability in both arms): the one-sided test rejects at most alpha of the
    time and the 95% interval covers 0 at least 95% of the time, whatever the breakout probability."""
    rng = np.random.default_rng(7 + n)
    reps = 800
    for p in (0.3, 0.9):
        rej = cov = 0
        for _ in range(reps):
            x, y = breakout_sample(rng, p, n), breakout_sample(rng, p, n)
            rej += stats.perm_pvalues(x, y)[0] <= 0.05 + 1e-12
            lo, hi = stats.perm_interval(x, y)
            cov += lo <= 0 <= hi
        assert rej / reps <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / reps), (n, p, rej / reps)
        assert cov / reps >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / reps), (n, p, cov / reps)


def test_perm_interval_undercovers_real_breakout_effects():
    """Why the report also gives the bounded interval: a real effect on breakout probability is not a shift,
    and the exact shift interval then misses the mean difference far more than 5% of the time."""
    rng = np.random.default_rng(8)
    truth = breakout_mean(0.3) - breakout_mean(1.0)
    cov = coverage(rng, lambda r: breakout_sample(r, 0.3, 5), lambda r: breakout_sample(r, 1.0, 5), truth,
                   stats.perm_interval, 600)
    assert cov < 0.90, cov


# ------------------------------------------------------------------------------- conservative interval
FAST_BREAKOUT = [(0.0, 1.0), (0.3, 1.0), (0.5, 0.9), (0.1, 0.7), (0.0, 0.3), (0.5, 0.5), (1.0, 0.0)]
BETAS = [((2, 5), (5, 2)), ((0.3, 0.3), (2, 2)), ((0.5, 3), (3, 0.5)), ((1, 8), (1, 8))]


def _check_bounded_coverage(scenarios_b, scenarios_beta, ns, reps, seed):
    rng = np.random.default_rng(seed)
    worst = []
    for n in ns:
        for pm, pc in scenarios_b:
            cov = coverage(rng, lambda r: breakout_sample(r, pm, n), lambda r: breakout_sample(r, pc, n),
                           breakout_mean(pm) - breakout_mean(pc), stats.bounded_diff_interval, reps)
            worst.append((cov, n, "breakout", pm, pc))
        for (a1, b1), (a2, b2) in scenarios_beta:
            cov = coverage(rng, lambda r: r.beta(a1, b1, n), lambda r: r.beta(a2, b2, n),
                           a1 / (a1 + b1) - a2 / (a2 + b2), stats.bounded_diff_interval, reps)
            worst.append((cov, n, "beta", (a1, b1), (a2, b2)))
    return min(worst)


def test_bounded_interval_covers_breakout_and_continuous_sweeps():
    """Reported 95% interval vs the true difference of means: >= 93% in every scenario, n = 3 and 5."""
    worst = _check_bounded_coverage(FAST_BREAKOUT, BETAS, (3, 5), 500, 9)
    assert worst[0] >= 0.93, worst


@pytest.mark.slow
def test_bounded_interval_covers_full_grid():
    grid = [(pm, pc) for pm in (0, .1, .3, .5, .7, .9, 1) for pc in (0, .1, .3, .5, .7, .9, 1)]
    worst = _check_bounded_coverage(grid, BETAS, (3, 5, 10), 2000, 10)
    assert worst[0] >= 0.93, worst


def test_bounded_interval_hand_value():
    """Newcombe (1998) method 10 by hand for means 0 and 1 at n = 3, z = 1.96: Wilson [0, 0.5615] and
    [0.4385, 1]; the difference's interval is 0 - 1 +- sqrt(0.4385^2 + 0) on the side that matters."""
    z = 1.959963984540054
    w_hi = (z * z / 6 + z * math.sqrt(z * z / 36)) / (1 + z * z / 3)  # Wilson upper bound for 0/3
    lo, hi = stats.bounded_diff_interval([0, 0, 0], [1, 1, 1])
    assert hi == pytest.approx(-1 + math.sqrt(w_hi ** 2 + w_hi ** 2))
    assert lo == -1.0
    with pytest.raises(ValueError, match="must lie in"):
        stats.bounded_diff_interval([1.2, 0, 0], [0, 0, 0])


# --------------------------------------------------------------------------------------------- flags
def test_flags_direction_and_small_n():
    low, high = [0.02, 0.03, 0.01], [0.5, 0.48, 0.55]
    assert stats.compare(low, high).flag.startswith("method lower than control (evidence, exact p=0.050")
    assert stats.compare(high, low).flag.startswith("method WORSE than control (evidence")
    assert stats.compare([0.5], high).flag.startswith("n too small")
    assert stats.compare(low, []).flag.startswith("n too small")
    # overlapping seeds, method lower on average: hoped direction but not significant
    assert stats.compare([0.1, 0.5, 0.2], [0.3, 0.6, 0.25]).flag.startswith(
        "no evidence: interval includes 0")
    assert stats.compare([0.3, 0.5, 0.2], [0.3, 0.4, 0.25]).flag.startswith(
        "no evidence: control does as well")
    # gt pass: higher is better
    g = stats.compare([0.6, 0.61, 0.62], [0.3, 0.31, 0.32], lower_is_better=False)
    assert g.flag.startswith("method higher than control (evidence")


def test_evidence_flag_quotes_a_test_bound_that_excludes_0():
    """'evidence' only next to a test bound that excludes 0 (hand value at 3 + 3: max(x) - min(y)), and the
    flag 'no evidence: interval includes 0' quotes a bound that includes 0."""
    c = stats.compare([0.02, 0.03, 0.01], [0.5, 0.48, 0.55])
    assert c.bound == pytest.approx(0.03 - 0.48)
    assert c.flag == ("method lower than control (evidence, exact p=0.050, test bound <= -0.450, but the "
                      "conservative 95% interval includes 0: size uncertain)")
    g = stats.compare([0.6, 0.61, 0.62], [0.3, 0.31, 0.32], lower_is_better=False)
    assert g.bound == pytest.approx(0.6 - 0.32) and "test bound >= +0.280" in g.flag
    rng = np.random.default_rng(11)
    for _ in range(300):
        x, y = rng.random(3).round(1), rng.random(rng.integers(2, 5)).round(1)
        c = stats.compare(x, y)
        assert ("(evidence" in c.flag and not c.flag.startswith("method WORSE")) == (c.bound < 0), (x, y, c)
        assert (c.bound < 0) == (stats.perm_pvalues(x, y)[0] <= 0.05 + 1e-12), (x, y)
        if c.flag.startswith("no evidence: interval includes 0"):
            assert c.bound >= 0 and f"test bound <= {c.bound:+.3f}" in c.flag


def prereg_for(arms=("vanilla", "erase", "erase-matched"), seeds=(0, 1, 2), pilot=100, **kw):
    return stats.build_prereg(sweep="t", arms=arms, seeds=seeds, pilot_seed=pilot, git_sha="abc", **kw)


def test_erase_worse_than_placebo_is_flagged():
    """Issue 15's constructed case: erase +0.02 vs vanilla, its placebo -0.17 vs vanilla. The old
    within-placebo flag stayed silent; here erase vs erase-matched must say WORSE."""
    vanilla = {0: 0.50, 1: 0.55, 2: 0.60}
    erase = {0: 0.55, 1: 0.57, 2: 0.59}
    placebo = {0: 0.36, 1: 0.38, 2: 0.40}
    assert np.mean(list(erase.values())) - np.mean(list(vanilla.values())) == pytest.approx(0.02)
    assert np.mean(list(placebo.values())) - np.mean(list(vanilla.values())) == pytest.approx(-0.17)
    gt = {"vanilla": {0: .3, 1: .3, 2: .3}, "erase": {0: .3, 1: .3, 2: .3},
          "erase-matched": {0: .3, 1: .3, 2: .3}}
    res = stats.analyze({"vanilla": vanilla, "erase": erase, "erase-matched": placebo}, gt, prereg_for())
    vs_placebo, vs_vanilla = res["primary"]
    assert vs_placebo.control == "erase-matched" and vs_placebo.diff == pytest.approx(0.19)
    # the WORSE flag quotes the other side's test bound: min(erase) - max(placebo) = 0.55 - 0.40 > 0
    assert vs_placebo.flag.startswith(
        "method WORSE than control (evidence, exact p=0.050, test bound >= +0.150")
    assert vs_vanilla.flag.startswith("no evidence: control does as well")
    assert res["claim"] == "primary: NOT supported; erase WORSE than erase-matched"


def test_analyze_drops_pilot_and_supports_clear_effect():
    hack = {"vanilla": {0: 0.5, 1: 0.55, 2: 0.6, 100: 0.7}, "erase": {0: 0.02, 1: 0.03, 2: 0.01},
            "erase-matched": {0: 0.45, 1: 0.5, 2: 0.52}}
    gt = {"vanilla": {0: .30, 1: .31, 2: .32, 100: .2}, "erase": {0: .29, 1: .30, 2: .31},
          "erase-matched": {0: .30, 1: .31, 2: .32}}
    res = stats.analyze(hack, gt, prereg_for())
    assert res["dropped"] == [("vanilla", 100), ("vanilla", 100)]
    assert [c.n_control for c in res["primary"]] == [3, 3]
    assert res["claim"].startswith("primary: SUPPORTED")
    assert res["breakouts"] == {"erase": (0, 3), "erase-matched": (3, 3), "vanilla": (3, 3)}
    assert res["fisher"]["vanilla"] == pytest.approx(0.05)
    ctrl, g, lo, ni = res["secondary"][1]
    assert ctrl == "vanilla" and lo == pytest.approx(0.29 - 0.32) and ni.startswith("non-inferior")
    md = stats.primary_markdown(res, prereg_for(), (True, "written before the first run"))
    assert "test bound (exact one-sided 95%)" in md[6] and "pure shift" not in "\n".join(md)
    row = next(line for line in md if line.startswith("| erase vs vanilla |"))
    # the test bound at 3 + 3: max(erase) - min(vanilla) = 0.03 - 0.5
    assert row.startswith("| erase vs vanilla | 3 vs 3 | 0.020 vs 0.550 | -0.530 [")
    assert "| <= -0.470 | 0.050 |" in row


def test_noninferiority_hand_values():
    """At 3 + 3 runs and alpha 0.05 the one-sided bounds are min(x) - max(y) and max(x) - min(y)."""
    lo, flag = stats.noninferiority([0.30, 0.31, 0.32], [0.33, 0.34, 0.35])
    assert lo == pytest.approx(0.30 - 0.35) and flag.startswith("non-inferior")
    lo, flag = stats.noninferiority([0.10, 0.11, 0.12], [0.33, 0.34, 0.35])
    assert flag.startswith("inferior (upper bound -0.210")
    lo, flag = stats.noninferiority([0.10, 0.30, 0.12], [0.33, 0.34, 0.35])
    assert flag.startswith("inconclusive")
    assert stats.noninferiority([0.3], [0.3, 0.3])[1].startswith("n too small")


# ------------------------------------------------------------------------------------------- breakouts
def test_fisher_hand_values():
    # hypergeometric by hand: K breakouts among 6 runs, the control (3 runs) holds >= k_c of them
    assert stats.fisher_one_sided(0, 3, 3, 3) == pytest.approx(1 / math.comb(6, 3))  # 0.05
    assert stats.fisher_one_sided(1, 3, 3, 3) == pytest.approx(math.comb(4, 3) * math.comb(2, 0)
                                                               / math.comb(6, 3))
    assert stats.fisher_one_sided(0, 5, 3, 5) == pytest.approx(math.comb(5, 3) / math.comb(10, 3))  # 0.083
    assert stats.fisher_one_sided(0, 5, 4, 5) == pytest.approx(math.comb(5, 4) / math.comb(10, 4))  # 0.024
    assert stats.fisher_one_sided(2, 3, 1, 3) == pytest.approx(1 - (math.comb(3, 0) * math.comb(3, 3)) / 20)
    rng = np.random.default_rng(11)
    for _ in range(30):  # scipy's own Fisher implementation as a second reference
        nm, nc = rng.integers(1, 8, 2)
        km, kc = rng.integers(0, nm + 1), rng.integers(0, nc + 1)
        ref = sps.fisher_exact([[kc, nc - kc], [km, nm - km]], alternative="greater").pvalue
        assert stats.fisher_one_sided(km, nm, kc, nc) == pytest.approx(ref), (km, nm, kc, nc)
    with pytest.raises(ValueError, match="breakouts 4 of 3"):
        stats.fisher_one_sided(4, 3, 0, 3)


def test_min_detectable_and_power():
    assert stats.min_detectable_breakouts(3, 3) == [(0, 3, pytest.approx(0.05))]
    assert stats.min_detectable_breakouts(2, 2) == []  # best p = 1 / C(4, 2) = 1/6
    assert stats.min_detectable_breakouts(5, 5) == [(0, 4, pytest.approx(5 / 210)),
                                                    (1, 5, pytest.approx(5 / 210))]
    assert stats.fisher_power(0.0, 1.0, 3, 3) == pytest.approx(1.0)
    assert stats.fisher_power(0.1, 0.9, 3, 3) == pytest.approx(0.9 ** 6)  # only 0/3 vs 3/3 counts
    assert stats.breakout_count([0.2, 0.19, 0.5]) == (2, 3)
    assert "0/3 vs 3/3 (p = 0.050)" in stats.detectable_text(3, 3)


# ------------------------------------------------------------------------------------- preregistration
def test_build_prereg_fields_and_errors():
    pre = prereg_for()
    assert pre["primary"]["controls"] == ["erase-matched", "vanilla"] and pre["pilot"]["seed"] == 100
    assert pre["pilot"]["in_comparisons"] is False and pre["secondary"]["margin"] == 0.10
    with pytest.raises(ValueError, match="pilot_seed"):
        prereg_for(pilot=1)
    with pytest.raises(ValueError, match="arms"):
        prereg_for(arms=("vanilla", "erase"))
    with pytest.raises(ValueError, match="seeds"):
        prereg_for(seeds=(0, 0, 1))


def _start_run(d: Path, t: float) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    os.utime(d / "config.json", (t, t))
    return d


def test_prereg_write_and_valid(tmp_path):
    path = tmp_path / "sweeps" / "t" / "prereg.json"
    runs = [tmp_path / "runs" / "a", tmp_path / "runs" / "b"]
    assert stats.prereg_valid(path, runs) == (False, f"no preregistration: {path} is missing")
    t0 = datetime.datetime.now(datetime.timezone.utc).timestamp() - 100
    pre = prereg_for(created_at=datetime.datetime.fromtimestamp(t0, datetime.timezone.utc).isoformat())
    assert stats.write_prereg(path, pre) is True
    os.utime(path, (t0, t0))
    assert json.loads(path.read_text()) == pre and not list(path.parent.glob(".prereg-*"))
    assert stats.prereg_valid(path, runs) == (True, "no run has started yet")
    _start_run(runs[0], t0 + 50)
    _start_run(runs[1], t0 + 10)
    ok, why = stats.prereg_valid(path, runs)
    assert ok and "runs/b" in why, why
    # re-writing the same prereg (new timestamp) keeps the old file; a different one is refused
    assert stats.write_prereg(path, prereg_for()) is False and path.stat().st_mtime == t0
    with pytest.raises(ValueError, match="different preregistration"):
        stats.write_prereg(path, prereg_for(seeds=(0, 1, 2, 3)))
    os.utime(path, (t0 + 20, t0 + 20))  # file touched after run b started
    ok, why = stats.prereg_valid(path, runs)
    assert not ok and "modified" in why and "runs/b" in why
    late = prereg_for(created_at=datetime.datetime.fromtimestamp(t0 + 30, datetime.timezone.utc).isoformat())
    path.write_text(json.dumps(late))
    os.utime(path, (t0, t0))
    ok, why = stats.prereg_valid(path, runs)
    assert not ok and "recorded at" in why
    # a caller-supplied start time (e.g. a recorded created_at) replaces the config.json mtime
    ok, _ = stats.prereg_valid(path, runs, run_start=lambda d: t0 + 40)
    assert ok
    path.write_text("{")
    assert not stats.prereg_valid(path, runs)[0]


def test_run_start_is_the_recorded_started_at_not_the_mtime(tmp_path):
    """config.json's started_at (UTC) decides; a copy that resets mtimes changes nothing. Hand-set times."""
    t0 = datetime.datetime.now(datetime.timezone.utc).timestamp() - 1000
    iso = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()  # noqa: E731
    path = tmp_path / "prereg.json"
    stats.write_prereg(path, prereg_for(created_at=iso(t0)))
    os.utime(path, (t0, t0))
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    cfg = run / "config.json"
    cfg.write_text(json.dumps({"config": {}, "started_at": iso(t0 + 10)}))
    os.utime(cfg, (t0 - 50, t0 - 50))  # mtime says "before the prereg"; the record says after
    assert stats.config_json_start(run) == pytest.approx(t0 + 10)
    assert stats.prereg_valid(path, [run])[0]
    cfg.write_text(json.dumps({"config": {}, "started_at": iso(t0 - 10)}))
    os.utime(cfg, (t0 + 500, t0 + 500))  # mtime says after; the record says the run started first
    ok, why = stats.prereg_valid(path, [run])
    assert not ok and "recorded at" in why, why
    cfg.write_text(json.dumps({"config": {}, "started_at": "2026-01-01T00:00:00"}))  # no timezone: mtime
    os.utime(cfg, (t0 + 5, t0 + 5))
    assert stats.config_json_start(run) == pytest.approx(t0 + 5)


def test_a_copied_sweep_keeps_its_preregistration_and_an_edit_is_caught(tmp_path):
    """cp -r resets every mtime (the prereg looks newer than the runs): with the runs' recorded started_at and
    sweep.json's hash of the prereg the comparison stays valid; an edited prereg fails by its hash; without
    the hash the mtime rule still applies."""
    t0 = datetime.datetime.now(datetime.timezone.utc).timestamp() - 1000
    iso = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()  # noqa: E731
    path = tmp_path / "prereg.json"
    stats.write_prereg(path, prereg_for(created_at=iso(t0)))
    sha = stats.file_sha256(path)
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {}, "started_at": iso(t0 + 10)}))
    os.utime(path, (t0 + 500, t0 + 500))  # the copy's time
    assert stats.prereg_valid(path, [run], recorded_sha=sha)[0]
    ok, why = stats.prereg_valid(path, [run])
    assert not ok and "modified" in why, why
    edited = json.loads(path.read_text()) | {"alpha": 0.2}
    path.write_text(json.dumps(edited))
    ok, why = stats.prereg_valid(path, [run], recorded_sha=sha)
    assert not ok and "recorded at submission" in why, why
    old = tmp_path / "runs" / "old"  # a run without started_at: the mtime rule even with the hash
    old.mkdir()
    (old / "config.json").write_text("{}")
    os.utime(old / "config.json", (t0 + 20, t0 + 20))
    stats.write_prereg(tmp_path / "p2.json", prereg_for(created_at=iso(t0)))
    os.utime(tmp_path / "p2.json", (t0 + 500, t0 + 500))
    p2_sha = stats.file_sha256(tmp_path / "p2.json")
    ok, why = stats.prereg_valid(tmp_path / "p2.json", [run, old], recorded_sha=p2_sha)
    assert not ok and "modified" in why, why


def test_setup_run_dir_records_started_at_and_resume_keeps_it(tmp_path):
    import dataclasses

    import runs
    import train

    cfg = dataclasses.replace(train.PRESETS["smoke"][1], out_dir=str(tmp_path), run_name="r")
    before = datetime.datetime.now(datetime.timezone.utc).timestamp()
    d = runs.setup_run_dir(cfg, train.RUN_CONTROL_FIELDS)
    t = stats.recorded_start(d)
    assert t is not None and before - 1 <= t <= datetime.datetime.now(datetime.timezone.utc).timestamp()
    saved = (d / "config.json").read_text()
    runs.setup_run_dir(dataclasses.replace(cfg, resume=str(d)), train.RUN_CONTROL_FIELDS)
    assert (d / "config.json").read_text() == saved and stats.recorded_start(d) == t


# ----------------------------------------------------------------------------------------------- grid
def test_round_robin_and_budget_trim():
    arms, seeds = ("vanilla", "erase", "erase-matched"), (0, 1, 2)
    order = [("vanilla", 0), ("erase", 0), ("erase-matched", 0), ("vanilla", 1), ("erase", 1),
             ("erase-matched", 1), ("vanilla", 2), ("erase", 2), ("erase-matched", 2)]
    assert stats.round_robin(arms, seeds) == order
    assert stats.budget_trim(arms, seeds, 7.0, None) == (order, [])
    assert stats.budget_trim(arms, seeds, 7.0, 45) == (order[:6], order[6:])  # 2 rounds of 21 h
    assert stats.budget_trim(arms, seeds, 7.0, 63) == (order, [])  # exactly 3 rounds
    assert stats.budget_trim(arms, seeds, 7.0, 20.9) == ([], order)
    per_arm = {"vanilla": 7.0, "erase": 8.0, "erase-matched": 8.0}  # 23 h a round
    assert stats.budget_trim(arms, seeds, per_arm, 46) == (order[:6], order[6:])
    assert stats.budget_trim(arms, seeds, per_arm, 45.9) == (order[:3], order[3:])
    with pytest.raises(ValueError, match="gpu_hours_per_run"):
        stats.budget_trim(arms, seeds, {"vanilla": 7.0, "erase": 0.0, "erase-matched": 8.0}, 50)


def test_monte_carlo_bound_agrees_with_p_when_the_observed_labelling_repeats(monkeypatch):
    """A Monte Carlo draw can repeat the observed labelling (here 3 + 3 runs, 20 labellings, 400 draws: about
    20 repeats); the p-value counts every repeat as a tie, so the bound must too: bound < 0 iff p <= alpha."""
    stats._relabellings.cache_clear()
    monkeypatch.setattr(stats, "MAX_EXACT", 10)
    monkeypatch.setattr(stats, "N_MONTE_CARLO", 400)
    rng = np.random.default_rng(12)
    try:
        mask = stats._relabellings(6, 3)
        assert (mask == mask[0]).all(axis=1).sum() > 5, "no repeats: the test would prove nothing"
        for _ in range(200):
            x, y = rng.random(3).round(2), rng.random(3).round(2)
            p_lo = stats.perm_pvalues(x, y)[0]
            assert (stats.perm_bound(x, y, 0.05) < 0) == (p_lo <= 0.05 + 1e-12), (x, y, p_lo)
            assert (stats.perm_bound(x, y, 0.10) < 0) == (p_lo <= 0.10 + 1e-12), (x, y, p_lo)
    finally:
        stats._relabellings.cache_clear()


def test_monte_carlo_path_matches_exact(monkeypatch):
    """Above MAX_EXACT relabellings a seeded Monte Carlo sample replaces enumeration; force it on 3 + 4
    runs."""
    x, y = [0.1, 0.05, 0.2], [0.3, 0.15, 0.4, 0.25]
    exact = stats.perm_pvalues(x, y)
    stats._relabellings.cache_clear()
    monkeypatch.setattr(stats, "MAX_EXACT", 10)
    try:
        mc = stats.perm_pvalues(x, y)
    finally:
        stats._relabellings.cache_clear()
    assert exact[0] == pytest.approx(2 / 35)  # observed + the swap of 0.2 and 0.15
    assert mc == pytest.approx(exact, abs=0.005), (mc, exact)


def test_primary_markdown_and_missing_arm():
    hack = {"vanilla": {0: 0.5, 1: 0.55, 2: 0.6, 100: 0.7}, "erase": {0: 0.02, 1: 0.03, 2: 0.01}}
    gt = {"vanilla": {0: .30, 1: .31, 2: .32}, "erase": {0: .29, 1: .30, 2: .31}}
    pre = prereg_for()
    res = stats.analyze(hack, gt, pre)  # no erase-matched runs at all
    assert res["primary"][0].flag.startswith("n too small (3 method, 0 control")
    assert res["claim"].startswith("primary: n too small")
    md = "\n".join(stats.primary_markdown(res, pre, (True, "written before the first run")))
    assert "**primary: n too small" in md and "vanilla seed 100" in md and "0/3 vs 3/3" in md
    md = "\n".join(stats.primary_markdown(res, pre, (False, "no preregistration: x is missing")))
    assert "**NOT preregistered: no preregistration: x is missing.**" in md
    assert "primary: not tested (no valid preregistration)" in md and "SUPPORTED" not in md


def test_secondary_rows_say_n_too_small_once():
    """At 1 run per arm the comparison and the non-inferiority test both say 'n too small': one mention per
    row; at 3 runs per arm the row carries the comparison flag and the non-inferiority verdict."""
    hack = {"vanilla": {0: 0.5}, "erase": {0: 0.02}, "erase-matched": {0: 0.45}}
    gt = {"vanilla": {0: 0.3}, "erase": {0: 0.29}, "erase-matched": {0: 0.31}}
    pre = prereg_for(seeds=(0,))
    res = stats.analyze(hack, gt, pre)
    md = stats.primary_markdown(res, pre, (True, "written before the first run"))
    sec = md[md.index(next(line for line in md if line.startswith("### Secondary"))):]
    rows = [line for line in sec if line.startswith("| erase vs")]
    assert len(rows) == 2
    for row in rows:
        assert row.count("n too small") == 1, row
        assert row.endswith("n too small (1 method, 1 control runs; need >= 2 each) |"), row
    hack3 = {a: {s: v + 0.01 * s for s in (0, 1, 2)} for a, v in ((k, d[0]) for k, d in hack.items())}
    gt3 = {a: {s: v + 0.01 * s for s in (0, 1, 2)} for a, v in ((k, d[0]) for k, d in gt.items())}
    pre3 = prereg_for()
    md3 = stats.primary_markdown(stats.analyze(hack3, gt3, pre3), pre3,
                                 (True, "written before the first run"))
    sec3 = md3[md3.index(next(line for line in md3 if line.startswith("### Secondary"))):]
    rows3 = [line for line in sec3 if line.startswith("| erase vs")]
    assert len(rows3) == 2 and all("n too small" not in r for r in rows3)
    assert all(r.split(" | ")[-1].split("; ")[-1].startswith(("non-inferior", "inferior", "inconclusive"))
               for r in rows3), rows3


def test_p_one_sided_follows_the_hoped_direction():
    hi, lo = [0.6, 0.61, 0.62], [0.3, 0.31, 0.32]
    assert stats.compare(hi, lo, lower_is_better=False).p_one_sided == pytest.approx(0.05)
    assert stats.compare(hi, lo).p_one_sided == pytest.approx(1.0)


def test_evidence_flag_says_when_the_conservative_interval_includes_zero():
    """3 + 3 runs at 0.02 vs 0.5 (hand: every relabelling but the observed one is less extreme, p = 1/20): the
    test finds the difference, the conservative interval at n = 3 still spans 0, and the flag says both."""
    c = stats.compare([0.02] * 3, [0.5] * 3)
    assert c.p_lower == pytest.approx(1 / 20)
    assert c.ci_lo <= 0 <= c.ci_hi
    assert c.flag == ("method lower than control (evidence, exact p=0.050, test bound <= -0.480, but the "
                      "conservative 95% interval includes 0: size uncertain)")
    # 5 + 5 runs at the extremes: the conservative interval excludes 0
    far = stats.compare([0.0] * 5, [1.0] * 5)
    assert far.ci_hi < 0
    assert far.flag == "method lower than control (evidence, exact p=0.004, test bound <= -1.000)"
