"""The gate on cached pools vs the grader's labels (measurement only): each problem's rows (all pools
together) form one Dr.GRPO group, cached rewards -> advantages -> grpo.policy_gradient with per-sample capture
-> a_i -> zones for each q, exactly as the gate-route arm would score them at the current adapter (delta = 0);
reports precision / recall / AUC against the strict-hack labels.

    python scripts/gate_probe.py --model tiny-random --vhack out/vhack/smoke-tiny-random.safetensors \
        --pools out/pools/synthetic-tiny-random
    python scripts/gate_probe.py --model smollm2-135m --vhack out/vhack/smollm2-135m_mean.safetensors \
        --pools out/pools/smollm2-135m-teacher-prefix-hack out/pools/smollm2-135m-teacher-prefix-clean \
        out/pools/smollm2-135m-base-8     # `just gate-probe-smollm`
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import antipasto  # noqa: E402
import cli  # noqa: E402
import gate  # noqa: E402
import grpo  # noqa: E402
import models  # noqa: E402


def pools_temperature(pools: list[str]) -> float:
    """The sampling temperature the pools' meta.json files record (probe_distill.py writes it; 1.0 where none
    does, e.g. synthetic pools); pools sampled at different temperatures are refused."""
    metas = [Path(p) / "meta.json" for p in pools]
    temps = {float(json.loads(m.read_text()).get("temperature", 1.0)) if m.is_file() else 1.0 for m in metas}
    if len(temps) > 1:
        raise cli.UserError(f"--pools were sampled at temperatures {sorted(temps)}; a group is scored at one "
                            "temperature: pass --temperature or pools of one temperature")
    return temps.pop()


def measure(
    model_name: str,
    vhack: str,
    pools: list[str],
    qs=(0.125, 0.25),
    micro_batch: int = 4,
    l_max: int = 0,
    threads: int = 2,
    max_rows: int = 0,
    out: str = "",
    temperature: float = -1.0,
) -> dict:
    """Gate precision / recall / AUC on cached pool rows (see the module docstring).
    Returns the summary dict."""
    torch.set_num_threads(threads)
    t0 = time.time()
    models.check_available(model_name)
    cli.check_vhack_file(vhack, "--vhack", models.model_id(model_name), None, models.weights_hash(model_name))
    for p in pools:
        cli.check_pool_dir(p, "--pools")
    temperature = pools_temperature(pools) if temperature < 0 else temperature
    model, tok = models.load_model(model_name)
    model.requires_grad_(False)
    ads = antipasto.wrap_model(model)
    dirs = antipasto.load_directions(vhack, model, models.model_id(model_name))
    rows = []
    for p in pools:
        for pid, rs in sorted(grpo.load_pool(p).items()):
            rows += [dict(r, pool=Path(p).name) for r in rs]
    if max_rows:
        rows = rows[:max_rows]
    by_pid: dict[int, list[dict]] = {}
    for r in rows:
        by_pid.setdefault(int(r["problem_id"]), []).append(r)
    rollouts = []
    for pid, rs in sorted(by_pid.items()):
        group = [
            grpo.Rollout(
                pid,
                list(r["prompt_ids"]),
                list(r["completion_ids"]),
                r["completion"],
                r["pool"],
                bool(r.get("truncated")),
                grade=r["grade"],
                reward=float(r["reward"]),
            )
            for r in rs
        ]
        grpo.set_advantages(group, *grpo.group_matrices(group, 1))
        rollouts += group
    active = [r for r in rollouts if r.advantage != 0.0]
    assert active, "no rollout has a nonzero advantage: every problem's rows have equal rewards"
    L = l_max or max(len(r.completion_ids) for r in rollouts)
    lcfg = grpo.LossConfig(micro_batch=micro_batch, l_max=L, beta_kl=0.0, temperature=temperature)
    per: dict = {}
    model.zero_grad(set_to_none=True)
    grpo.policy_gradient(
        model, active, len(rollouts), lcfg, tok.pad_token_id, next(model.parameters()).device, per_sample=per
    )
    G = {k: torch.cat(v) for k, v in per["dep"].items()}  # (n, r)
    hack = torch.tensor([bool(r.grade.get("is_reward_hack_strict")) for r in active])  # (n,)
    adv = torch.tensor([r.advantage for r in active])  # (n,)
    res = {
        "model": model_name,
        "vhack": vhack,
        "pools": pools,
        "n_rows": len(rollouts),
        "n_scored": len(active),
        "n_hack_scored": int(hack.sum()),
        "n_hack_all": sum(bool(r.grade.get("is_reward_hack_strict")) for r in rollouts),
        "n_hack_pos_adv": int(sum(h and r.advantage > 0 for h, r in zip(hack.tolist(), active))),
        "by_pool": {
            p: {
                "n": sum(r.source == p for r in active),
                "hack": sum(r.source == p and bool(r.grade.get("is_reward_hack_strict")) for r in active),
            }
            for p in sorted({r.source for r in active})
        },
        "gate": {},
    }
    keys = (
        "gate_n_route",
        "gate_n_mid",
        "gate_precision",
        "gate_recall",
        "gate_hack_route",
        "gate_hack_mid",
        "gate_hack_keep",
    )
    pos = adv > 0  # (n,)
    sgn = torch.sign(adv).double()  # (n,) cos(grad NLL_i, v) = sign(A_i) * cos(g_i, v) for both aggregations
    src = [r.source for r in active]
    for agg in gate.AGGS:
        a = gate.alignment(G, dirs, agg)  # (n,)
        g = res["gate"][agg] = {
            "auc": gate.auc(a, hack),
            "mean_a_hack": float(a[hack].mean()) if hack.any() else float("nan"),
            "mean_a_other": float(a[~hack].mean()) if (~hack).any() else float("nan"),
            "auc_pos_adv": gate.auc(a[pos], hack[pos]),  # hacks vs other rewarded rollouts only
            "auc_nll_score": gate.auc(sgn * a, hack),
        }  # scoring grad NLL instead of the loss gradient
        # gate_scope="positive" (train.py's default): only A > 0 is scored; recall is over the hacks
        # with A > 0
        g["positive"] = {"n": int(pos.sum()), "n_hack": int(hack[pos].sum()), "auc": g["auc_pos_adv"]}
        # top level: gate_scope="nonzero" (every rollout with A != 0 scored); "positive": A > 0 only
        for q in qs:
            for dst, m in ((g, torch.ones_like(pos)), (g["positive"], pos)):
                st = gate.zone_stats(a[m], gate.assign_zones(a[m], q), hack[m])
                dst[f"q={q}"] = {k: st[k] for k in keys}
        # mean alignment per pool, and the per-row scores for any other cut (ids and numbers only)
        g["mean_a_by_pool"] = {
            p: float(a[torch.tensor([x == p for x in src])].mean()) for p in sorted(set(src))
        }
        g["rows"] = [
            {
                "problem_id": r.problem_id,
                "pool": r.source,
                "hack": bool(h),
                "advantage": r.advantage,
                "a": float(v),
            }
            for r, h, v in zip(active, hack.tolist(), a.tolist())
        ]
    res["seconds"] = round(time.time() - t0, 1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    print(
        json.dumps(
            {k: v for k, v in res.items() if k != "gate"}
            | {"gate": {agg: {k: v for k, v in g.items() if k != "rows"} for agg, g in res["gate"].items()}},
            indent=1,
        )
    )
    return res


@dataclass
class GateProbeConfig:
    """Gate precision / recall vs the grader's labels on cached pools."""

    vhack: str
    """out/vhack/<name>.safetensors for this model"""
    pools: tuple[str, ...]
    """pool dirs (out/pools/<name>); rows of one problem form one group"""
    model: str = "tiny-random"
    """model name (models.load_model)"""
    q: tuple[float, ...] = (0.125, 0.25)
    """gate quantiles to report"""
    micro_batch: int = 4
    """sequences per forward/backward"""
    l_max: int = 0
    """Dr.GRPO normaliser (0 = longest completion; cosines do not depend on it)"""
    threads: int = 2
    """torch CPU threads"""
    max_rows: int = 0
    """use only the first N rows (0 = all)"""
    out: str = ""
    """also write the summary JSON here"""
    temperature: float = -1.0
    """score rows under softmax(logits / T) as the arm would (-1 = the pools' recorded temperature)"""


if __name__ == "__main__":
    c = tyro.cli(GateProbeConfig)
    cli.run(lambda: measure(c.model, c.vhack, list(c.pools), c.q, c.micro_batch, c.l_max, c.threads,
                            c.max_rows, c.out, c.temperature))
