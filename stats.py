"""stats.py: small-n statistics for a sweep (issue 15): arm-vs-control comparisons over seeds, breakout
counts, direction-aware flags, preregistration, and the round-robin grid with budget trimming.

Pure functions on plain numbers (numpy / scipy only; no torch, no import of train.py or scripts/). The sweep
and summary scripts call them:

    import stats
    c = stats.compare([0.02, 0.03, 0.01], [0.5, 0.48, 0.55], method="erase", control="vanilla")
    c.flag            # 'method lower than control (evidence, exact p=0.050, test bound <= -0.450, but the
                      #  conservative 95% interval includes 0: size uncertain)'
    stats.fisher_one_sided(0, 3, 3, 3)                        # 0.05
    stats.min_detectable_breakouts(3, 3)                      # [(0, 3, 0.05)]

Which test and why (docs/sweeps_stats.md has the reading guide):

- The test is the exact two-sample permutation test (Fisher-Pitman) of the difference in means over seed
  labels, one-sided in the preregistered direction. Under "the arm has no effect" the runs of both arms are
  exchangeable, every relabelling of the seeds is equally likely, and P(p <= alpha) <= alpha holds exactly for
  ANY outcome distribution: nearly binary breakout outcomes, continuous ones, ties. Runs of different arms are
  independent (seeds are not paired): a paired sign-flip test over 3 seeds has 2^3 = 8 sign patterns, so its
  smallest one-sided p is 1/8 and it could never reach 0.05; the unpaired test over 3 + 3 runs has
  C(6, 3) = 20 relabellings and reaches p = 1/20 = 0.05 when all three method runs lie below all three control
  runs. A t interval assumes normal seeds; the percentile bootstrap at n = 3 is at most [min, max] of the
  seeds and covers a median only 1 - 2/2^3 = 75% of the time.
- The exact interval (`perm_lo`, `perm_hi`) inverts the same test over shifts (Tritchler 1984): the set of
  shifts d for which "method = control + d" is not rejected at (1 - level) / 2 on either side. It is exact
  under the shift model (coverage 1 - 2 floor(a N) / N for N relabellings, a = (1 - level) / 2) and covers 0
  exactly whenever the arm has no effect. At 3 + 3 runs the two-sided 95% interval is the whole feasible range
  [-(hi - lo), hi - lo] (20 relabellings cannot give 2.5% in a tail), and it undercovers real breakout
  effects (below), so summarize does not print it (Comparison keeps it). results.md prints the test's
  own one-sided (1 - alpha) bound (`bound`) instead: it excludes 0 iff p <= alpha, so a flag saying
  "evidence" always stands next to a test bound that excludes 0, and the bound covers 0 with probability
  >= 1 - alpha whenever the arm has no effect. It answers "is there an effect", not "how large": under a
  real breakout effect it undercovers the mean difference like the two-sided one (54-100% at n = 3 over the
  breakout grid below where the method is better; docs/sweeps_stats.md). A Monte Carlo draw may repeat the
  observed labelling; the bound counts every repeat as the p-value does, so the two still agree.
- A real effect on nearly binary outcomes is not a shift (the method changes the breakout probability, not
  the level), and there no interval built from the seeds' spread covers: an arm with breakout probability
  0.3 shows 0/3 breakouts 34% of the time, and then the seeds cannot reveal its mean. Measured at n = 5 over
  breakout probabilities {0, .1, .3, .5, .7, .9, 1} per arm (1000 sweeps a cell), cells with an effect: exact
  interval 40-94%, Welch t 40-97%, percentile bootstrap 39-94% (its worst no-effect cell: 77% at n = 3).
  For the size of the effect the report gives the conservative interval (`ci_lo`, `ci_hi`): Newcombe's
  hybrid score interval for a difference of means of outcomes bounded in [lo, hi], which uses the largest
  variance a bounded outcome with that mean can have (the Bernoulli one); a score approximation.
  Measured coverage >= 99.9% on that breakout grid at n = 3 and 5 (>= 99% with beta outcomes and at n = 10;
  tests/test_stats.py re-checks a fast subset, the slow test the whole grid). It is wide: at 3 + 3 runs even
  0.02 vs 0.5 on every seed gives about [-0.86, +0.19].
- Breakouts (final deploy hack >= 0.2 per run) are counted per arm and compared with Fisher's exact test,
  one-sided; with 3 seeds per arm only 0/3 vs 3/3 reaches p <= 0.05 (p = 1 / C(6, 3) = 0.05).
- The primary claim (method lowers the hack rate vs EACH preregistered control) is an intersection-union
  test: it holds only if every comparison has p <= alpha, and its size is <= alpha without a multiplicity
  correction. Everything else is exploratory.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
LEVEL = 0.95
BREAKOUT = 0.2  # a run "broke out" when its final deploy hack_strict >= this (the benchmark's >= 20% rule)
NI_MARGIN = 0.10  # gt pass non-inferiority margin (10 points)
BOUNDS = (0.0, 1.0)  # rates live in [0, 1]
MAX_EXACT = 200_000  # relabellings enumerated exactly; above this a seeded Monte Carlo sample is used
N_MONTE_CARLO = 100_000
PRIMARY_METHOD = "erase"
PRIMARY_CONTROLS = ("erase-matched", "vanilla")
PREREG_KEYS = ("schema", "sweep", "created_at", "git_sha", "arms", "seeds", "pilot", "primary", "secondary",
               "test", "alpha", "breakout_threshold")


# ---------------------------------------------------------------------------------------------- helpers
def _sig(p: float, alpha: float) -> bool:
    """p <= alpha up to float rounding (1 / C(6, 3) computed by scipy is 0.05000000000000001)."""
    return p <= alpha * (1 + 1e-9)


def _sample(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: values must be finite numbers, got {list(a)}; "
                         "drop runs without a final eval")
    return a


def _values(v, name: str) -> np.ndarray:
    """A sequence or a {seed: value} dict as a 1-D float array."""
    return _sample(list(v.values()) if isinstance(v, Mapping) else v, name)


@functools.lru_cache(maxsize=32)
def _relabellings(n_total: int, m: int, rng_seed: int = 0) -> np.ndarray:
    """Boolean mask (P, n_total): row = which pooled runs carry the method label. Exact enumeration when
    C(n_total, m) <= MAX_EXACT (row 0 is then the observed labelling), else the observed labelling followed
    by N_MONTE_CARLO uniform random ones."""
    n_perm = math.comb(n_total, m)
    if n_perm <= MAX_EXACT:
        mask = np.zeros((n_perm, n_total), dtype=bool)
        for i, idx in enumerate(itertools.combinations(range(n_total), m)):
            mask[i, list(idx)] = True
        mask.flags.writeable = False
        return mask
    rng = np.random.default_rng(rng_seed)
    mask = np.zeros((N_MONTE_CARLO + 1, n_total), dtype=bool)
    mask[0, :m] = True
    order = np.argsort(rng.random((N_MONTE_CARLO, n_total)), axis=1)[:, :m]
    mask[np.arange(1, N_MONTE_CARLO + 1)[:, None], order] = True
    mask.flags.writeable = False
    return mask


def _perm_parts(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per relabelling pi: b_pi = T_pi(0) - T_obs(0) and c_pi >= 0 with T_pi(d) - T_obs(d) = b_pi + c_pi d,
    where T = mean(method) - mean(control) after subtracting the shift d from the method's runs."""
    m, n = len(x), len(y)
    z = np.concatenate([x, y])
    mask = _relabellings(m + n, m)  # (P, m + n)
    t_pi = (mask @ z) / m - ((~mask) @ z) / n  # (P,)
    k = mask[:, :m].sum(axis=1)  # method runs that keep the method label
    c = 1.0 - k / m + (m - k) / n  # (P,); 0 only for the observed labelling
    return t_pi - (x.mean() - y.mean()), c


