"""The arms: one `Arm` row per arm in `ARMS`, and the hooks of the arms that do more than surgery.

Every script, test and doc takes its arm list from `ARMS` (train.py's --arm choices, the sweep grids,
summarize's placebo pairs, smoke, docs/arms.md's table). Adding an arm: one `Arm(...)` row here (+ a hook
if it behaves differently), one row in docs/arms.md, one row in tests/test_arms.py's expectation table.

    python -c "import arms; print([a.name for a in arms.ARMS.values()])"
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

import antipasto
import gate
from cli import UserError
import grpo
import pairs
import update

Direction = Literal["none", "vhack", "random"]


@dataclass(frozen=True)
class Arm:
    """One intervention arm."""

    name: str
    doc: str
    """one line: what the arm does"""
    direction: Direction = "none"
    """what the surgery / gate compares with: none (v_hack only measured, when given), vhack (required), or
    a Haar-random direction per module (placebo)"""
    step_edit: str = "none"
    """update.EDITS: how the applied AdamW step is edited (the default, --surgery-on step)"""
    surgery: Literal["measure", "erase", "route", ""] = "measure"
    """--surgery-on grad (the founding design): antipasto.surgery mode on the summed gradient ("measure" =
    unedited, cosines only; "" = the arm has no gradient-space form)"""
    quarantine: bool = False
    """trains delta_S_hack (ablated at deploy; generation in deploy mode by default)"""
    per_sample: bool = False
    """needs per-rollout gradients (one capture per micro-batch; no activation checkpointing)"""
    grad_hook: str = ""
    """name in GRAD_HOOKS: rewrites the gradients after backward (gate routing, shrinkage)"""
    reward_hook: str = ""
    """name in REWARD_HOOKS: rewrites the rewards before the advantages (AM)"""
    oracle: bool = False
    """uses the grader's labels of live rollouts in the reward: a reference, never a method"""
    columns: str = ""
    """extra log column group (COLUMN_GROUPS key), NaN for other arms"""
    placebo_of: str = ""
    """the arm whose direction this random-direction placebo replaces (summarize compares the two)"""
    grid: Literal["", "core", "extra"] = ""
    """sweep grids: core = `grid`'s default, core + extra = queue-full; "" = by name only"""
    style: tuple[str, str] = ("", "-")
    """(matplotlib colour, linestyle) in every plot of summarize: method arms solid, controls dashed or
    dotted; colours at least 20 CIE76 units apart (tests/test_summarize.py); "" = a fallback by name"""


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("vanilla", "plain Dr.GRPO (cosines with v_hack measured when one is given)", grid="core",
        style=("#000000", "-")),
    Arm("measure", "vanilla + cosine logging against v_hack (requires --vhack-path)", direction="vhack",
        style=("#e377c2", ":")),
    Arm("erase", "remove the applied step's component toward the hack along v_hack (u.v < 0)",
        direction="vhack", step_edit="erase", surgery="erase", grid="core", style=("#1f77b4", "-")),
    Arm("route", "send that component to delta_S_hack instead; delta_S_hack is ablated at deploy",
        direction="vhack", step_edit="route", surgery="route", quarantine=True, grid="core",
        style=("#d62728", "-")),
    Arm("erase-random", "erase with a Haar-random direction per module, seeded by the run (placebo)",
        direction="random", step_edit="erase", surgery="erase", placebo_of="erase", grid="core",
        style=("#17becf", "--")),
    Arm("erase-matched",
        "remove the norm erase would remove, along a random direction (mass-matched placebo)",
        direction="vhack", step_edit="matched", surgery="", placebo_of="erase", grid="core",
        style=("#393b79", "--")),
    Arm("route-random", "route with a Haar-random direction per module, seeded by the run (placebo)",
        direction="random", step_edit="route", surgery="route", quarantine=True, placebo_of="route",
        grid="core", style=("#ff7f0e", "--")),
    Arm("route-matched",
        "route the norm route would route, along a random direction (mass-matched placebo)",
        direction="vhack", step_edit="route-matched", surgery="", quarantine=True, placebo_of="route",
        grid="extra", style=("#8c1c13", "--")),
    Arm("oracle-penalty", "REFERENCE ONLY: reward minus correctness_reward on the grader's strict hacks",
        oracle=True, grid="extra", style=("#2ca02c", "-.")),
    Arm("gate-route", "per-rollout gate: top q of cos(g_i, v_hack) -> quarantine only, next q -> both",
        direction="vhack", step_edit="gate", quarantine=True, per_sample=True, grad_hook="gate",
        columns="gate", grid="extra", style=("#9467bd", "-")),
    Arm("gate-route-random", "the same gate with a Haar-random direction per module (placebo)",
        direction="random", step_edit="gate", quarantine=True, per_sample=True, grad_hook="gate",
        columns="gate", placebo_of="gate-route", grid="extra", style=("#637939", "--")),
    Arm("gate-random", "non-directional gate: a seeded random q fraction routed (and q in mid)",
        step_edit="gate", quarantine=True, per_sample=True, grad_hook="gate-random", columns="gate",
        placebo_of="gate-route", grid="extra", style=("#e7ba52", ":")),
    Arm("vanilla-2x", "capacity control: delta_S and delta_S_hack both take the full step",
        step_edit="copy", quarantine=True, grid="extra", style=("#7f7f7f", "--")),
    Arm("shrinkage", "magnitude control: the step shrunk to erase's applied norm, vanilla's direction",
        direction="vhack", step_edit="shrink", grad_hook="shrink", grid="extra", style=("#8c564b", "-.")),
    Arm("am", "Advantage Modification baseline: reward scaled down by an activation probe",
        reward_hook="am", columns="am", grid="extra", style=("#bcbd22", "-")),
)}
ALIASES = {"projected": "erase"}
NAMES = tuple(ARMS) + tuple(ALIASES)  # what --arm accepts


