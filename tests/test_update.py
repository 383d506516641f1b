"""update.apply_step (surgery on the applied AdamW step) under the full preset's AdamW settings, 60 steps of
synthetic gradients with and without a planted hack component, against hand-written references.

The figures the gradient-space surgery gave on the same set-up (the founding design, `--surgery-on grad`),
which these tests would fail on: a routed share of ~1-2 % of the gradient moved the quarantine ~lr per
coordinate (|delta_S_hack| 1.9 vs |delta_S| 1.1 after 200 steps; 2.8 at a 4.8 % share), and the train-time
shrinkage arm rescaled g by c >= 0.98, which Adam undoes (its parameters differed from vanilla's by
0.000-0.002 of the update). test_gradient_space_route_moves_the_quarantine_lr_per_coordinate reproduces the
first of these here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch import Tensor

import antipasto
import grpo
import update

LR, BETAS, WD, STEPS, R, M = 2e-3, (0.9, 0.99), 0.1, 60, 32, 4  # the full preset's AdamW settings


class FakeAdapter(nn.Module):
    """What apply_step touches: a deployed and a quarantine tensor (shared basis: same shape)."""

    kind = "svd"

    def __init__(self, r: int):
        super().__init__()
        self.delta_S = nn.Parameter(torch.zeros(r))
        self.delta_S_hack = nn.Parameter(torch.zeros(r))

    @property
    def dep(self):
        return self.delta_S

    @property
    def quar(self):
        return self.delta_S_hack


def make(n_mod: int = M, r: int = R, seed: int = 0):
    torch.manual_seed(seed)
    ads = {f"m{i}": FakeAdapter(r) for i in range(n_mod)}
    # unit, per module
    v = {k: antipasto.random_directions({k: a}, seed=seed + 100)[k] for k, a in ads.items()}
    return ads, v


def grads(ads, v, t: int, hack: float, rng: torch.Generator) -> dict:
    """Noise plus a planted component along -v (a step along -g moves toward... +v: the gradient of the
    loss points along +v when lowering the loss means raising the hack's likelihood, i.e. u.v < 0)."""
    out = {}
    for k, a in ads.items():
        g = torch.randn(a.dep.shape, generator=rng) * 0.01 + 0.002  # a consistent drift too
        out[k] = g + hack * 0.01 * v[k]
    return out


def run(edit: str, hack: float, seed: int = 0, parts_share: float | None = None, record=None):
    ads, v = make(seed=seed)
    randoms = antipasto.random_directions(ads, seed=seed + 7)
    opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=False)
    rng = torch.Generator().manual_seed(seed + 1)
    for t in range(STEPS):
        g = grads(ads, v, t, hack, rng)
        for k, a in ads.items():
            a.dep.grad = g[k].clone()
        parts = None
        if parts_share is not None:  # gate: a fixed share of the gradient routed
            parts = {k: ((1 - parts_share) * g[k], parts_share * g[k]) for k in ads}
        before = {k: (a.dep.detach().clone(), a.quar.detach().clone()) for k, a in ads.items()}
        st = update.apply_step(opt, ads, edit, v, v, randoms, False, parts)
        if record is not None:
            record.append(({k: (a.dep.detach() - before[k][0], a.quar.detach() - before[k][1])
                            for k, a in ads.items()},
                           st, g, {k: b[0] for k, b in before.items()}))
    return ads, v


def adam_reference(rec) -> list[dict]:
    """The vanilla AdamW step of every recorded step, by hand from the gradient history and the arm's own
    deployed parameters: u = -lr wd p - lr m_hat / (sqrt(v_hat) + eps) (float64)."""
    m = s = None
    out = []
    for t, (_, _, g, p_old) in enumerate(rec, 1):
        m = {k: (BETAS[0] * m[k] if m else 0) + (1 - BETAS[0]) * g[k].double() for k in g}
        s = {k: (BETAS[1] * s[k] if s else 0) + (1 - BETAS[1]) * g[k].double() ** 2 for k in g}
        b1, b2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
        out.append({k: -LR * WD * p_old[k].double() - LR * (m[k] / b1) / ((s[k] / b2).sqrt() + 1e-8)
                    for k in g})
    return out


def close(a, b, rel=1e-5):
    """Equal up to float32 rounding of parameters that are then differenced."""
    return float((a.double() - b.double()).norm()) <= rel * float(b.double().norm()) + 1e-9