# ----------------------------------------------------------------------------------- permutation test
def perm_pvalues(method, control) -> tuple[float, float]:
    """Exact one-sided permutation p-values for mean(method) - mean(control): (p_lower, p_higher).
    p_lower = share of seed relabellings whose difference is <= the observed one (small: method lower);
    p_higher = share >= the observed one. Ties count for the null, so both are valid (conservative)
    p-values."""
    x, y = _sample(method, "method"), _sample(control, "control")
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"perm_pvalues needs >= 1 run per arm, got {len(x)} method and {len(y)} "
                         "control runs")
    b, _ = _perm_parts(x, y)
    tol = 1e-12 * max(1.0, float(np.abs(np.concatenate([x, y])).max()))
    return float(np.mean(b <= tol)), float(np.mean(b >= -tol))


def perm_interval(method, control, level: float = LEVEL,
                  bounds: tuple[float, float] = BOUNDS) -> tuple[float, float]:
    """Exact test-inversion interval for the shift d in "method = control + d": the d not rejected by either
    one-sided permutation test at a = (1 - level) / 2 (rejection at p <= a). Clipped to the feasible range
    [-(hi - lo), hi - lo]; that whole range when the relabellings cannot reach a (3 + 3 runs at level
    0.95)."""
    assert 0 < level < 1, f"level must be in (0, 1), got {level}"
    x, y = _sample(method, "method"), _sample(control, "control")
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"perm_interval needs >= 1 run per arm, got {len(x)} method and {len(y)} "
                         "control runs")
    b, c = _perm_parts(x, y)
    a = (1 - level) / 2
    keep = c > 1e-12
    n_obs = int((~keep).sum())  # rows of the observed labelling: 1 if enumerated, >= 1 in a Monte Carlo draw
    # relabelling pi's difference crosses the observed one at d = r_pi;
    # p_higher(d) = (n_obs + #{r_pi <= d}) / P
    r = np.sort(np.round(-b[keep] / c[keep], 12) + 0.0)  # rounded: a crossing at exactly 0 stays 0
    j = int(math.floor(a * len(b) + 1e-9)) - n_obs + 1
    width = bounds[1] - bounds[0]
    if j <= 0:
        return -width, width
    lo, hi = float(r[j - 1]), float(r[-j])
    return max(lo, -width), min(hi, width)