def placebos(name: str) -> tuple[str, ...]:
    """The placebo arms of an arm, in table order."""
    return tuple(a.name for a in ARMS.values() if a.placebo_of == name)


def get(name: str) -> Arm:
    """The Arm for a name or alias; a one-line error naming the known arms otherwise."""
    name = ALIASES.get(name, name)
    if name not in ARMS:
        raise UserError(f"arm={name!r} is not an arm; choose one of {', '.join(NAMES)}")
    return ARMS[name]


def grid(*kinds: str) -> tuple[str, ...]:
    """Arm names whose `grid` is one of kinds, in table order."""
    return tuple(a.name for a in ARMS.values() if a.grid in kinds)


# ----------------------------------------------------------------------------------------------------
# Arm-specific log columns and where they must be finite

COLUMN_GROUPS = {
    # gate arms: zone sizes, mean a per zone, and for measurement only the grader's strict-hack rate per zone,
    # the gate's precision / recall / AUC against those labels (docs/gating.md)
    "gate": (
        "gate_n_keep",
        "gate_n_mid",
        "gate_n_route",
        "gate_a_keep",
        "gate_a_mid",
        "gate_a_route",
        "gate_hack_keep",
        "gate_hack_mid",
        "gate_hack_route",
        "gate_n_hack",
        "gate_precision",
        "gate_recall",
        "gate_auc",
    ),
    # am: fraction of rollouts penalised (z > 0) and that set's precision / recall vs strict hacks
    "am": ("am_frac_pen", "am_precision", "am_recall"),
}


def _gate_defined(c: str, row: dict[str, float]) -> bool:
    if c.startswith(("gate_a_", "gate_hack_")):
        return row[f"gate_n_{c.rsplit('_', 1)[1]}"] > 0
    if c == "gate_precision":
        return row["gate_n_route"] > 0
    if c == "gate_recall":
        return row["gate_n_hack"] > 0
    if c == "gate_auc":
        return 0 < row["gate_n_hack"] < row["gate_n_keep"] + row["gate_n_mid"] + row["gate_n_route"]
    return True


def _am_defined(c: str, row: dict[str, float]) -> bool:
    if c == "am_precision":
        return row["am_frac_pen"] > 0
    if c == "am_recall":
        return row["hack_strict"] > 0
    return True


DEFINED = {"gate": _gate_defined, "am": _am_defined}


def expected_finite(arm: str, row: dict[str, float]) -> dict[str, bool]:
    """For each arm-specific column: must it be finite (True) or NaN (False) in this logged row?

    A group's columns are finite only for arms that log that group, and there only when defined: a zone's
    mean / hack rate when the zone is non-empty, precision when something was routed, recall when a scored
    rollout was a strict hack, AUC when scored rollouts include both classes; AM's precision when something
    was penalised, its recall when a rollout hacked. Every other column must always be finite
    (scripts/smoke.py)."""
    group = get(arm).columns
    return {c: bool(g == group and DEFINED[g](c, row)) for g, cols in COLUMN_GROUPS.items() for c in cols}