def vanilla_steps(hack: float, seed: int = 0):
    """Reference: torch AdamW alone on the same gradients; the list of per-module steps."""
    ads, v = make(seed=seed)
    opt = torch.optim.AdamW([a.dep for a in ads.values()], lr=LR, betas=BETAS, weight_decay=WD)
    rng = torch.Generator().manual_seed(seed + 1)
    out = []
    for t in range(STEPS):
        g = grads(ads, v, t, hack, rng)
        before = {k: a.dep.detach().clone() for k, a in ads.items()}
        for k, a in ads.items():
            a.dep.grad = g[k].clone()
        opt.step()
        out.append({k: a.dep.detach() - before[k] for k, a in ads.items()})
    return out


@pytest.mark.parametrize("hack", [0.0, 3.0])
def test_erase_never_applies_a_step_toward_the_hack(hack):
    rec: list = []
    _, v = run("erase", hack, record=rec)
    worst = min(float(u @ v[k]) / float(u.norm()) for steps, *_ in rec for k, (u, _) in steps.items())
    assert worst > -1e-5, f"an applied deployed step has cos(u, v) = {worst} < 0 (toward the hack)"
    assert any(st["frac_fired"] > 0 for _, st, *_ in rec), "erase never fired: the test would be vacuous"


@pytest.mark.parametrize("hack", [0.0, 3.0])
def test_route_splits_the_vanilla_step_exactly(hack):
    rec: list = []
    _, v = run("route", hack, record=rec)
    ref = adam_reference(rec)
    fired = 0
    for t, (steps, *_) in enumerate(rec):
        for k, (ud, uq) in steps.items():
            assert close(ud + uq, ref[t][k]), f"step {t} {k}: u_dep + u_quar != the vanilla step"
            if float(uq.norm()) > 0:  # the quarantine's step is parallel to v, and toward the hack
                fired += 1
                assert (abs(abs(float(uq.double() @ v[k].double())) - float(uq.norm()))
                        < 1e-5 * float(uq.norm()))
                assert float(uq @ v[k]) < 0
    assert fired > 0


def test_gate_quarantine_follows_the_routed_share_not_lr_per_coordinate():
    """A 1 % routed share moves the quarantine <= 2 % of the total movement (gradient-space routing: ~lr per
    coordinate, the same order as the deployed movement; see the next test)."""
    rec: list = []
    ads, _ = run("gate", 3.0, parts_share=0.01, record=rec)
    ref = adam_reference(rec)
    total = sum(torch.stack([ref[t][k] for t in range(STEPS)]).sum(0).norm() ** 2 for k in ads) ** 0.5
    quar = sum(a.quar.detach().double().norm() ** 2 for a in ads.values()) ** 0.5
    assert quar <= 0.02 * total, f"|quarantine movement| {float(quar):.4g} > 2% of |total| {float(total):.4g}"
    assert quar > 0.002 * total, "nothing was routed: the test would be vacuous"
    for t, (steps, *_) in enumerate(rec):  # and the parts add up to the vanilla step
        for k, (ud, uq) in steps.items():
            assert close(ud + uq, ref[t][k])


def test_gradient_space_route_moves_the_quarantine_lr_per_coordinate():
    """The failure the update-space rule fixes, reproduced: route on the gradient with AdamW on both tensors
    moves the quarantine ~lr per coordinate even when only a small share is routed."""
    ads, v = make()
    for a in ads.values():
        a.quar.requires_grad_(True)
    opt = torch.optim.AdamW([p for a in ads.values() for p in (a.dep, a.quar)], lr=LR, betas=BETAS,
                            weight_decay=WD)
    rng = torch.Generator().manual_seed(1)
    shares = []
    for t in range(STEPS):
        g = grads(ads, v, t, 0.0, rng)
        for k, a in ads.items():
            a.dep.grad, a.quar.grad = g[k].clone(), g[k].clone()
        st = antipasto.surgery(ads, v, "route")
        shares.append(st["removed_norm_frac"])
        opt.step()
    quar = float(sum(a.quar.detach().norm() ** 2 for a in ads.values()) ** 0.5)
    dep = float(sum(a.dep.detach().norm() ** 2 for a in ads.values()) ** 0.5)
    assert sum(shares) / len(shares) < 0.5 and quar > 0.1 * dep, (quar, dep, sum(shares) / len(shares))


@pytest.mark.parametrize("hack", [0.0, 3.0])
def test_shrinkage_has_erases_norm_and_vanillas_direction(hack):
    """Every step: |applied| == |erase(u)| (hand-written erase of the hand-computed vanilla step u) and the
    direction is u's; over the run it differs from vanilla by erase's removed share (it shrinks something)."""
    rec: list = []
    _, v = run("shrink", hack, record=rec)
    ref = adam_reference(rec)
    shrunk = 0.0
    for t, (steps, *_) in enumerate(rec):
        for k, (us, _) in steps.items():
            u = ref[t][k]
            erased = u - min(float(u @ v[k].double()), 0.0) * v[k].double()
            assert abs(float(us.norm()) - float(erased.norm())) <= 1e-5 * float(u.norm()) + 1e-9
            assert float(us.double() @ u) / (float(us.norm()) * float(u.norm())) > 1 - 1e-6
            shrunk = max(shrunk, 1 - float(erased.norm()) / float(u.norm()))
    assert shrunk > 0.01, "erase never removed anything here: the test would be vacuous"


