"""Vector-gated routing: per-rollout alignment with v_hack, zone assignment, zone statistics, the train-time
shrinkage factor, and the Advantage-Modification (AM) maths. Pure tensor functions: no model, no files;
arms.py wires them into the loop, scripts/gate_probe.py measures the gate on cached pools.

    python -c "import gate; print(gate.zone_counts(256, 0.125))"      # (32, 32): route / mid sizes
    python -m pytest tests/test_gate.py tests/test_gate_arms.py -q     # tests

Gate (docs/gating.md): per step, each scored rollout i (gate_scope: A_i > 0 by default, A_i != 0 with
"nonzero") gets

    a_i = cos(g_i, v)          g_i = d(loss_i)/d delta_S, the rollout's own share of the Dr.GRPO loss gradient

aggregated over modules ("mean" of per-module cosines, or "concat": cosine of the concatenated vectors).
Zones (0 keep, 1 mid, 2 route): quantile mode routes the top q and puts the next q in mid (exact counts
ceil(q n) and ceil(2 q n) - ceil(q n) when scores are distinct; tied scores straddling a boundary all go to
the LOWER zone, so a routed rollout always scores strictly above every non-routed one, all-equal scores
route nothing, and the assignment is permutation-equivariant). Threshold mode: keep a < tau_mid <= mid <
tau_route <= route. Deployed grad = sum over keep+mid of g_i, quarantine grad = sum over mid+route.

AM (Wu & Tang 2026): s_i = <mean hidden state over the completion at layer l, d>, d = unit mean(hack - clean)
over the hand-written pairs at the same layer; z-scored within each group;
r_i' = r_i * (1 - alpha * sigmoid(z_i) * [z_i > 0]) before the advantages.
"""

from __future__ import annotations

import math


import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

import antipasto

ZONES = ("keep", "mid", "route")  # zone codes 0, 1, 2
KEEP, MID, ROUTE = 0, 1, 2
AGGS = ("mean", "concat")
_EPS_COUNT = 1e-9  # q * n is computed in floating point: 0.1 * 30 = 3.0000000000000004 must give 3


# ----------------------------------------------------------------------------------------------------
# Alignment


@jaxtyped(typechecker=beartype)
def module_cos(
    g: Float[Tensor, "N r"], v: Float[Tensor, " r"]
) -> tuple[Float[Tensor, " N"], Float[Tensor, " N"], Float[Tensor, " N"]]:
    """(cos, dot, norm) of each row with the unit-normalised v, float64; cos = 0 for a zero row."""
    g64 = g.double()
    v64 = v.double().to(g64.device)
    vn = float(v64.norm())
    assert vn > 0 and math.isfinite(vn), f"direction has norm {vn}; need a nonzero finite vector"
    v64 = v64 / vn
    dot = g64 @ v64  # (N,)
    n = g64.norm(dim=1)  # (N,)
    cos = torch.where(n > 0, dot / n.clamp(min=1e-300), torch.zeros_like(dot))  # (N,)
    return cos, dot, n


def alignment(grads: dict[str, Tensor], directions: dict[str, Tensor], agg: str = "mean") -> Tensor:
    """a_i per sample from per-sample grads {module: (N, r)} and unit directions {module: (r,)}; (N,) float64.

    agg="mean": mean over modules of cos(g_i^m, v^m). agg="concat": cos of the concatenated g_i with the
    concatenated v (each v^m renormalised to 1, so |v| = sqrt(M)). A sample whose gradient is zero gets 0."""
    if agg not in AGGS:
        raise ValueError(f"gate agg must be one of {AGGS}, got {agg!r}")
    keys = list(grads)
    assert keys, "alignment: no per-sample gradients"
    missing = [k for k in keys if k not in directions]
    if missing:
        raise ValueError(f"directions lack {len(missing)} gradient keys (first {missing[0]!r}); "
                         "use directions for this module set")
    N = grads[keys[0]].shape[0]
    cos, dot, nrm = [], [], []
    for k in keys:
        g = grads[k].flatten(1)  # (N, r) (a matrix parameter flattens per sample; N = 0 allowed)
        assert g.shape[0] == N, f"{k}: {g.shape[0]} samples, expected {N}"
        c, d, n = module_cos(g.float() if g.dtype != torch.float64 else g, directions[k].reshape(-1).float())
        cos.append(c)
        dot.append(d)
        nrm.append(n)
    C, D, Nm = torch.stack(cos, 1), torch.stack(dot, 1), torch.stack(nrm, 1)  # (N, M) x3
    if agg == "mean":
        return C.mean(1)  # (N,)
    gn = Nm.pow(2).sum(1).sqrt()  # (N,)
    M = len(keys)
    return torch.where(gn > 0, D.sum(1) / (gn.clamp(min=1e-300) * math.sqrt(M)), torch.zeros_like(gn))  # (N,)