def perm_bound(method, control, alpha: float = ALPHA, side: str = "upper",
               bounds: tuple[float, float] = BOUNDS) -> float:
    """One-sided (1 - alpha) exact bound on the shift: `upper` is < 0 exactly when p_lower <= alpha."""
    lo, hi = perm_interval(method, control, level=1 - 2 * alpha, bounds=bounds)
    return hi if side == "upper" else lo


# --------------------------------------------------------------------------------- conservative interval
def _wilson(p: float, n: int, z: float) -> tuple[float, float]:
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / den
    return centre - half, centre + half


def bounded_diff_interval(method, control, level: float = LEVEL,
                          bounds: tuple[float, float] = BOUNDS) -> tuple[float, float]:
    """Conservative interval for mean(method) - mean(control) of outcomes bounded in `bounds`: Newcombe's
    hybrid score interval (his method 10) on the means rescaled to [0, 1], i.e. the Wilson interval of each
    arm with the largest variance a bounded outcome of that mean can have. A score approximation, not a proof
    of coverage: checked by simulation (module docstring) for breakout and beta outcomes."""
    lo_b, hi_b = bounds
    assert hi_b > lo_b, f"bounds must be (low, high) with high > low, got {bounds}"
    x, y = _sample(method, "method"), _sample(control, "control")
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"bounded_diff_interval needs >= 1 run per arm, got {len(x)} and {len(y)}")
    if (x.min(initial=lo_b) < lo_b or x.max(initial=hi_b) > hi_b or y.min(initial=lo_b) < lo_b
            or y.max(initial=hi_b) > hi_b):
        raise ValueError(f"bounded_diff_interval: values must lie in {bounds}; got {list(x)} and {list(y)}")
    w = hi_b - lo_b
    p1, p2 = (x.mean() - lo_b) / w, (y.mean() - lo_b) / w
    z = float(sps.norm.ppf(1 - (1 - level) / 2))
    l1, u1 = _wilson(p1, len(x), z)
    l2, u2 = _wilson(p2, len(y), z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return float(max(lo, -1.0) * w), float(min(hi, 1.0) * w)


# ----------------------------------------------------------------------------------------------- flags
def direction_flag(n_method: int, n_control: int, p_lower: float, p_higher: float, diff: float,
                   alpha: float = ALPHA, lower_is_better: bool = True,
                   ci: tuple[float, float] = (float("nan"), float("nan")),
                   bound: float = float("nan"), bad_bound: float = float("nan")) -> str:
    """The verdict of one comparison, in words; never empty, so an absent flag cannot read as a pass.
    'n too small'                    fewer than 2 runs in either arm
    'method lower/higher than control (evidence, exact p=..)'  the preregistered one-sided test at alpha
    'method WORSE than control (evidence, exact p=..)'         the same test in the other direction at alpha
    'no evidence: control does as well (...)'                  point difference not in the hoped direction
    'no evidence: interval includes 0 (...)'                   hoped direction, test not at alpha
    `bound` is the test's exact one-sided (1 - alpha) bound in the hoped direction (Comparison.bound), closed
    (the shift d <= bound for a lower-is-better metric); it excludes 0 exactly when the test is at alpha, and
    the flag quotes it; a WORSE flag quotes `bad_bound`, the same bound of the other side's test. So
    'evidence' never stands next to a test interval that includes 0. An 'evidence' flag whose conservative
    interval `ci` still includes 0 says so: the test finds a difference, its size is not pinned down (at
    n = 3-5 with nearly binary runs the two often disagree)."""
    if n_method < 2 or n_control < 2:
        return f"n too small ({n_method} method, {n_control} control runs; need >= 2 each)"
    p_good, p_bad = (p_lower, p_higher) if lower_is_better else (p_higher, p_lower)
    good_word = "lower" if lower_is_better else "higher"
    wide = ", but the conservative 95% interval includes 0: size uncertain" if ci[0] <= 0 <= ci[1] else ""
    tb = "" if math.isnan(bound) else f", test bound {bound_text(bound, lower_is_better)}"
    if _sig(p_good, alpha):
        return f"method {good_word} than control (evidence, exact p={p_good:.3f}{tb}{wide})"
    if _sig(p_bad, alpha):
        bb = "" if math.isnan(bad_bound) else f", test bound {bound_text(bad_bound, not lower_is_better)}"
        return f"method WORSE than control (evidence, exact p={p_bad:.3f}{bb}{wide})"
    hoped = diff < 0 if lower_is_better else diff > 0
    if not hoped:
        return f"no evidence: control does as well (diff {diff:+.3f}, p={p_good:.3f})"
    return f"no evidence: interval includes 0 (diff {diff:+.3f}, p={p_good:.3f}{tb})"


def bound_text(bound: float, upper: bool) -> str:
    """A closed one-sided bound on the shift as printed: '<= -0.450' (upper) or '>= +0.280' (lower)."""
    return f"{'<=' if upper else '>='} {bound:+.3f}"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One method arm vs one control arm on one metric (per-seed final values)."""

    method: str
    control: str
    metric: str
    n_method: int
    n_control: int
    mean_method: float
    mean_control: float
    diff: float  # mean(method) - mean(control)
    ci_lo: float  # conservative bounded-outcome interval at `level` (coverage checked by simulation)
    ci_hi: float
    perm_lo: float  # exact two-sided permutation interval at `level` (shift model; not printed)
    perm_hi: float
    bound: float  # the test's exact one-sided (1 - alpha) bound, hoped direction; excludes 0 iff p <= alpha
    p_lower: float  # exact one-sided p that the method is lower
    p_higher: float  # exact one-sided p that the method is higher
    level: float
    alpha: float
    flag: str
    lower_is_better: bool = True

    @property
    def p_one_sided(self) -> float:
        """The exact one-sided p in the hoped direction (lower for hack rates, higher for gt pass)."""
        return self.p_lower if self.lower_is_better else self.p_higher


def compare(method_values, control_values, *, method: str = "method", control: str = "control",
            metric: str = "hack_strict", lower_is_better: bool = True, alpha: float = ALPHA,
            level: float = LEVEL, bounds: tuple[float, float] = BOUNDS) -> Comparison:
    """Difference in means with both intervals, exact one-sided p-values and the direction-aware flag.
    Accepts sequences or {seed: value} dicts (runs are independent; seeds are not paired)."""
    x, y = _values(method_values, method), _values(control_values, control)
    nan = float("nan")
    if len(x) == 0 or len(y) == 0:
        return Comparison(method, control, metric, len(x), len(y), float(x.mean()) if len(x) else nan,
                          float(y.mean()) if len(y) else nan, nan, nan, nan, nan, nan, nan, nan, nan, level,
                          alpha, direction_flag(len(x), len(y), 1.0, 1.0, nan, alpha, lower_is_better),
                          lower_is_better)
    p_lo, p_hi = perm_pvalues(x, y)
    diff = float(x.mean() - y.mean())
    ci = bounded_diff_interval(x, y, level, bounds)
    pi = perm_interval(x, y, level, bounds)
    # both one-sided (1 - alpha) test bounds (as perm_bound) from one inversion: hoped side and other side
    one_lo, one_hi = perm_interval(x, y, 1 - 2 * alpha, bounds)
    bound, bad = (one_hi, one_lo) if lower_is_better else (one_lo, one_hi)
    return Comparison(method, control, metric, len(x), len(y), float(x.mean()), float(y.mean()), diff,
                      ci[0], ci[1], pi[0], pi[1], bound, p_lo, p_hi, level, alpha,
                      direction_flag(len(x), len(y), p_lo, p_hi, diff, alpha, lower_is_better, ci, bound,
                                     bad),
                      lower_is_better)


def noninferiority(method_values, control_values, margin: float = NI_MARGIN, alpha: float = ALPHA,
                   bounds: tuple[float, float] = BOUNDS) -> tuple[float, str]:
    """Non-inferiority of the method on a higher-is-better metric (gt pass) within `margin`: the exact
    one-sided (1 - alpha) lower permutation bound on the shift vs -margin. Returns (lower bound, flag):
    'non-inferior' (bound > -margin), 'inferior' (upper bound < -margin), else 'inconclusive'; 'n too small'
    below 2 runs per arm."""
    assert margin > 0, f"margin must be > 0, got {margin}"
    x, y = _values(method_values, "method"), _values(control_values, "control")
    if len(x) < 2 or len(y) < 2:
        return float("nan"), f"n too small ({len(x)} method, {len(y)} control runs; need >= 2 each)"
    lo, hi = perm_interval(x, y, level=1 - 2 * alpha, bounds=bounds)
    if lo > -margin:
        return lo, f"non-inferior (lower bound {lo:+.3f} > -{margin:.2f})"
    if hi < -margin:
        return lo, f"inferior (upper bound {hi:+.3f} < -{margin:.2f})"
    return lo, f"inconclusive (lower bound {lo:+.3f} <= -{margin:.2f})"


def paired_signflip_pvalues(method, control) -> tuple[float, float]:
    """Exact one-sided sign-flip p-values for the mean of paired differences method_i - control_i (two
    measurements of the same run, e.g. route's deploy and shrinkage eval modes): (p_lower, p_higher) over all
    2^n sign patterns, ties counted for the null. With n pairs the smallest p is 1 / 2^n (1/8 at n = 3)."""
    x, y = _values(method, "method"), _values(control, "control")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"paired_signflip_pvalues needs equally many >= 1 pairs, got {len(x)} and {len(y)}")
    d = x - y
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))  # (2^n, n)
    t = signs @ d / len(d)
    obs = d.mean()
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    return float(np.mean(t <= obs + tol)), float(np.mean(t >= obs - tol))


# -------------------------------------------------------------------------------------------- breakouts
def breakout_count(values, threshold: float = BREAKOUT) -> tuple[int, int]:
    """(runs with value >= threshold, runs)."""
    a = _values(values, "values")
    return int((a >= threshold).sum()), len(a)


def fisher_one_sided(k_method: int, n_method: int, k_control: int, n_control: int) -> float:
    """Fisher's exact one-sided p that the method breaks out less often than the control: with the margins
    fixed, the hypergeometric P(control holds >= k_control of the k_method + k_control breakouts)."""
    for name, k, n in (("method", k_method, n_method), ("control", k_control, n_control)):
        if not (0 <= k <= n and n >= 1):
            raise ValueError(f"fisher_one_sided: {name} breakouts {k} of {n} runs; need 0 <= k <= n, n >= 1")
    total = k_method + k_control
    return float(sps.hypergeom.sf(k_control - 1, n_method + n_control, total, n_control))


def min_detectable_breakouts(n_method: int, n_control: int,
                             alpha: float = ALPHA) -> list[tuple[int, int, float]]:
    """The weakest breakout outcomes Fisher's one-sided test calls significant: (method breakouts, control
    breakouts, p) with p <= alpha such that one more method breakout or one fewer control breakout is not.
    Empty when no outcome can reach alpha. With 3 seeds per arm: [(0, 3, 0.05)]."""
    out = []
    for k_m in range(n_method + 1):
        for k_c in range(n_control + 1):
            p = fisher_one_sided(k_m, n_method, k_c, n_control)
            weaker = [(k_m + 1, k_c)] if k_m < n_method else []
            weaker += [(k_m, k_c - 1)] if k_c > 0 else []
            weaker_sig = any(_sig(fisher_one_sided(a, n_method, b, n_control), alpha) for a, b in weaker)
            if _sig(p, alpha) and not weaker_sig:
                out.append((k_m, k_c, p))
    return out


def fisher_power(p_method: float, p_control: float, n_method: int, n_control: int,
                 alpha: float = ALPHA) -> float:
    """Exact probability that Fisher's one-sided test reaches p <= alpha when each method run breaks out with
    probability p_method and each control run with p_control (independent binomials)."""
    pm = sps.binom.pmf(np.arange(n_method + 1), n_method, p_method)
    pc = sps.binom.pmf(np.arange(n_control + 1), n_control, p_control)
    return float(sum(pm[a] * pc[b] for a in range(n_method + 1) for b in range(n_control + 1)
                     if _sig(fisher_one_sided(a, n_method, b, n_control), alpha)))


def detectable_text(n_method: int, n_control: int, alpha: float = ALPHA) -> str:
    """One sentence for results.md: the smallest breakout effect the seeds can detect, and the exact test's
    floor for the mean comparison."""
    mins = min_detectable_breakouts(n_method, n_control, alpha)
    floor = 1 / math.comb(n_method + n_control, n_method)
    if not mins:
        s = (f"with {n_method} method and {n_control} control runs no breakout count reaches "
             f"one-sided p <= {alpha}")
    else:
        cases = ", ".join(f"{a}/{n_method} vs {b}/{n_control} (p = {p:.3f})" for a, b, p in mins)
        s = (f"with {n_method} method and {n_control} control runs the weakest breakout outcomes reaching "
             f"one-sided p <= {alpha} are {cases}")
    return s + f"; the exact permutation test's smallest one-sided p is {floor:.3f}."


# ------------------------------------------------------------------------------------------- analysis
def analyze(hack: Mapping[str, Mapping[int, float]], gt: Mapping[str, Mapping[int, float]], prereg: Mapping,
            ) -> dict:
    """The preregistered analysis from per-arm {seed: final value} dicts (deploy mode, final step).
    Only the prereg's seeds are used (the pilot seed is dropped: it was selected by the gate). Returns
    {'primary': [Comparison per control], 'secondary': [(control, Comparison, ni lower bound, ni flag)],
    'breakouts': {arm: (k, n)}, 'fisher': {control: p}, 'claim': str, 'dropped': [(arm, seed)]}."""
    seeds = set(prereg["seeds"])
    pr = prereg["primary"]
    method, controls = pr["method"], tuple(pr["controls"])
    alpha, thr = float(prereg["alpha"]), float(prereg["breakout_threshold"])
    margin = float(prereg["secondary"]["margin"])
    dropped = sorted((a, s) for d in (hack, gt) for a, v in d.items() for s in v if s not in seeds)

    def pick(d: Mapping[str, Mapping[int, float]], arm: str) -> dict[int, float]:
        return {s: float(v) for s, v in sorted(d.get(arm, {}).items()) if s in seeds}

    primary, secondary, fisher = [], [], {}
    for ctrl in controls:
        primary.append(compare(pick(hack, method), pick(hack, ctrl), method=method, control=ctrl,
                               metric=pr["metric"], alpha=alpha))
        g = compare(pick(gt, method), pick(gt, ctrl), method=method, control=ctrl,
                    metric=prereg["secondary"]["metric"], lower_is_better=False, alpha=alpha)
        lo, ni = noninferiority(pick(gt, method), pick(gt, ctrl), margin, alpha)
        secondary.append((ctrl, g, lo, ni))
    breakouts = {a: breakout_count(pick(hack, a), thr) for a in (method,) + controls if pick(hack, a)}
    for ctrl in controls:
        if method in breakouts and ctrl in breakouts:
            fisher[ctrl] = fisher_one_sided(*breakouts[method], *breakouts[ctrl])
    if any(c.flag.startswith("n too small") for c in primary):
        claim = "primary: n too small (need >= 2 runs per arm in every primary comparison)"
    elif all(_sig(c.p_lower, alpha) for c in primary):
        claim = f"primary: SUPPORTED ({method} lower than each of {', '.join(controls)} at alpha {alpha})"
    elif any(_sig(c.p_higher, alpha) for c in primary):
        bad = ", ".join(c.control for c in primary if _sig(c.p_higher, alpha))
        claim = f"primary: NOT supported; {method} WORSE than {bad}"
    else:
        weak = ", ".join(c.control for c in primary if not _sig(c.p_lower, alpha))
        claim = f"primary: NOT supported (no evidence vs {weak})"
    return dict(primary=primary, secondary=secondary, breakouts=breakouts, fisher=fisher, claim=claim,
                dropped=dropped)


def nominal_only(text: str) -> str:
    """`text` with every 'evidence' flag in it printed as nominal only (results.md without a valid prereg)."""
    return text.replace("(evidence, ", "(nominal only: no valid prereg, not significant; ")


def _fmt_cmp(c: Comparison, valid: bool = True) -> str:
    """One results.md row; without a valid prereg an 'evidence' flag is printed as nominal only."""
    flag = c.flag if valid else nominal_only(c.flag)
    if c.n_method == 0 or c.n_control == 0:
        return f"| {c.method} vs {c.control} | {c.n_method} vs {c.n_control} | - | - | - | - | {flag} |"
    return (f"| {c.method} vs {c.control} | {c.n_method} vs {c.n_control} | {c.mean_method:.3f} vs "
            f"{c.mean_control:.3f} | {c.diff:+.3f} [{c.ci_lo:+.3f}, {c.ci_hi:+.3f}] | "
            f"{bound_text(c.bound, c.lower_is_better)} | {c.p_one_sided:.3f} | {flag} |")


def primary_markdown(res: Mapping, prereg: Mapping, valid: tuple[bool, str]) -> list[str]:
    """The results.md section for the preregistered analysis (`res` from analyze, `valid` from prereg_valid).
    With an invalid prereg the claim line says so and nothing is called significant."""
    pr, sec = prereg["primary"], prereg["secondary"]
    ok, why = valid
    head = (f"Preregistered ({why})." if ok else
            f"**NOT preregistered: {why}.** The comparisons below are exploratory; "
            "none is called significant.")
    cols = ["| comparison | n | means | diff [conservative 95%] | test bound (exact one-sided 95%) "
            "| one-sided p (hoped direction) | flag |",
            "|---|---|---|---|---|---|---|"]
    claim = res["claim"] if ok else "primary: not tested (no valid preregistration)"
    title = (f"## Primary comparison: {pr['method']} vs {', '.join(pr['controls'])}, "
             f"final {pr['mode']} {pr['metric']}")
    L = [title, "", head, "", f"**{claim}**", "", *cols]
    L += [_fmt_cmp(c, ok) for c in res["primary"]]
    bo = ", ".join(f"{a} {k}/{n}" for a, (k, n) in res["breakouts"].items())
    fi = ", ".join(f"vs {c}: p = {p:.3f}" for c, p in res["fisher"].items())
    L += ["", f"Breakouts ({pr['metric']} >= {prereg['breakout_threshold']}): {bo or '-'}. "
          f"Fisher exact, one-sided: {fi or '-'}.", "",
          f"Smallest detectable effect: {prereg['min_detectable']}", ""]
    L += [f"### Secondary: {sec['metric']}, non-inferiority margin {sec['margin']:.2f}", "", *cols]
    for _, c, _, ni in res["secondary"]:
        row = _fmt_cmp(c, ok)
        # below 2 runs per arm the comparison and the non-inferiority test say the same 'n too small':
        # print it once
        L.append(row if ni.startswith("n too small") and c.flag.startswith("n too small")
                 else row[:-2] + f"; {ni} |")
    if res["dropped"]:
        L += ["", "Not in any comparison (pilot or other non-sweep seeds): "
              + ", ".join(f"{a} seed {s}" for a, s in sorted(set(res["dropped"])))]
    return L + [""]


# ------------------------------------------------------------------------------------- preregistration
def build_prereg(*, sweep: str, arms: Sequence[str], seeds: Sequence[int], pilot_seed: int, git_sha: str,
                 method: str = PRIMARY_METHOD, controls: Sequence[str] = PRIMARY_CONTROLS,
                 metric: str = "hack_strict", mode: str = "deploy", secondary_metric: str = "gt_pass",
                 margin: float = NI_MARGIN, alpha: float = ALPHA, breakout_threshold: float = BREAKOUT,
                 gate_metric: str = "hack_strict", gate_min: float = BREAKOUT,
                 created_at: str | None = None) -> dict:
    """The preregistration record written before the first run (issue 15). Raises ValueError naming the field
    when the arms lack the method/controls/vanilla, the pilot seed is one of the sweep's seeds, or a number is
    out of range."""
    arms, seeds = list(arms), [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: need distinct seeds, got {seeds}")
    missing = [a for a in (method, *controls) if a not in arms]
    if missing:
        raise ValueError(f"arms: {missing} are in the primary comparison but not in the grid {arms}; "
                         "add them")
    if int(pilot_seed) in seeds:
        raise ValueError(f"pilot_seed: {pilot_seed} is one of the sweep seeds {seeds}; the gate selects its "
                         f"pilot run, so it must use its own seed (e.g. {max(seeds) + 100})")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha: must be in (0, 0.5), got {alpha}")
    if not 0 < margin < 1:
        raise ValueError(f"margin: the gt-pass non-inferiority margin must be in (0, 1), got {margin}")
    created_at = created_at or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    n = len(seeds)
    return {
        "schema": 1,
        "sweep": sweep,
        "created_at": created_at,
        "git_sha": git_sha,
        "arms": arms,
        "seeds": seeds,
        "pilot": {
            "arm": "vanilla", "seed": int(pilot_seed), "metric": gate_metric, "mode": mode,
            "threshold": gate_min,
            "rule": f"queue the sweep only if the pilot vanilla run (seed {pilot_seed}) reaches final {mode} "
                    f"{gate_metric} >= {gate_min}; the pilot run is never part of any comparison",
            "in_comparisons": False,
        },
        "primary": {
            "method": method, "controls": list(controls), "metric": metric, "mode": mode, "step": "final",
            "direction": "lower",
            "hypothesis": f"{method} has a lower final {mode} {metric} than each control",
            "decision": "intersection-union: supported only if every control's one-sided p <= alpha",
        },
        "secondary": {"metric": secondary_metric, "mode": mode, "step": "final", "test": "non-inferiority",
                      "margin": margin, "direction": "higher"},
        "test": "exact two-sample permutation test of the difference in means over seed labels, one-sided; "
                "intervals: exact permutation test inversion (shift model) and Newcombe bounded-outcome "
                "score",
        "alpha": alpha,
        "breakout_threshold": breakout_threshold,
        "breakout_test": "Fisher exact, one-sided",
        "min_detectable": detectable_text(n, n, alpha),
        "exploratory": "every other arm, metric, mode and step",
    }


def write_prereg(path: str | Path, prereg: Mapping) -> bool:
    """Write prereg.json atomically (temp file + rename in the same folder). An existing file with the same
    content apart from created_at is kept as is (its timestamp must stay before the runs); a different one
    raises. Returns True when it wrote the file."""
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text())
        strip = lambda d: {k: v for k, v in d.items() if k not in ("created_at", "git_sha")}  # noqa: E731
        if strip(old) == strip(json.loads(json.dumps(prereg))):
            return False
        raise ValueError(f"{path} exists with a different preregistration; the runs were planned under it. "
                         f"Resolve: use another sweep --name, or delete {path} only if no run has started")
    missing = [k for k in PREREG_KEYS if k not in prereg]
    assert not missing, f"prereg lacks {missing}; build it with build_prereg"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".prereg-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(prereg, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def recorded_start(run_dir: Path) -> float | None:
    """config.json's "started_at" (UTC, written by runs.setup_run_dir before step 0 and kept on --resume) in
    epoch seconds; None for a run that never started or an older run without the record."""
    p = Path(run_dir) / "config.json"
    try:
        t = datetime.datetime.fromisoformat(json.loads(p.read_text()).get("started_at") or "")
    except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError):
        return None
    return t.timestamp() if t.tzinfo is not None else None


def config_json_start(run_dir: Path) -> float | None:
    """A run's start time in epoch seconds: its recorded started_at, else config.json's mtime (older runs);
    None when the run never started. The record survives a copy that resets mtimes."""
    p = Path(run_dir) / "config.json"
    if not p.exists():
        return None
    t = recorded_start(run_dir)
    return t if t is not None else p.stat().st_mtime


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prereg_valid(prereg_path: str | Path, run_dirs: Sequence[str | Path],
                 run_start: Callable[[Path], float | None] = config_json_start,
                 recorded_sha: str | None = None) -> tuple[bool, str]:
    """(valid, reason): the prereg file exists, has every field, its recorded created_at is no later than the
    earliest start among run_dirs (run_start(run_dir) -> epoch seconds or None for a run that never started),
    and it was not edited afterwards: with recorded_sha (sweep.json's hash of it at submission) its content
    must hash to that, and when every started run also recorded its start the file's mtime is not consulted
    (a copy resets it); otherwise its mtime must be no later than the first start."""
    p = Path(prereg_path)
    if not p.exists():
        return False, f"no preregistration: {p} is missing"
    try:
        pre = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        return False, f"{p} is not valid JSON ({e})"
    missing = [k for k in PREREG_KEYS if k not in pre]
    if missing:
        return False, f"{p} lacks fields {missing}"
    try:
        created = datetime.datetime.fromisoformat(pre["created_at"])
    except (TypeError, ValueError):
        return False, f"{p}: created_at {pre['created_at']!r} is not an ISO timestamp"
    if created.tzinfo is None:
        return False, f"{p}: created_at {pre['created_at']!r} has no timezone"
    if recorded_sha is not None and file_sha256(p) != recorded_sha:
        return False, f"{p} differs from the preregistration recorded at submission (sweep.json's hash)"
    starts = [(t, Path(d)) for d in run_dirs if (t := run_start(Path(d))) is not None]
    if not starts:
        return True, "no run has started yet"
    first, first_dir = min(starts, key=lambda s: s[0])
    first_iso = datetime.datetime.fromtimestamp(first, datetime.timezone.utc).isoformat()
    if created.timestamp() > first:
        return False, f"{p} was recorded at {pre['created_at']}, after run {first_dir} started ({first_iso})"
    by_record = recorded_sha is not None and all(recorded_start(d) is not None for _, d in starts)
    if not by_record and p.stat().st_mtime > first:
        mt = datetime.datetime.fromtimestamp(p.stat().st_mtime, datetime.timezone.utc).isoformat()
        return False, f"{p} was modified at {mt}, after run {first_dir} started ({first_iso})"
    return True, f"written before the first run ({first_dir}, {first_iso})"


# ------------------------------------------------------------------------------------------------- grid
def round_robin(arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(arm, seed) in submission order: every arm of seed k before any run of seed k + 1."""
    return [(a, int(s)) for s in seeds for a in arms]


def budget_trim(arms: Sequence[str], seeds: Sequence[int], gpu_hours_per_run: float | Mapping[str, float],
                budget_gpu_hours: float | None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(kept, dropped) runs, both in round-robin order: keep the largest number of complete rounds (one run of
    every arm for one seed, seeds in the given order) whose GPU-hours fit the budget; None = no budget.
    gpu_hours_per_run is one figure for every arm or {arm: hours}."""
    order = round_robin(arms, seeds)
    if budget_gpu_hours is None:
        return order, []
    hours = {a: float(gpu_hours_per_run[a] if isinstance(gpu_hours_per_run, Mapping) else gpu_hours_per_run)
             for a in arms}
    bad = {a: h for a, h in hours.items() if not h > 0}
    if bad:
        raise ValueError(f"gpu_hours_per_run: must be > 0 for every arm, got {bad}")
    if budget_gpu_hours < 0:
        raise ValueError(f"budget_gpu_hours: must be >= 0, got {budget_gpu_hours}")
    per_round = sum(hours.values())
    rounds = min(len(seeds), int(math.floor(budget_gpu_hours / per_round + 1e-9)))
    n_keep = rounds * len(arms)
    return order[:n_keep], order[n_keep:]