@pytest.mark.parametrize("hack", [0.0, 3.0])
def test_matched_placebo_removes_erases_norm_every_step(hack):
    """Every step the matched placebo removes, along its random direction, the norm erase with v_hack would
    remove from that same step (erase_norm_frac), and it fires exactly when erase would."""
    rec: list = []
    _, v = run("matched", hack, record=rec)
    fired = 0
    for (steps, st, *_), u in zip(rec, adam_reference(rec)):
        assert abs(st["removed_norm_frac"] - st["erase_norm_frac"]) < 1e-9, st
        fired += st["erase_norm_frac"] > 0
        # by hand from the vanilla step u: erase removes (u.v) v where u.v < 0, so rho_k = max(0, -u_k.v_k);
        # the placebo's change differs from u by exactly that norm over all modules
        rho2 = sum(max(0.0, -float(u[k] @ v[k].double())) ** 2 for k in u)
        removed2 = sum(float((u[k] - steps[k][0].double()).pow(2).sum()) for k in u)
        un = math.sqrt(sum(float(u[k].pow(2).sum()) for k in u))
        assert abs(math.sqrt(removed2) - math.sqrt(rho2)) <= 1e-4 * un + 1e-9, (removed2, rho2)
        assert abs(st["erase_norm_frac"] - math.sqrt(rho2) / un) < 1e-4
    assert fired > 0, "erase would never have fired: the test would be vacuous"


def test_matched_edit_is_erase_along_a_random_direction():
    torch.manual_seed(3)
    for _ in range(200):
        u, v, z = torch.randn(16).double(), torch.randn(16).double(), torch.randn(16).double()
        v, z = v / v.norm(), z / z.norm()
        _, rem_e = update.edit_step(u, "erase", v, v, z)
        dep, rem_m = update.edit_step(u, "matched", v, v, z)
        assert abs(float(rem_m.norm()) - float(rem_e.norm())) < 1e-12
        assert torch.allclose(dep + rem_m, u)
        rho, n = float(rem_e.norm()), float(u.norm())
        # erase's geometry, by hand: |deployed|^2 = |u|^2 - rho^2 (erase: the same), the removed part's share
        # along u is rho^2/|u|, its orthogonal rest (norm rho * sqrt(1 - rho^2/|u|^2)) lies along -z's part
        # orthogonal to u, and it fires exactly when erase does
        assert abs(float(dep.norm()) ** 2 - (n * n - rho * rho)) < 1e-9
        assert abs(float(dep.norm()) - float((u - rem_e).norm())) < 1e-9
        assert float(dep.norm()) <= n + 1e-12, "the placebo never steps further than vanilla"
        assert abs(float(rem_m @ u) / n - rho * rho / n) < 1e-9
        zp = z - float(z @ u) / n**2 * u
        zp = zp / zp.norm()
        orth = rem_m - float(rem_m @ u) / n**2 * u
        assert abs(float(orth @ zp) + rho * (1 - (rho / n) ** 2) ** 0.5) < 1e-9
        assert (float(rem_m.norm()) > 0) == (float(u @ v) < 0)
        expected_e = min(float(u @ v), 0.0) * v  # hand-written: erase removes only a toward-hack component
        assert torch.allclose(rem_e, expected_e)


def test_vanilla_edit_none_is_torch_adamw_bit_for_bit():
    ref = vanilla_steps(3.0)
    rec: list = []
    run("none", 3.0, record=rec)
    for t in range(STEPS):
        for k in ref[t]:
            assert torch.equal(rec[t][0][k][0], ref[t][k]), f"step {t} {k} differs from torch AdamW"


