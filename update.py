"""Surgery on the applied update: the step AdamW takes, edited per module by the arm.

Sign convention (docs/adapter.md): v = unit v_hack per module, the gradient of NLL(hack) - NLL(clean) with
respect to the deployed tensor; an applied update u moves toward the hack when u.v < 0 (it lowers NLL(hack)
relative to NLL(clean)).

One torch AdamW holds one state (m, v) per deployed tensor, fed the full clipped gradient. `apply_step` lets
AdamW take its step, reads the step u it applied (weight decay included) from the parameter change,
then rewrites it:

    none      u (vanilla, measure, oracle-penalty, am)
    erase     u - [u.w < 0] (u.w) w                       w = the arm's direction (v_hack or a random placebo)
    route     deployed gets erase(u), the quarantine gets exactly the removed part (their sum is u)
    shrink    u * |erase_v(u)| / |u|: erase's applied norm with vanilla's direction (v = v_hack)
    matched   erase along w = -(rho/|u|) u_hat + sqrt(1 - rho^2/|u|^2) z_perp, rho = |[u.v < 0] (u.v)| and
              z_perp the part of a random unit z orthogonal to u: the removed part has erase_v's norm and
              its share along u, so the deployed step is as long as erase's (the mass-matched placebo;
              route-matched routes that part)
    copy      the quarantine gets u too (vanilla-2x: capacity without routing)
    gate      per-rollout routing: the gradient is split into a deployed part g_d and a routed part g_q
              (g_d + g_q = g); the routed part steps by its own first moment m_q = m - m_d over one second
              moment of the parts' mass, s = EMA of (|g_d| + |g_q|)^2:
              u_q = -lr m_q_hat / (sqrt(s_hat) + eps), and the deployed tensor gets u_d = u - u_q
              (route's rule: the parts sum to the vanilla step exactly). A 1 % share gives ~1 % of the
              step (where the shares agree in sign, s is AdamW's second moment); u_q moves at most ~lr per
              coordinate (Adam's bound) even where kept and routed rollouts cancel. (Dividing by AdamW's
              second moment of the total g instead, a cancelling coordinate divides large first moments by
              a tiny root: the parts stepped up to ~25 x the vanilla step on tiny-random.)

Shared basis (svd, lora: the quarantine scales the deployed tensor's frozen frame): the quarantine is not in
the optimizer; it is the ledger of what was routed. Own basis (block: the quarantine has its own frozen
frame), the quarantine is in the optimizer (no weight decay) with its own gradient and state; route scales the
step AdamW would give it to the norm that route removed from the deployed step, and the gate keeps a
quarantine first moment of its share; either way its movement follows the routed share, not lr per coordinate
(docs/adapter.md). Weight decay acts on the deployed tensor only (it is part of u, so erase can remove a decay
component along v); the quarantine never decays.

    python -m pytest tests/test_update.py -q
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EDITS = ("none", "erase", "route", "shrink", "matched", "route-matched", "copy", "gate")
PART_KEY = "exp_avg_dep_part"  # optimizer.state[deployed tensor][PART_KEY]: the gate's deployed first moment
QPART_KEY = "exp_avg_quar_part"  # own-basis quarantine: its first moment of the quarantine share
MASS_KEY = "exp_avg_sq_mass"  # the gate's second moment of |a tensor's share| + |the rest of its gradient|


def build_optimizer(adapters: dict, lr: float, betas: tuple[float, float], weight_decay: float,
                    quarantine_in_optimizer: bool) -> torch.optim.AdamW:
    """AdamW over the deployed tensors (weight decay) and, for an own-basis quarantine, the quarantine tensors
    (no weight decay)."""
    groups = [{"params": [a.dep for a in adapters.values()], "weight_decay": weight_decay}]
    if quarantine_in_optimizer:
        groups.append({"params": [a.quar for a in adapters.values()], "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _unit(w: Tensor) -> Tensor:
    w = w.double().reshape(-1)
    return w / w.norm()


def _erase_part(u: Tensor, w: Tensor) -> Tensor:
    """[u.w < 0] (u.w) w: the component erase removes (float64, flat)."""
    d = float(u @ w)
    return d * w if d < 0 else torch.zeros_like(u)


def edit_step(u: Tensor, edit: str, w: Tensor | None, v: Tensor | None,
              z: Tensor | None) -> tuple[Tensor, Tensor]:
    """One module's edit of the flat float64 applied step u: returns (deployed step, removed part) with
    deployed + removed == u. w: the arm's unit direction, v: unit v_hack,
    z: unit random direction (matched)."""
    if edit in ("none", "copy", "gate"):
        return u, torch.zeros_like(u)
    if edit in ("erase", "route"):
        rem = _erase_part(u, w)
        return u - rem, rem
    if edit == "shrink":
        n = float(u.norm())
        kept = float((u - _erase_part(u, v)).norm())
        out = u * (kept / n) if n > 0 else u
        return out, u - out
    if edit in ("matched", "route-matched"):  # erase's geometry along the random z instead of v
        rho = float(_erase_part(u, v).norm())
        n = float(u.norm())
        if rho == 0.0 or n == 0.0:
            return u, torch.zeros_like(u)
        uh = u / n
        zp = z.double().reshape(-1) - float(z.double().reshape(-1) @ uh) * uh  # z's part orthogonal to u
        zp = zp / zp.norm()
        s = rho / n  # (<= 1) cosine of u with the direction erase removes along
        w = -s * uh + math.sqrt(max(0.0, 1.0 - s * s)) * zp  # unit, u.w = -rho: erase along w
        rem = -rho * w  # (u.w) w; |rem| = rho, |u - rem|^2 = |u|^2 - rho^2, exactly as erase along v
        return u - rem, rem
    raise ValueError(f"unknown step edit {edit!r}; one of {EDITS}")


def _part_moments(st: dict, key: str, g_part: Tensor, g_total: Tensor, b1: float, b2: float) -> None:
    """The gate's moments of one tensor's share g_part of its clipped gradient g_total: st[key] = EMA of
    g_part, st[MASS_KEY] = EMA of (|g_part| + |g_total - g_part|)^2 (AdamW's own second moment where share
    and rest agreed in sign, larger where they cancel). A state from before MASS_KEY existed (a resumed
    checkpoint) starts it from AdamW's second moment, not from 0 (which would blow the first steps up)."""
    m = st.get(key, torch.zeros_like(g_total))
    st[key] = m.mul_(b1).add_(g_part, alpha=1 - b1)
    mass = g_part.abs() + (g_total - g_part).abs()
    if MASS_KEY not in st:
        st[MASS_KEY] = (st["exp_avg_sq"].clone() if float(st["step"]) > 1 else torch.zeros_like(g_total))
    st[MASS_KEY].mul_(b2).addcmul_(mass, mass, value=1 - b2)