# ----------------------------------------------------------------------------------------------------
# Hooks: gate routing, train-time shrinkage (gradients); Advantage Modification (rewards)


def deployed_norm_stats(g_in: dict[str, Tensor], g_out: dict[str, Tensor]) -> dict[str, float]:
    """frac_fired = fraction of modules whose deployed grad changed; removed_norm_frac =
    |g_in - g_out| / |g_in|."""
    sq_in = sum(float(g.double().pow(2).sum()) for g in g_in.values())
    sq_rem = sum(float((g_in[k].double() - g_out[k].double()).pow(2).sum()) for k in g_in)
    fired = [float((g_in[k].double() - g_out[k].double()).abs().max()) > 0 for k in g_in]
    return {
        "frac_fired": sum(fired) / len(fired),
        "removed_norm_frac": math.sqrt(sq_rem / sq_in) if sq_in > 0 else 0.0,
    }


def _gate_zones(cfg, adapters: dict, directions: dict | None, per_sample: dict[str, dict[str, list[Tensor]]],
                rollouts: list[grpo.Rollout], seed: int, random_scores: bool):
    """Score and zone the rollouts (see gate_step); returns (G, Gq, zones (N,), g_in, gate log columns)."""
    G = {k: torch.cat(v) for k, v in per_sample["dep"].items()}  # (N, *shape) per module
    Gq = {k: torch.cat(v) for k, v in per_sample["quar"].items()}  # (N, *shape) per module
    missing = [k for k in adapters if k not in G or k not in Gq]
    assert not missing, f"per-sample capture missed {len(missing)} modules (first {missing[0]!r})"
    g_in = {}
    for k, a in adapters.items():
        antipasto.check_per_sample_sum(f"{k} (deployed)", G[k], a.dep.grad, a.S.dtype)
        antipasto.check_per_sample_sum(f"{k} (quarantine)", Gq[k], a.quar.grad, a.S.dtype)
        g_in[k] = G[k].sum(0).float()
        # the float32 sums replace autograd's .grad (bf16-rounded in a bf16 model), so AdamW's moments and the
        # gate's per-rollout shares are built from the same gradient
        a.dep.grad = g_in[k].to(a.dep.dtype)
        if a.quar.grad is not None:
            a.quar.grad = Gq[k].sum(0).float().to(a.quar.dtype)
    adv = torch.tensor([r.advantage for r in rollouts])  # (N,)
    active = ((adv > 0) if cfg.gate_scope == "positive" else (adv != 0)).nonzero().squeeze(1)  # (n,)
    if random_scores:
        score = gate.random_scores(len(active), seed)  # (n,)
    else:
        assert directions is not None, f"{cfg.arm} needs directions"
        score = gate.alignment({k: g[active.to(g.device)] for k, g in G.items()}, directions,
                               cfg.gate_agg)  # (n,)
    if cfg.gate_mode == "quantile":
        z_act = gate.assign_zones(score.cpu(), cfg.gate_q)  # (n,)
    else:
        z_act = gate.assign_zones_threshold(score.cpu(), cfg.gate_tau_mid, cfg.gate_tau_route)  # (n,)
    zones = gate.full_zones(len(rollouts), active, z_act)  # (N,)
    is_hack = torch.tensor([bool(rollouts[i].grade.get("is_reward_hack_strict")) for i in active.tolist()],
                           dtype=torch.bool)  # (n,) measurement only
    row = gate.zone_stats(score, z_act, is_hack)
    for r in rollouts:
        r.extra.update(gate_score=float("nan"), gate_zone=-1)
    for i, sc, z in zip(active.tolist(), score.tolist(), z_act.tolist()):
        rollouts[i].extra.update(gate_score=sc, gate_zone=z)
    return G, Gq, zones, g_in, row