def test_block_route_quarantine_follows_the_routed_share():
    """Own basis (block): the quarantine takes its own AdamW step scaled to the norm route removed, so with a
    small routed share it stays small (not lr per coordinate); no applied deployed step toward the hack."""
    ads, v = make()
    for a in ads.values():
        a.quar.requires_grad_(True)
    opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=True)
    rng = torch.Generator().manual_seed(1)
    removed, moved = [], []
    for t in range(STEPS):
        g = grads(ads, v, t, 0.0, rng)
        before = {k: (a.dep.detach().clone(), a.quar.detach().clone()) for k, a in ads.items()}
        for k, a in ads.items():
            a.dep.grad = g[k].clone()
            a.quar.grad = torch.randn(R, generator=rng) * 0.01  # its own frame's gradient
        st = update.apply_step(opt, ads, "route", v, v, None, True)
        for k, a in ads.items():
            ud = a.dep.detach() - before[k][0]
            uq = a.quar.detach() - before[k][1]
            assert float(ud @ v[k]) > -1e-5 * float(ud.norm())
            moved.append(float(uq.norm()))
        removed.append(st["removed_norm_frac"])
    dep = float(sum(a.dep.detach().norm() ** 2 for a in ads.values()) ** 0.5)
    quar = float(sum(a.quar.detach().norm() ** 2 for a in ads.values()) ** 0.5)
    assert quar < 0.6 * dep, (quar, dep)
    assert math.isfinite(sum(moved))


# ---- the real block (own basis) and lora (shared basis, matrix-shaped A) adapters, hand-computed AdamW
# references

def make_real(kind: str, n_mod: int = 3, d: int = 12, r: int = 4, seed: int = 0):
    """Real antipasto adapters around random nn.Linear(d, d): block (own frame, quarantine in the optimizer)
    or lora (A (r, d) shared frame); v_hack a unit random direction in the deployed tensor's shape."""
    torch.manual_seed(seed)
    cls = {"block": antipasto.BlockAdapter, "lora": antipasto.LoRAAdapter}[kind]
    ads = {f"m{i}": cls(nn.Linear(d, d), rank=r, name=f"m{i}") for i in range(n_mod)}
    for a in ads.values():
        a.quar.requires_grad_(kind == "block")
    v = {k: antipasto.random_directions({k: a}, seed=seed + 100)[k] for k, a in ads.items()}
    return ads, v


def adam_by_hand(gs: list[Tensor], ps: list[Tensor], wd: float) -> list[Tensor]:
    """AdamW's step at each t from the gradient history gs and the parameters ps before it (float64, flat)."""
    m = s = 0.0
    out = []
    for t, (g, p) in enumerate(zip(gs, ps), 1):
        g = g.double().reshape(-1)
        m, s = BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * s + (1 - BETAS[1]) * g * g
        m_hat, s_hat = m / (1 - BETAS[0] ** t), s / (1 - BETAS[1] ** t)
        out.append(-LR * wd * p.double().reshape(-1) - LR * m_hat / (s_hat.sqrt() + 1e-8))
    return out


def run_real(kind: str, edit: str, hack: float, share: float | None = None):
    """STEPS steps of apply_step on real adapters; returns per module the lists of (applied deployed step,
    applied quarantine step, deployed grad, quarantine grad, deployed params before), and v."""
    ads, v = make_real(kind)
    own = kind == "block"
    opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=own)
    rng = torch.Generator().manual_seed(1)
    rec: dict[str, list] = {k: [] for k in ads}
    for t in range(STEPS):
        g = grads(ads, v, t, hack, rng)
        # its own frame
        gq = {k: torch.randn(a.quar.shape, generator=rng) * 0.01 + 0.001 for k, a in ads.items()}
        before = {k: (a.dep.detach().clone(), a.quar.detach().clone()) for k, a in ads.items()}
        for k, a in ads.items():
            a.dep.grad = g[k].clone()
            if own:
                a.quar.grad = gq[k].clone()
        parts = None
        if share is not None:  # own basis: g_q is a share of the quarantine's own gradient; shared: of g
            parts = {k: ((1 - share) * g[k], share * (gq[k] if own else g[k])) for k in ads}
        update.apply_step(opt, ads, edit, v, v, None, own, parts)
        for k, a in ads.items():
            rec[k].append(((a.dep.detach() - before[k][0]).double().reshape(-1),
                           (a.quar.detach() - before[k][1]).double().reshape(-1), g[k], gq[k], before[k][0]))
    return rec, {k: x.double().reshape(-1) for k, x in v.items()}


@pytest.mark.parametrize("kind", ["block", "lora"])
@pytest.mark.parametrize("hack", [0.0, 3.0])
def test_real_adapters_erase_and_route_never_step_toward_the_hack(kind, hack):
    for edit in ("erase", "route"):
        rec, v = run_real(kind, edit, hack)
        fired = 0
        for k, steps in rec.items():
            for ud, *_ in steps:
                assert float(ud @ v[k]) > -1e-5 * float(ud.norm()), (
                    f"{kind} {edit} {k}: a deployed step toward the hack")
            ref = adam_by_hand([s[2] for s in steps], [s[4] for s in steps], WD)
            fired += sum(float(u @ v[k]) < 0 for u in ref)
        assert fired > 0, "the vanilla step never pointed toward the hack: the test would be vacuous"


