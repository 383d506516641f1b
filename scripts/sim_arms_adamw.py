"""Arms under AdamW on synthetic gradients: gradient-space surgery (--surgery-on grad) vs surgery on the
applied step (update.py, the default), one table of figures for the journal.

    OMP_NUM_THREADS=1 python scripts/sim_arms_adamw.py    # 200 steps, full preset's AdamW settings
    OMP_NUM_THREADS=1 python scripts/sim_arms_adamw.py --steps 60 --hack 0 3

Per (hack strength, mode): |delta_S|, |delta_S_hack| after `steps` steps of route; the mean routed share of
the gradient or step; shrinkage's distance from vanilla as a fraction of vanilla's movement (and erase's); the
fraction of erase steps whose applied deployed step moved toward the hack (u.v < 0, any module); the matched
placebo's removed norm vs erase's, and erase-random's.
Gradients: per module N(0, 0.01^2) noise + 0.002 drift + hack x 0.01 v.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import antipasto  # noqa: E402
import update  # noqa: E402


@dataclass
class SimConfig:
    """Arms under AdamW on synthetic gradients."""

    steps: int = 200
    """optimizer steps"""
    hack: tuple[float, ...] = (0.0, 1.0, 3.0)
    """planted hack strengths (0 = no hack signal)"""
    lr: float = 2e-3
    """AdamW learning rate (the full preset's)"""
    modules: int = 8
    """modules"""
    rank: int = 64
    """entries per module"""
    seed: int = 0
    """seed"""


class Ad(nn.Module):
    kind = "svd"

    def __init__(self, r):
        super().__init__()
        self.delta_S, self.delta_S_hack = nn.Parameter(torch.zeros(r)), nn.Parameter(torch.zeros(r))

    dep = property(lambda self: self.delta_S)
    quar = property(lambda self: self.delta_S_hack)


def norm(ads, attr):
    return float(sum(getattr(a, attr).detach().double().norm() ** 2 for a in ads.values()) ** 0.5)


def simulate(cfg: SimConfig, hack: float, arm: str, mode: str) -> dict:
    ads = {f"m{i}": Ad(cfg.rank) for i in range(cfg.modules)}
    v = antipasto.random_directions(ads, seed=cfg.seed + 100)
    rnd = antipasto.random_directions(ads, seed=cfg.seed + 7)
    w = rnd if arm.endswith("-random") else v
    if mode == "grad":
        quar = arm == "route"
        for a in ads.values():
            a.quar.requires_grad_(quar)
        opt = torch.optim.AdamW([p for a in ads.values() for p in ((a.dep, a.quar) if quar else (a.dep,))],
                                lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.1)
    else:
        opt = update.build_optimizer(ads, cfg.lr, (0.9, 0.99), 0.1, False)
    g_rng = torch.Generator().manual_seed(cfg.seed + 1)
    shares, toward, fired = [], 0, 0
    for _ in range(cfg.steps):
        before = {k: a.dep.detach().double().clone() for k, a in ads.items()}
        for k, a in ads.items():
            g = torch.randn(cfg.rank, generator=g_rng) * 0.01 + 0.002 + hack * 0.01 * v[k]
            a.dep.grad = g.clone()
            if mode == "grad" and a.quar.requires_grad:
                a.quar.grad = g.clone()
        if mode == "grad":
            surg = {"erase": "erase", "erase-random": "erase", "route": "route"}.get(arm, "measure")
            st = antipasto.surgery(ads, w, surg)
            if arm == "shrinkage":
                import gate

                for k, a in ads.items():
                    a.dep.grad = gate.shrink_one(a.dep.grad, v[k])[0].float()
            opt.step()
            shares.append(st["removed_norm_frac"])
            fired += st["frac_fired"] > 0
        else:
            edit = {"erase": "erase", "erase-random": "erase", "erase-matched": "matched", "route": "route",
                    "shrinkage": "shrink"}.get(arm, "none")
            st = update.apply_step(opt, ads, edit, w, v, rnd, False)
            shares.append(st["removed_norm_frac"])
            fired += st["frac_fired"] > 0
        steps = {k: a.dep.detach().double() - before[k] for k, a in ads.items()}
        # not rounding
        toward += any(float(u @ v[k].double()) < -1e-6 * float(u.norm()) for k, u in steps.items())
    return {"dep": norm(ads, "delta_S"), "quar": norm(ads, "delta_S_hack"),
            "share": sum(shares) / len(shares), "fired": fired / cfg.steps, "toward": toward / cfg.steps,
            "params": torch.cat([a.dep.detach().double() for a in ads.values()])}


def main(cfg: SimConfig) -> None:
    print(f"{cfg.steps} steps, lr {cfg.lr}, betas (0.9, 0.99), wd 0.1, {cfg.modules} modules x {cfg.rank}")
    print("| hack | mode | route: |dS| | route: |dS_hack| | routed share | shrinkage vs vanilla | erase vs "
          "vanilla | erase steps toward hack | erase fires / removes | erase-random fires / removes | "
          "matched fires / removes |")
    print("|" + " --- |" * 11)
    for hack in cfg.hack:
        for mode in ("grad", "step"):
            r = {a: simulate(cfg, hack, a, mode)
                 for a in ("vanilla", "route", "erase", "shrinkage", "erase-random")}
            if mode == "step":
                r["erase-matched"] = simulate(cfg, hack, "erase-matched", mode)
            van = r["vanilla"]["params"]
            mv = float(van.norm())
            d_sh = float((r["shrinkage"]["params"] - van).norm()) / mv
            d_er = float((r["erase"]["params"] - van).norm()) / mv
            m = r.get("erase-matched")
            matched = f"{m['fired']:.2f} / {m['share']:.3f}" if m else "n/a (step only)"
            print(f"| {hack} | {mode} | {r['route']['dep']:.3f} | {r['route']['quar']:.3f} | "
                  f"{r['route']['share']:.3f} | {d_sh:.3f} | {d_er:.3f} | {r['erase']['toward']:.2f} | "
                  f"{r['erase']['fired']:.2f} / {r['erase']['share']:.3f} | {r['erase-random']['fired']:.2f} "
                  f"/ {r['erase-random']['share']:.3f} | {matched} |")


if __name__ == "__main__":
    main(tyro.cli(SimConfig))