def gate_step(cfg, adapters: dict, directions: dict | None, per_sample: dict[str, dict[str, list[Tensor]]],
              rollouts: list[grpo.Rollout], surg: dict, seed: int,
              random_scores: bool = False) -> tuple[dict, dict]:
    """Gradient-space gate (--surgery-on grad): route each rollout's gradient by its zone; overwrite the
    deployed / quarantine .grad in place.

    Scored rollouts are those with A > 0 (cfg.gate_scope="positive", default) or A != 0 ("nonzero"); the
    others stay in keep (zero-advantage ones carry only the KL gradient; penalised ones teach the deployed
    block to move away from their content, which is never worth quarantining). Scores: cos(g_i, direction) of
    the deployed tensor's per-rollout loss gradient, or seeded uniforms when random_scores (gate-random).
    deployed grad = sum over keep + mid, quarantine grad = sum over mid + route of the quarantine's own
    per-rollout grads (identical to the deployed ones for a shared basis). Returns the surgery-style stats
    (cos_in of the summed gradient, cos_out of the deployed one) and the gate log columns; each rollout's
    extra gets gate_score / gate_zone (zone -1: not scored)."""
    G, Gq, zones, g_in, row = _gate_zones(cfg, adapters, directions, per_sample, rollouts, seed,
                                          random_scores)
    dep_split, quar_split = gate.split_grads(G, zones), gate.split_grads(Gq, zones)
    for k, a in adapters.items():
        a.dep.grad = dep_split[k][0].to(a.dep.dtype)  # keep + mid
        a.quar.grad = quar_split[k][1].to(a.quar.dtype)  # mid + route
    out = {k: surg[k] for k in ("cos_in",) if k in surg}
    if directions is not None:
        out["cos_out"] = antipasto.surgery(adapters, directions, "measure")["cos_in"]  # of the deployed grad
    out.update(deployed_norm_stats(g_in, {k: a.dep.grad for k, a in adapters.items()}))
    return out, row


def gate_parts(cfg, adapters: dict, directions: dict | None, per_sample: dict[str, dict[str, list[Tensor]]],
               rollouts: list[grpo.Rollout], seed: int, random_scores: bool = False) -> tuple[dict, dict]:
    """Update-space gate (update.apply_step's "gate" edit): zones as in gate_step, then each module's gradient
    shares g_d = keep + mid / 2 and g_q = route + mid / 2 of the per-rollout gradients (the deployed tensor's
    for g_d; the quarantine's own for g_q: identical for a shared basis), so g_d + g_q is the summed gradient
    and the deployed and quarantine steps add up to the vanilla step. Returns ({module: (g_d, g_q)}, gate log
    columns)."""
    G, Gq, zones, _, row = _gate_zones(cfg, adapters, directions, per_sample, rollouts, seed,
                                       random_scores)
    w_dep = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)[zones.cpu()]  # (N,) keep 1, mid 1/2, route 0
    parts = {}
    for k in adapters:
        g, gq = G[k].double(), Gq[k].double()  # (N, *shape) x2
        parts[k] = (torch.einsum("n,n...->...", w_dep.to(g.device), g),
                    torch.einsum("n,n...->...", (1.0 - w_dep).to(gq.device), gq))
    return parts, row


def shrink_step(
    cfg, adapters: dict, directions: dict | None, per_sample, rollouts, surg: dict, seed: int
) -> tuple[dict, dict]:
    """The shrinkage arm: per module g <- g * |erase(g)| / |g| (gate.shrink_one); the direction is
    untouched."""
    g_in = {}
    for k, a in adapters.items():
        g_in[k] = (a.dep.grad if a.dep.grad is not None else torch.zeros_like(a.dep)).detach().float().clone()
        g_out, _ = gate.shrink_one(g_in[k], directions[k])
        a.dep.grad = g_out.to(a.dep.dtype)
    out = {k: surg[k] for k in ("cos_in",) if k in surg}
    out["cos_out"] = surg.get("cos_in", float("nan"))  # a positive rescale leaves every cosine unchanged
    out.update(deployed_norm_stats(g_in, {k: a.dep.grad for k, a in adapters.items()}))
    return out, {}


@torch.no_grad()
def mean_hidden(model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, layer: int) -> Tensor:
    """Mean over the positions where mask == 1 of hidden_states[layer] (a forward hook on decoder layer
    layer - 1, so only that one activation is kept); (B, H) float32. A row with an empty mask gets zeros."""
    layers = model.get_decoder().layers
    assert 1 <= layer <= len(layers), f"layer {layer} outside 1..{len(layers)}"
    got: list[Tensor] = []

    def hook(_mod, _inp, out):
        got.append((out[0] if isinstance(out, tuple) else out).detach())

    h = layers[layer - 1].register_forward_hook(hook)
    try:
        model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        h.remove()
    assert len(got) == 1, f"decoder layer {layer - 1} ran {len(got)} times in one forward"
    hid = got[0].float()  # (B, T, H)
    m = mask.float().to(hid.device)[..., None]  # (B, T, 1)
    return (hid * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)