@pytest.mark.parametrize("hack", [0.0, 3.0])
def test_block_route_quarantine_step_is_the_removed_norm_along_its_own_adam_step(hack):
    """Own basis, every step and module: |u_quar| = |[u.v < 0] (u.v)| of the hand-computed vanilla deployed
    step u, along the quarantine's own hand-computed AdamW step (no weight decay); the deployed step is
    erase(u)."""
    rec, v = run_real("block", "route", hack)
    fired = 0
    for k, steps in rec.items():
        u_ref = adam_by_hand([s[2] for s in steps], [s[4] for s in steps], WD)
        q_ref = adam_by_hand([s[3] for s in steps], [torch.zeros(1)] * len(steps), 0.0)
        for t, (ud, uq, *_) in enumerate(steps):
            u = u_ref[t]
            rem = min(float(u @ v[k]), 0.0) * v[k]
            assert close(ud, u - rem), f"step {t} {k}: deployed step is not erase(u)"
            assert abs(float(uq.norm()) - float(rem.norm())) <= 1e-5 * float(u.norm()) + 1e-9, (t, k)
            if float(rem.norm()) > 0:
                fired += 1
                cos = float(uq @ q_ref[t]) / (float(uq.norm()) * float(q_ref[t].norm()))
                assert cos > 1 - 1e-5, (
                    f"step {t} {k}: quarantine step not along its own AdamW step (cos {cos})")
    assert fired > 0


def test_block_gate_quarantine_follows_the_routed_share():
    """Own basis: a 1 % share of the quarantine's own gradient moves it 1 % of its own AdamW step (hand
    reference: first moment of the share over the second moment of the whole gradient); the deployed step is
    AdamW's from the deployed share's first moment, weight decay included. Gradient-space routing would move
    the quarantine ~lr per coordinate (its own AdamW step, 100 %)."""
    s = 0.01
    rec, _ = run_real("block", "gate", 3.0, share=s)
    for k, steps in rec.items():
        n = len(steps)
        q_full = adam_by_hand([st[3] for st in steps], [torch.zeros(1)] * n, 0.0)
        u_ref = adam_by_hand([st[2] for st in steps], [st[4] for st in steps], WD)
        m = 0.0
        for t, (ud, uq, g, _, p) in enumerate(steps, 1):
            assert close(uq, s * q_full[t - 1], rel=1e-4), (
                f"step {t} {k}: quarantine step != share x its AdamW step")
            m = BETAS[0] * m + (1 - BETAS[0]) * (1 - s) * g.double().reshape(-1)
            # -lr m_hat / (sqrt(v_hat) + eps) of g
            adam_part = u_ref[t - 1] + LR * WD * p.double().reshape(-1)
            want = -LR * WD * p.double().reshape(-1) + (1 - s) * adam_part  # m of (1 - s) g is (1 - s) m
            assert close(ud, want, rel=1e-4), f"step {t} {k}: deployed gate step"
        moved_q = sum(st[1] for st in steps).norm()
        full_q = sum(q_full).norm()
        assert 0.005 * full_q < moved_q <= 0.02 * full_q, (float(moved_q), float(full_q))


def test_lora_gate_and_route_split_the_vanilla_step():
    """Shared basis, matrix-shaped A: route's parts sum to the hand-computed vanilla step with the
    quarantine's part along v; a 1 % gate share moves the quarantine <= 2 % of the total movement."""
    rec, v = run_real("lora", "route", 3.0)
    for k, steps in rec.items():
        u_ref = adam_by_hand([s[2] for s in steps], [s[4] for s in steps], WD)
        for t, (ud, uq, *_) in enumerate(steps):
            assert close(ud + uq, u_ref[t]), (t, k)
            if float(uq.norm()) > 0:
                assert abs(abs(float(uq @ v[k])) - float(uq.norm())) < 1e-5 * float(uq.norm())
    rec, _ = run_real("lora", "gate", 3.0, share=0.01)
    total = quar = 0.0
    for k, steps in rec.items():
        u_ref = adam_by_hand([s[2] for s in steps], [s[4] for s in steps], WD)
        for t, (ud, uq, *_) in enumerate(steps):
            assert close(ud + uq, u_ref[t]), (t, k)
        total += float(sum(u_ref).norm()) ** 2
        quar += float(sum(s[1] for s in steps).norm()) ** 2
    assert 0.002 * total**0.5 < quar**0.5 <= 0.02 * total**0.5, (quar**0.5, total**0.5)



# ---- the gate with non-parallel, per-step shares and clipping; erase under the cosine schedule's tail