# ----------------------------------------------------------------------------------------------------
# Zones


def zone_counts(n: int, q: float) -> tuple[int, int]:
    """Target (route, mid) sizes for n scored rollouts: ceil(q n) and ceil(2 q n) - ceil(q n), capped at n."""
    if not 0.0 < q <= 0.5:
        raise ValueError(f"gate_q={q}: need 0 < q <= 0.5 (route = top q, mid = the next q)")
    assert n >= 0, f"n={n} < 0"
    k_r = min(n, math.ceil(q * n - _EPS_COUNT))
    k_rm = min(n, math.ceil(2 * q * n - _EPS_COUNT))
    return k_r, k_rm - k_r


def _above_kth(a: Tensor, k: int) -> Tensor:
    """Mask of entries strictly greater than the (k+1)-th largest value (all True when k >= n,
    none when k = 0)."""
    n = a.shape[0]
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=a.device)
    kth = torch.sort(a, descending=True).values[k]  # the (k+1)-th largest
    return a > kth


@jaxtyped(typechecker=beartype)
def assign_zones(a: Float[Tensor, " N"], q: float) -> Int[Tensor, " N"]:
    """Quantile zones (0 keep, 1 mid, 2 route) of scores a. With distinct scores exactly zone_counts(N, q);
    ties straddling a boundary go to the lower zone (so |route| <= k_r and |mid| + |route| <= k_r + k_m)."""
    if not torch.isfinite(a).all():
        raise ValueError("gate scores contain NaN/inf; check the per-sample gradients")
    k_r, k_m = zone_counts(a.shape[0], q)
    route = _above_kth(a, k_r)  # (N,)
    upper = _above_kth(a, k_r + k_m)  # (N,) route or mid
    return route.long() + upper.long()  # (N,) 2 route, 1 mid, 0 keep


@jaxtyped(typechecker=beartype)
def assign_zones_threshold(a: Float[Tensor, " N"], tau_mid: float, tau_route: float) -> Int[Tensor, " N"]:
    """Fixed thresholds: keep a < tau_mid <= mid < tau_route <= route."""
    if not tau_mid <= tau_route:
        raise ValueError(f"gate thresholds need tau_mid <= tau_route, got {tau_mid} > {tau_route}")
    if not torch.isfinite(a).all():
        raise ValueError("gate scores contain NaN/inf; check the per-sample gradients")
    return (a >= tau_mid).long() + (a >= tau_route).long()  # (N,)


def random_scores(n: int, seed: int) -> Tensor:
    """The non-directional gate's scores: i.i.d. uniforms from a seeded generator (distinct a.s.),
    (n,) float64."""
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    return torch.rand(n, generator=gen, dtype=torch.float64)


def full_zones(n_total: int, active_idx: Tensor, active_zones: Tensor) -> Tensor:
    """Zones over all n_total per-sample rows: the scored (active) rows get their zone,
    the rest keep. (n_total,)"""
    z = torch.zeros(n_total, dtype=torch.long)
    z[active_idx.cpu()] = active_zones.cpu()
    return z


# ----------------------------------------------------------------------------------------------------
# Gradient split


def split_grads(per_sample: dict[str, Tensor], zones: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """{module: (g_dep, g_quar)}: sums of the per-sample grads over keep+mid and over mid+route. float32."""
    out = {}
    for k, G in per_sample.items():  # G (N, *shape)
        assert G.shape[0] == zones.shape[0], f"{k}: {G.shape[0]} per-sample rows but {zones.shape[0]} zones"
        z = zones.to(G.device)
        dep = G[z <= MID].sum(0)  # (*shape,)
        quar = G[z >= MID].sum(0)  # (*shape,)
        out[k] = (dep.float(), quar.float())
    return out


# ----------------------------------------------------------------------------------------------------
# Measurement (never used for training): zone sizes, alignment, the grader's hack rate per zone


def zone_stats(a: Tensor, zones: Tensor, is_hack: Tensor) -> dict[str, float]:
    """Log columns for the scored rollouts: sizes, mean a per zone, strict-hack rate per zone, precision
    (hacks among routed), recall (routed among hacks) and the AUC of a for hack vs not.
    NaN where undefined."""
    a, zones, h = a.double().cpu(), zones.cpu(), is_hack.bool().cpu()
    nan = float("nan")
    out: dict[str, float] = {}
    for code, name in enumerate(ZONES):
        m = zones == code
        n = int(m.sum())
        out[f"gate_n_{name}"] = n
        out[f"gate_a_{name}"] = float(a[m].mean()) if n else nan
        out[f"gate_hack_{name}"] = float(h[m].double().mean()) if n else nan
    routed = zones == ROUTE
    n_hack = int(h.sum())
    out["gate_n_hack"] = n_hack
    out["gate_precision"] = float((h & routed).sum() / routed.sum()) if routed.any() else nan
    out["gate_recall"] = float((h & routed).sum() / n_hack) if n_hack else nan
    out["gate_auc"] = auc(a, h)
    return out


def auc(score: Tensor, label: Tensor) -> float:
    """P(score of a random positive > that of a random negative), ties count 1/2; NaN without both classes."""
    s, y = score.double().cpu(), label.bool().cpu()
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).double()  # (P, N)
    eq = (pos[:, None] == neg[None, :]).double()  # (P, N)
    return float((gt + 0.5 * eq).mean())