def pair_activation_direction(model, tokenizer, pair_list, layer: int, batch: int = 4) -> Tensor:
    """AM's activation direction from the hand-written pairs: mean over completion tokens of
    hidden_states[layer] for each side (chat-templated exactly like v_hack's pairs.encode_side), unit
    mean(hack - clean). (H,)"""
    assert pair_list, "pair_activation_direction: no pairs"
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sides = {}
    for side in ("hack", "clean"):
        enc = [pairs.encode_side(tokenizer, p, side) for p in pair_list]
        outs = []
        for s in range(0, len(enc), batch):
            chunk = enc[s : s + batch]
            ids, att, cm = grpo.pad_right(
                [seq for seq, _ in chunk], [n for _, n in chunk], pad, "cpu"
            )  # (b, T) x3
            outs.append(mean_hidden(model, ids.to(device), att.to(device), cm, layer).cpu())
        sides[side] = torch.cat(outs)  # (n, H)
    return gate.am_direction(sides["hack"], sides["clean"])


@torch.no_grad()
def am_setup(model, tokenizer, cfg) -> tuple[Tensor, int]:
    """AM's activation direction at the base model from the hand-written pairs (cfg.am_pairs) at
    hidden_states[gate.am_layer(n_layers, cfg.am_layer_frac)]; returns (unit direction (H,), layer)."""
    layer = gate.am_layer(len(model.get_decoder().layers), cfg.am_layer_frac)
    with antipasto.reference(model):
        d = pair_activation_direction(model, tokenizer, pairs.load_pairs(select=cfg.am_pairs), layer)
    return d, layer


@torch.no_grad()
def am_rewards(
    state: tuple[Tensor, int],
    cfg,
    model,
    rollouts: list[grpo.Rollout],
    rew: Tensor,
    valid: Tensor,
    pad_id: int,
    device,
) -> tuple[Tensor, dict]:
    """AM: s_i = <mean completion hidden state at hidden_states[layer], d>, z within the group, rewards scaled
    by gate.am_transform. Sets each rollout's reward (the training reward) and extra am_score / am_z /
    reward_raw. Returns the new (P, G) rewards and the AM log columns (precision / recall of z > 0 vs strict
    hacks)."""
    direction, layer = state
    scores = []
    for s in range(0, len(rollouts), cfg.micro_batch):
        ids, att, cm = grpo.pack(rollouts[s : s + cfg.micro_batch], pad_id, device)  # (b, T) x3
        h = mean_hidden(model, ids, att, cm, layer)  # (b, H)
        scores.append(h @ direction.to(h.device))  # (b,)
    sc = torch.cat(scores).cpu().view_as(rew)  # (P, G)
    z = gate.group_zscore(sc, valid)  # (P, G)
    new = gate.am_transform(rew, z, cfg.am_alpha)  # (P, G)
    for r, a, b, c, d in zip(
        rollouts, sc.flatten().tolist(), z.flatten().tolist(), new.flatten().tolist(), rew.flatten().tolist()
    ):
        r.extra.update(am_score=a, am_z=b, reward_raw=d)
        r.reward = c
    pen = (z > 0) & valid  # (P, G)
    hack = (
        torch.tensor([bool(r.grade.get("is_reward_hack_strict")) for r in rollouts]).view_as(valid) & valid
    )  # (P, G)
    n_valid = int(valid.sum())
    nan = float("nan")
    row = {
        "am_frac_pen": float(pen.sum()) / n_valid if n_valid else nan,
        "am_precision": float((pen & hack).sum() / pen.sum()) if pen.any() else nan,
        "am_recall": float((pen & hack).sum() / hack.sum()) if hack.any() else nan,
    }
    return new, row