@pytest.mark.parametrize("kind", ["svd", "block", "lora"])
@pytest.mark.parametrize("hack", [0.0, 3.0])
def test_gate_keeps_a_first_moment_per_share(kind, hack):
    """Each step the routed share of every coordinate is drawn afresh (so g_d and g_q are not parallel) and
    the gradient is clipped by c = 0.5. Hand reference: m_d = EMA of c g_d, v = EMA of (c g)^2 over the
    deployed tensor's whole gradient; u_dep = -lr wd p - lr m_d_hat / (sqrt(v_hat) + eps). Shared basis:
    u_quar is the rest of the vanilla step (m of c g instead of m_d); own basis: u_quar = -lr m_q_hat /
    (sqrt(v_q_hat) + eps) over the quarantine's own gradient. Scaling the vanilla step by the mean share would
    fail here."""
    c = 0.5
    ads, v = make(n_mod=3, r=12) if kind == "svd" else make_real(kind)
    own = kind == "block"
    opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=own)
    rng = torch.Generator().manual_seed(5)
    m_d, m_all, s_d, m_q, s_q = ({k: 0.0 for k in ads} for _ in range(5))
    moved_q = {k: 0.0 for k in ads}
    for t in range(1, STEPS + 1):
        g = grads(ads, v, t, hack, rng)
        parts, gq_full = {}, {}
        before = {k: (a.dep.detach().double().reshape(-1), a.quar.detach().double().reshape(-1))
                  for k, a in ads.items()}
        for k, a in ads.items():
            share = torch.rand(a.dep.shape, generator=rng) * 0.2  # (shape) routed share, fresh every step
            gq_full[k] = torch.randn(a.quar.shape, generator=rng) * 0.01 + 0.001 if own else g[k]
            qshare = torch.rand(a.quar.shape, generator=rng) * 0.2 if own else share
            parts[k] = ((1 - share) * g[k], qshare * gq_full[k])  # (g_d, g_q) of the unclipped gradient
            a.dep.grad = c * g[k].clone()  # what clip_grad_norm_ leaves
            if own:
                a.quar.grad = c * gq_full[k].clone()
        update.apply_step(opt, ads, "gate", v, v, None, own, parts, clip_factor=c)
        b1, b2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
        for k, a in ads.items():
            gd, gqs = (c * x.double().reshape(-1) for x in parts[k])
            gall = c * g[k].double().reshape(-1)
            m_d[k] = BETAS[0] * m_d[k] + (1 - BETAS[0]) * gd
            m_all[k] = BETAS[0] * m_all[k] + (1 - BETAS[0]) * gall
            s_d[k] = BETAS[1] * s_d[k] + (1 - BETAS[1]) * gall * gall
            p_old = before[k][0]
            den = (s_d[k] / b2).sqrt() + 1e-8
            u_dep = -LR * WD * p_old - LR * (m_d[k] / b1) / den
            ud = a.dep.detach().double().reshape(-1) - p_old
            uq = a.quar.detach().double().reshape(-1) - before[k][1]
            assert close(ud, u_dep, rel=1e-4), f"step {t} {k}: deployed gate step"
            if own:
                gqa = c * gq_full[k].double().reshape(-1)
                m_q[k] = BETAS[0] * m_q[k] + (1 - BETAS[0]) * gqs
                s_q[k] = BETAS[1] * s_q[k] + (1 - BETAS[1]) * gqa * gqa
                want_q = -LR * (m_q[k] / b1) / ((s_q[k] / b2).sqrt() + 1e-8)
            else:
                want_q = -LR * ((m_all[k] - m_d[k]) / b1) / den  # the vanilla step minus u_dep
            assert close(uq, want_q, rel=1e-4), f"step {t} {k}: quarantine gate step"
            moved_q[k] = moved_q[k] + uq
    assert all(float(x.norm()) > 0 for x in moved_q.values()), "nothing was routed: the test would be vacuous"