# ----------------------------------------------------------------------------------------------------
# Shrinkage control (train time): the removed mass of erase, without its direction


def shrink_one(g: Tensor, v: Tensor) -> tuple[Tensor, float]:
    """g * |erase(g)| / |g| in float64 over the flattened tensor (erase = antipasto.project_one: if g.v > 0
    remove (g.v) v). Returns (g_out with g's shape, factor)."""
    assert g.numel() == v.numel(), f"grad has {g.numel()} entries, direction {v.numel()}"
    g64 = g.double()
    gn = float(g64.norm())
    if gn == 0.0:
        return g64.clone(), 1.0
    _, _, st = antipasto.project_one(g64.reshape(-1), v.double().to(g.device).reshape(-1), "erase")
    rem = st["removed_norm"]
    c = math.sqrt(max(gn * gn - rem * rem, 0.0)) / gn  # |g - (g.v) v| = sqrt(|g|^2 - (g.v)^2) when g.v > 0
    return g64 * c, c


# ----------------------------------------------------------------------------------------------------
# Advantage Modification (Wu & Tang 2026)


def am_layer(n_layers: int, frac: float) -> int:
    """Index into hidden_states (0 = embeddings, n_layers = last) at fractional depth frac: round(frac * L),
    clipped to [1, n_layers]. The hidden state there is the output of decoder layer index (result - 1)."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"am_layer_frac={frac}: need 0 < frac <= 1 (~0.6-0.75 is typical)")
    return min(n_layers, max(1, round(frac * n_layers)))


@jaxtyped(typechecker=beartype)
def group_zscore(s: Float[Tensor, "P G"], valid: Bool[Tensor, "P G"]) -> Float[Tensor, "P G"]:
    """(s - group mean) / group std over the valid members (population std); 0 for invalid members and for
    groups with zero spread or < 2 valid members."""
    v = valid.to(s.dtype)  # (P, G)
    n = v.sum(1, keepdim=True)  # (P, 1)
    mean = (s * v).sum(1, keepdim=True) / n.clamp(min=1)  # (P, 1)
    var = (((s - mean) * v) ** 2).sum(1, keepdim=True) / n.clamp(min=1)  # (P, 1)
    std = var.sqrt()  # (P, 1)
    ok = (n >= 2) & (std > 1e-12 * mean.abs().clamp(min=1.0))  # (P, 1)
    z = torch.where(ok, (s - mean) / std.clamp(min=1e-30), torch.zeros_like(s))  # (P, G)
    return z * v


@jaxtyped(typechecker=beartype)
def am_transform(r: Float[Tensor, "P G"], z: Float[Tensor, "P G"], alpha: float) -> Float[Tensor, "P G"]:
    """r' = r * (1 - alpha * sigmoid(z) * [z > 0])  (the multiplicative AM variant)."""
    return r * (1.0 - alpha * torch.sigmoid(z) * (z > 0).to(r.dtype))


def am_direction(hack: Tensor, clean: Tensor) -> Tensor:
    """Unit mean(hack - clean) of per-pair mean hidden states (n, H) -> (H,) float32."""
    assert hack.shape == clean.shape and hack.dim() == 2, (
        f"need (n, H) twice, got {tuple(hack.shape)} {tuple(clean.shape)}")
    d = (hack.double() - clean.double()).mean(0)  # (H,)
    n = float(d.norm())
    assert n > 0 and math.isfinite(n), f"AM direction has norm {n}: hack and clean activations identical?"
    return (d / n).float()