@torch.no_grad()
def apply_step(optimizer: torch.optim.AdamW, adapters: dict, edit: str, directions: dict | None,
               vhack: dict | None, randoms: dict | None, own_basis: bool,
               parts: dict[str, tuple[Tensor, Tensor]] | None = None, clip_factor: float = 1.0) -> dict:
    """optimizer.step() on the deployed (and own-basis quarantine) .grad already set and clipped,
    then the edit.

    parts (gate only): module -> (deployed share g_d, quarantine share g_q) of the unclipped gradient, scaled
    here by clip_factor; shared basis: g_d + g_q is the deployed .grad; own basis: g_d is a share of the
    deployed .grad and g_q of the quarantine's. Returns the step statistics: removed_norm_frac, frac_fired,
    step_cos and step_toward (of the deployed change the parameters made, after rounding), quar_step_frac and
    erase_norm_frac (the share erase with v_hack would remove from this vanilla step, for every arm)."""
    assert edit in EDITS, f"unknown step edit {edit!r}"
    dep_old = {k: a.dep.detach().clone() for k, a in adapters.items()}
    quar_old = {k: a.quar.detach().clone() for k, a in adapters.items()}
    group = optimizer.param_groups[0]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    optimizer.step()
    if parts is not None:
        # the parts' moments (after the step: AdamW initialises its state on the first one)
        for k, a in adapters.items():
            g_d, g_q = parts[k][0].to(a.dep) * clip_factor, parts[k][1].to(a.quar) * clip_factor
            _part_moments(optimizer.state[a.dep], PART_KEY, g_d, a.dep.grad, b1, b2)
            if own_basis:
                _part_moments(optimizer.state[a.quar], QPART_KEY, g_q, a.quar.grad, b1, b2)
    sq_u = sq_rem = sq_q = sq_er = 0.0
    fired = toward = 0
    cos = []
    for k, a in adapters.items():
        # the vanilla step AdamW applied (exact)
        u = (a.dep.detach().double() - dep_old[k].double()).reshape(-1)  # (n,)
        quar_step = None
        if edit == "gate":
            # the routed rest of the deployed gradient (g - g_d) steps by its own first moment (AdamW's m
            # minus the deployed share's) over the mass second moment; the deployed tensor keeps the rest of u
            st = optimizer.state[a.dep]
            t = float(st["step"])
            denom = (st[MASS_KEY].double().sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            m_rest = st["exp_avg"].double() - st[PART_KEY].double()
            rem = (-lr / (1 - b1**t) * m_rest / denom).reshape(-1)  # (n,) what the gate takes from u
            u_dep = u - rem
            if own_basis:  # the quarantine: its own share's first moment over its own mass second moment
                sq = optimizer.state[a.quar]
                tq = float(sq["step"])
                dq = (sq[MASS_KEY].double().sqrt() / math.sqrt(1 - b2**tq)).add_(eps)
                quar_step = -lr / (1 - b1**tq) * sq[QPART_KEY].double() / dq
            else:
                quar_step = rem.reshape(a.quar.shape)
        else:
            w = _unit(directions[k]) if directions is not None and k in directions else None
            v = _unit(vhack[k]) if vhack is not None else None
            z = _unit(randoms[k]) if randoms is not None else None
            u_dep, rem = edit_step(u, edit, w, v, z)
            if edit in ("route", "route-matched"):
                if own_basis:  # the quarantine's own AdamW step, scaled to the routed norm
                    uq = a.quar.detach().double() - quar_old[k].double()
                    n = float(uq.norm())
                    quar_step = uq * (float(rem.norm()) / n) if n > 0 else torch.zeros_like(uq)
                else:
                    quar_step = rem.reshape(a.quar.shape)
            elif edit == "copy":
                quar_step = (a.quar.detach().double() - quar_old[k].double() if own_basis
                             else u.reshape(a.quar.shape))
        tol = 0.0  # the vanilla step is already in place, bit for bit: its change is exact
        applied = u
        if u_dep is not u:  # an edited step, rounded to the parameters' dtype
            a.dep.copy_((dep_old[k].double() + u_dep.reshape(a.dep.shape)).to(a.dep.dtype))
            applied = (a.dep.detach().double() - dep_old[k].double()).reshape(-1)  # (n,)
            # |rounding error . v| <= |rounding error| <= eps/2 |p_new| (float32: 2^-24), at any lr
            tol = torch.finfo(a.dep.dtype).eps / 2 * float(a.dep.detach().double().norm())
        if quar_step is not None:
            a.quar.copy_((quar_old[k].double() + quar_step).to(a.quar.dtype))
        else:  # what the optimizer itself moved (--surgery-on grad trains the quarantine with AdamW)
            quar_step = a.quar.detach().double() - quar_old[k].double()
        sq_q += float(quar_step.double().pow(2).sum())
        sq_u += float(u @ u)
        sq_rem += float(rem @ rem)
        if edit == "gate":  # fired: something was routed this step
            fired += float(parts[k][1].abs().max()) > 0
        else:
            fired += float(rem.abs().max()) > 0 if rem.numel() else 0
        if vhack is not None:
            vv = _unit(vhack[k])
            sq_er += float(_erase_part(u, vv).pow(2).sum())  # what erase with v_hack would remove from u
            d, n = float(applied @ vv), float(applied.norm())  # of the change the parameters made
            cos.append(d / n if n > 0 else 0.0)
            toward += d < -tol  # beyond the rounding of the parameters
    M = len(adapters)
    nan = float("nan")
    return {"removed_norm_frac": math.sqrt(sq_rem / sq_u) if sq_u > 0 else 0.0, "frac_fired": fired / M,
            "step_cos": sum(cos) / M if cos else nan, "step_toward": toward / M if cos else nan,
            "quar_step_frac": math.sqrt(sq_q / sq_u) if sq_u > 0 else 0.0,
            "erase_norm_frac": (math.sqrt(sq_er / sq_u) if sq_u > 0 else 0.0) if vhack is not None else nan}


@torch.no_grad()
def norms(adapters: dict) -> dict:
    """|delta_S| and |delta_S_hack| (Frobenius norms of their weight updates over all modules) and the mean
    over modules of the shrinkage factor c = max(0, 1 - |dW_quar| / |dW_full|) that antipasto.shrinkage
    deploys."""
    dep = quar = 0.0
    cs = []
    for a in adapters.values():
        nd, nq, nf = a.update_norms()
        dep, quar = dep + nd * nd, quar + nq * nq
        cs.append(max(0.0, 1.0 - nq / nf) if nf > 0 else 1.0)
    return {"dep": math.sqrt(dep), "quar": math.sqrt(quar), "shrinkage_c": sum(cs) / len(cs)}