# grad hooks: f(cfg, adapters, directions, per_sample, rollouts, surg, seed)
#   -> (surgery stats, extra log columns)
GRAD_HOOKS: dict[str, Callable] = {
    "gate": gate_step,
    "gate-random": functools.partial(gate_step, random_scores=True),
    "shrink": shrink_step,
}
# reward hooks: (setup(model, tokenizer, cfg) -> state,
#   apply(state, cfg, model, rollouts, rew, valid, pad_id, device) -> (new rewards (P, G), extra log columns))
REWARD_HOOKS: dict[str, tuple[Callable, Callable]] = {"am": (am_setup, am_rewards)}
for _a in ARMS.values():  # a hook named in the table must exist (a typo fails at import, not mid-sweep)
    assert not _a.grad_hook or _a.grad_hook in GRAD_HOOKS, (
        f"arm {_a.name}: unknown grad_hook {_a.grad_hook!r}"
    )
    assert not _a.reward_hook or _a.reward_hook in REWARD_HOOKS, (
        f"arm {_a.name}: unknown reward_hook {_a.reward_hook!r}"
    )
    assert not _a.placebo_of or _a.placebo_of in ARMS, (
        f"arm {_a.name}: placebo_of {_a.placebo_of!r} is not an arm"
    )
    assert not _a.columns or _a.columns in COLUMN_GROUPS, (
        f"arm {_a.name}: unknown column group {_a.columns!r}"
    )
    assert _a.grad_hook.startswith("gate") == _a.per_sample, f"arm {_a.name}: per_sample iff a gate hook"
    assert _a.step_edit in update.EDITS, f"arm {_a.name}: unknown step_edit {_a.step_edit!r}"
    assert (_a.step_edit == "gate") == _a.per_sample, (
        f"arm {_a.name}: the gate edit needs per-rollout gradients")
    assert _a.step_edit not in ("route", "route-matched", "gate", "copy") or _a.quarantine, (
        f"arm {_a.name}: step_edit {_a.step_edit!r} trains the quarantine")


def optimizer_step(cfg, arm: Arm, adapters: dict, optimizer, directions: dict | None, vhack: dict | None,
                   randoms: dict | None, per_sample, rollouts: list[grpo.Rollout], seed: int,
                   own_basis: bool) -> tuple[dict, dict, float]:
    """Step 6 of train.py: the arm's edit between backward() and the parameters' move; returns (step log
    columns, hook log columns, grad norm before clipping).

    cfg.surgery_on == "step" (default): the gradient is left alone (cos_in = cos_out = cos(g, v_hack)),
    AdamW's applied step is edited by update.apply_step (gate arms: per-rollout gradient shares from
    gate_parts).
    "grad" (the founding design): antipasto.surgery / the grad hook edit the gradient, AdamW steps on it.
    Either way step_cos / step_toward measure the step actually applied against v_hack."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    hook_row: dict = {}
    if cfg.surgery_on == "grad":
        mode = arm.surgery if directions is not None else None
        surg = antipasto.surgery(adapters, directions, mode) if mode else {}
        if arm.grad_hook:
            surg, hook_row = GRAD_HOOKS[arm.grad_hook](cfg, adapters, directions, per_sample, rollouts, surg,
                                                       seed)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        assert math.isfinite(grad_norm), f"non-finite grad norm {grad_norm}"
        st = update.apply_step(optimizer, adapters, "none", None, vhack, None, own_basis)
        out = {k: float(surg[k]) if k in surg else float("nan")
               for k in ("cos_in", "cos_out", "frac_fired", "removed_norm_frac")}
    else:
        parts = None
        if arm.step_edit == "gate":  # first: it replaces .grad by the float32 per-rollout sums
            parts, hook_row = gate_parts(cfg, adapters, directions, per_sample, rollouts, seed,
                                         random_scores=arm.grad_hook == "gate-random")
        surg = antipasto.surgery(adapters, vhack, "measure") if vhack is not None else {}
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        assert math.isfinite(grad_norm), f"non-finite grad norm {grad_norm}"
        clip_factor = min(1.0, cfg.grad_clip / (grad_norm + 1e-6))  # what clip_grad_norm_ multiplied by
        st = update.apply_step(optimizer, adapters, arm.step_edit, directions, vhack, randoms, own_basis,
                               parts, clip_factor)
        cos = float(surg["cos_in"]) if "cos_in" in surg else float("nan")
        out = {"cos_in": cos, "cos_out": cos, "frac_fired": st["frac_fired"],
               "removed_norm_frac": st["removed_norm_frac"]}
    out.update({k: st[k] for k in ("step_cos", "step_toward", "quar_step_frac", "erase_norm_frac")})
    return out, hook_row, grad_norm