@pytest.mark.parametrize("kind", ["block", "lora"])
def test_real_adapters_route_moves_the_quarantine_by_the_routed_share(kind):
    """No planted hack: route removes only the share rho_t = |removed| / |u| of each step pointing toward v.
    The quarantine's path length over the run, relative to the one AdamW alone would give it (its own AdamW
    steps for block, the vanilla steps for lora; gradient-space routing: ~1, lr per coordinate), stays within
    2 x the mean routed share; lora's routed part is the toward-hack component (u_q . v < 0)."""
    rec, v = run_real(kind, "route", 0.0)
    shares, moved, full = [], 0.0, 0.0
    for k, steps in rec.items():
        n = len(steps)
        u_ref = adam_by_hand([s[2] for s in steps], [s[4] for s in steps], WD)
        q_ref = (adam_by_hand([s[3] for s in steps], [torch.zeros(1)] * n, 0.0) if kind == "block" else u_ref)
        shares += [abs(min(float(u @ v[k]), 0.0)) / float(u.norm()) for u in u_ref]
        moved += sum(float(s[1].norm()) for s in steps)  # path lengths: what each step moved
        full += sum(float(q.norm()) for q in q_ref)
        for _, uq, *_ in steps:
            if kind == "lora" and float(uq.norm()) > 0:
                assert float(uq @ v[k]) < 0, f"{k}: the routed part must be the toward-hack component"
    mean_share = sum(shares) / len(shares)
    ratio = moved / full
    assert 0 < mean_share < 0.5, mean_share
    assert 0 < ratio <= 2 * mean_share, (ratio, mean_share)


@pytest.mark.parametrize("edit", ["erase", "route", "matched"])
def test_no_step_toward_is_reported_in_the_cosine_schedule_tail(edit):
    """Under the full preset's cosine schedule the last steps move each coordinate a few ulps: the float32
    rounding of an erased step must not count as a step toward the hack (a fixed 1e-5 relative tolerance did:
    step_toward reached 1.0 in the tail), while vanilla's unedited steps still do count."""
    out = {}
    for e in (edit, "none"):
        ads, v = make(n_mod=4, r=64)
        opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, grpo.cosine_schedule(10, 200))
        rng = torch.Generator().manual_seed(1)
        z = antipasto.random_directions(ads, seed=7)
        tow = []
        for t in range(200):
            g = grads(ads, v, t, 3.0, rng)
            for k, a in ads.items():
                a.dep.grad = g[k].clone()
            tow.append(update.apply_step(opt, ads, e, v, v, z, False)["step_toward"])
            sched.step()
        out[e] = tow
    if edit != "matched":
        bad = [i for i, x in enumerate(out[edit]) if x]
        assert not bad, f"{edit}: step_toward > 0 at steps {bad}"
    assert max(out["none"]) > 0, "vanilla never stepped toward the hack: the test would be vacuous"


@pytest.mark.parametrize("kind", ["svd", "block", "lora"])
def test_gate_parts_that_cancel_stay_bounded_and_sum_to_the_vanilla_step(kind):
    """Kept and routed rollouts pulling a coordinate opposite ways: g_d = g + x, routed g - g_d = -x with
    |x| ~ 10 |g|, clipped by c = 0.5. Hand reference: u = AdamW's vanilla step (m, v of c g); s = EMA of
    (|c g_d| + |c (g - g_d)|)^2; the routed step q = -lr (m_hat - m_d_hat) / (sqrt(s_hat) + eps);
    u_dep = u - q.
    Shared basis: u_quar = q, so u_dep + u_quar = u; own basis: the quarantine's own share over its own mass
    rule. The routed step moves at most ~lr per coordinate (the gradients here are stationary), the deployed
    one at most ~2 lr. The old rule (AdamW's second moment of the total g) fails the bounds."""
    c = 0.5
    ads, v = make(n_mod=3, r=12) if kind == "svd" else make_real(kind)
    own = kind == "block"
    opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=own)
    rng = torch.Generator().manual_seed(9)
    m_a, v_a, m_d, s_d, m_q, s_q = ({k: 0.0 for k in ads} for _ in range(6))
    for t in range(1, STEPS + 1):
        g = grads(ads, v, t, 3.0, rng)
        parts, gq = {}, {}
        before = {k: (a.dep.detach().double().reshape(-1), a.quar.detach().double().reshape(-1))
                  for k, a in ads.items()}
        for k, a in ads.items():
            x = torch.randn(a.dep.shape, generator=rng) * 0.1  # (shape) ~10 x the gradient's scale
            if own:
                gq[k] = torch.randn(a.quar.shape, generator=rng) * 0.01
                y = torch.randn(a.quar.shape, generator=rng) * 0.1
                parts[k] = (g[k] + x, gq[k] + y)  # the rests: -x of the deployed, -y of the quarantine's
                a.quar.grad = c * gq[k].clone()
            else:
                parts[k] = (g[k] + x, -x)
            a.dep.grad = c * g[k].clone()
        update.apply_step(opt, ads, "gate", v, v, None, own, parts, clip_factor=c)
        b1, b2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
        for k, a in ads.items():
            ga = c * g[k].double().reshape(-1)
            gd = c * parts[k][0].double().reshape(-1)
            m_a[k] = BETAS[0] * m_a[k] + (1 - BETAS[0]) * ga
            v_a[k] = BETAS[1] * v_a[k] + (1 - BETAS[1]) * ga * ga
            m_d[k] = BETAS[0] * m_d[k] + (1 - BETAS[0]) * gd
            s_d[k] = BETAS[1] * s_d[k] + (1 - BETAS[1]) * (gd.abs() + (ga - gd).abs()) ** 2
            p_old = before[k][0]
            u = -LR * WD * p_old - LR * (m_a[k] / b1) / ((v_a[k] / b2).sqrt() + 1e-8)
            q = -LR * ((m_a[k] - m_d[k]) / b1) / ((s_d[k] / b2).sqrt() + 1e-8)
            ud = a.dep.detach().double().reshape(-1) - p_old
            uq = a.quar.detach().double().reshape(-1) - before[k][1]
            assert close(ud, u - q, rel=1e-4), (t, k)
            assert float(q.abs().max()) <= LR * (1 + 1e-4), (t, k)
            assert float((ud + LR * WD * p_old).abs().max()) <= 2 * LR * (1 + 1e-4), (t, k)
            if own:
                gqa = c * gq[k].double().reshape(-1)
                gqs = c * parts[k][1].double().reshape(-1)
                m_q[k] = BETAS[0] * m_q[k] + (1 - BETAS[0]) * gqs
                s_q[k] = BETAS[1] * s_q[k] + (1 - BETAS[1]) * (gqs.abs() + (gqa - gqs).abs()) ** 2
                want_q = -LR * (m_q[k] / b1) / ((s_q[k] / b2).sqrt() + 1e-8)
                assert float(uq.abs().max()) <= LR * (1 + 1e-4), (t, k)
            else:
                want_q = q
                assert close(ud + uq, u, rel=1e-4), (t, k)
            assert close(uq, want_q, rel=1e-4), (t, k)


def test_gate_with_an_opposite_one_percent_share():
    """g_d = 1.01 g, routed -0.01 g (a rollout pulling against the rest): by hand s = (1.02)^2 v, the routed
    step is -0.01/1.02 of vanilla's Adam part and the deployed tensor keeps 1 + 0.01/1.02 of it."""
    ads, v = make(n_mod=2, r=16)
    opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=False)
    rng = torch.Generator().manual_seed(3)
    ref = torch.optim.AdamW([nn.Parameter(torch.zeros(16)) for _ in ads], lr=LR, betas=BETAS, weight_decay=WD)
    for t in range(STEPS):
        g = grads(ads, v, t, 0.0, rng)
        before = {k: a.dep.detach().double().clone() for k, a in ads.items()}
        q_before = {k: a.quar.detach().double().clone() for k, a in ads.items()}
        for (k, a), p in zip(ads.items(), ref.param_groups[0]["params"]):
            a.dep.grad = g[k].clone()
            with torch.no_grad():
                p.copy_(a.dep.detach())
            p.grad = g[k].clone()
        ref.step()  # the vanilla step from the same state and parameters
        update.apply_step(opt, ads, "gate", v, v, None, False, {k: (1.01 * g[k], -0.01 * g[k]) for k in ads})
        for (k, a), p in zip(ads.items(), ref.param_groups[0]["params"]):
            u = p.detach().double() - before[k]
            adam = u + LR * WD * before[k]  # the Adam part of the vanilla step
            ud = a.dep.detach().double() - before[k]
            uq = a.quar.detach().double() - q_before[k]
            assert close(ud + LR * WD * before[k], (1 + 0.01 / 1.02) * adam, rel=1e-4), (t, k)
            assert close(uq, -0.01 / 1.02 * adam, rel=1e-3), (t, k)


def test_gate_resumed_from_a_state_without_the_mass_moment_stays_bounded():
    """A checkpoint from before the mass second moment existed: its first gate step starts s from AdamW's
    second moment (a zero s at a late step would divide by ~sqrt(1 - b2^t) |g| and step ~10 x lr)."""
    ads, v = make(n_mod=2, r=16)
    opt = update.build_optimizer(ads, LR, BETAS, WD, quarantine_in_optimizer=False)
    rng = torch.Generator().manual_seed(4)
    for t in range(30):
        g = grads(ads, v, t, 0.0, rng)
        for k, a in ads.items():
            a.dep.grad = g[k].clone()
        if t == 20:  # the resumed checkpoint lacks the key
            for a in ads.values():
                del opt.state[a.dep][update.MASS_KEY]
        before = {k: a.quar.detach().double().clone() for k, a in ads.items()}
        update.apply_step(opt, ads, "gate", v, v, None, False, {k: (0.5 * g[k], 0.5 * g[k]) for k in ads})
        for k, a in ads.items():
            assert float((a.quar.detach().double() - before[k]).abs().max()) <= 0.6 * LR, (t, k)
