"""Each issue-#10 arm (gate-route, gate-route-random, gate-random, vanilla-2x, shrinkage, am) runs one step of
train.py on tiny-random (CPU) with a synthetic teacher pool and real grading; checks what each arm may move,
the arm-specific log columns (arms.expected_finite), the per-rollout gate/AM fields, and the bad-input errors.

    python -m pytest tests/test_gate_arms.py -q
"""

import csv
import dataclasses
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

import grpo
import runs
import arms
import train

NEW_ARMS = ("gate-route", "gate-route-random", "gate-random", "vanilla-2x", "shrinkage", "am")


# written out by hand (not read from arms.ARMS), so a wrong table entry fails here
QUARANTINE_ARMS = {"route", "route-random", "gate-route", "gate-route-random", "gate-random", "vanilla-2x"}
GATE_ARMS_BY_HAND = {"gate-route", "gate-route-random", "gate-random"}


def small_cfg(tmp: Path, pool: Path, **kw) -> train.TrainConfig:
    base = dataclasses.replace(
        train.PRESETS["smoke"][1], out_dir=str(tmp), max_problems=8, rollouts_per_step=8, group_size=4,
        max_new_tokens=12, teacher_pool_dir=str(pool), mix_ratio=0.5, eval_at_end=False, steps=1,
        ckpt_every=1, grader_workers=2, save_rollouts=True, gate_q=0.25,
    )
    return dataclasses.replace(base, **kw)


def read_tsv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def adapter_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "ckpt" / (run / "ckpt" / "latest").read_text().strip() / "adapter.safetensors")


# share gate-route's / erase's code paths
SLOW_ARMS = ("gate-route-random", "gate-random", "vanilla-2x", "shrinkage")


@pytest.mark.parametrize("arm",
                         [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_ARMS else a for a in NEW_ARMS])
def test_new_arm_one_step(arm, tmp_path, pool_dir, vhack_file):
    torch.set_num_threads(2)
    run = train.main(small_cfg(tmp_path, pool_dir, arm=arm, run_name=f"one-{arm}", vhack_path=vhack_file))
    st = adapter_state(run)
    ds = [v for k, v in st.items() if k.endswith("delta_S")]
    dh = [v for k, v in st.items() if k.endswith("delta_S_hack")]
    assert any(v.abs().max() > 0 for v in ds), f"{arm}: delta_S did not move"
    moved_hack = any(v.abs().max() > 0 for v in dh)
    assert moved_hack == (arm in QUARANTINE_ARMS), f"{arm}: delta_S_hack moved={moved_hack}"
    row = read_tsv(run / "log.tsv")[0]
    assert set(row) == set(runs.LOG_COLUMNS)
    vals = {k: float(v) for k, v in row.items()}
    for col, finite in arms.expected_finite(arm, vals).items():
        assert math.isfinite(vals[col]) == finite, (
            f"{arm}: column {col}={vals[col]} but expected finite={finite}")
    for col in ("cos_in", "cos_out", "frac_fired", "removed_norm_frac"):
        assert math.isfinite(vals[col]), f"{arm}: {col} is {vals[col]} with a v_hack given"
    rows = [json.loads(x) for x in gzip.open(run / "rollouts" / "step_000000.jsonl.gz", "rt")]
    if arm in GATE_ARMS_BY_HAND:
        n = [vals[f"gate_n_{z}"] for z in ("keep", "mid", "route")]
        scored = [r for r in rows if r["gate_zone"] >= 0]
        # gate_scope="positive" (default)
        assert sum(n) == len(scored) == sum(r["advantage"] > 0 for r in rows)
        # penalised rollouts are not scored (stay in keep)
        assert all(r["gate_zone"] == -1 for r in rows if r["advantage"] <= 0)
        assert [sum(r["gate_zone"] == z for r in scored) for z in range(3)] == n
        assert vals["gate_n_route"] >= 1, "gate_q=0.25 with distinct scores must route >= 1 rollout"
    if arm == "am":
        assert all("am_z" in r and "reward_raw" in r for r in rows)
        for r in rows:  # the training reward is the AM transform of the raw one
            z = r["am_z"]
            want = r["reward_raw"] * (1 - 2.0 * (1 / (1 + math.exp(-z))) * (z > 0))
            assert r["reward"] == pytest.approx(want, abs=1e-5)
    if arm == "shrinkage":  # the step it applies is erase's norm in vanilla's direction (hand-checked in
        assert 0 < vals["removed_norm_frac"] < 1  # tests/test_update.py); here: it shrinks, and not to 0


def test_gate_scope_nonzero_scores_every_nonzero_advantage(tmp_path, pool_dir, vhack_file):
    run = train.main(small_cfg(tmp_path, pool_dir, arm="gate-route", run_name="scope", vhack_path=vhack_file,
                               gate_scope="nonzero"))
    rows = [json.loads(x) for x in gzip.open(run / "rollouts" / "step_000000.jsonl.gz", "rt")]
    scored = [r for r in rows if r["gate_zone"] >= 0]
    assert len(scored) == sum(r["advantage"] != 0 for r in rows) > sum(r["advantage"] > 0 for r in rows)


def test_gate_arm_refuses_grad_checkpointing(tmp_path, pool_dir, vhack_file):
    with pytest.raises(ValueError, match="no-grad-checkpointing"):
        train.main(small_cfg(tmp_path, pool_dir, arm="gate-route", vhack_path=vhack_file,
                             grad_checkpointing=True, run_name="bad"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kw,match", [({"gate_q": 0.6}, "gate_q"), ({"gate_q": 0.0}, "gate_q"),
                                      ({"gate_mode": "threshold", "gate_tau_mid": 0.5, "gate_tau_route": 0.1},
                                       "gate_tau_mid")])
def test_gate_bad_config(kw, match, tmp_path, pool_dir, vhack_file):
    with pytest.raises(ValueError, match=match):
        train.main(small_cfg(tmp_path, pool_dir, arm="gate-route", vhack_path=vhack_file,
                             run_name="bad", **kw))


def test_gate_route_and_shrinkage_need_vhack(tmp_path, pool_dir):
    for arm in ("gate-route", "shrinkage"):
        with pytest.raises(ValueError, match="vhack-path"):
            train.main(small_cfg(tmp_path, pool_dir, arm=arm, run_name="bad"))


@pytest.mark.parametrize("scope", ["positive", "nonzero"])
def test_gate_step_with_nothing_to_score(scope):
    """A step where no rollout is scored (all advantages 0, or none > 0 for the positive scope): everything
    stays in keep, the quarantine gets a zero gradient, the deployed gradient is the full sum, no crash."""
    import antipasto
    import models

    m, _ = models.load_model("tiny-random")
    ads = antipasto.wrap_model(m, quarantine=True)
    g = torch.Generator().manual_seed(0)
    adv = [0.0, 0.0, 0.0, 0.0] if scope == "nonzero" else [-1.0, 0.0, -0.5, 0.0]
    rs = [grpo.Rollout(0, [1], [2], "", "student", False, grade={"is_reward_hack_strict": False}, advantage=a)
          for a in adv]
    per = {"dep": {}, "quar": {}}
    for k, a in ads.items():
        G = torch.randn(len(rs), a.r, generator=g)  # (N, r)
        per["dep"][k], per["quar"][k] = [G], [G.clone()]
        a.delta_S.grad, a.delta_S_hack.grad = G.sum(0).clone(), G.sum(0).clone()
    cfg = dataclasses.replace(train.PRESETS["smoke"][1], arm="gate-route", gate_scope=scope)
    dirs = antipasto.random_directions(ads, seed=1)
    out, row = arms.gate_step(cfg, ads, dirs, per, rs, {}, seed=0)
    assert row["gate_n_keep"] == row["gate_n_mid"] == row["gate_n_route"] == 0
    for k, a in ads.items():
        torch.testing.assert_close(a.delta_S.grad, per["dep"][k][0].sum(0))
        assert a.delta_S_hack.grad.abs().max() == 0
    assert all(r.extra["gate_zone"] == -1 for r in rs)


def test_gate_probe_scores_at_the_pools_temperature(tmp_path):
    """gate_probe reads the sampling temperature from the pools' meta.json (1 without one) and refuses pools
    of different temperatures."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import cli
    import gate_probe

    a, b, c = (tmp_path / n for n in "abc")
    for d, t in ((a, 0.7), (b, 0.7), (c, 1.0)):
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"temperature": t}))
    (tmp_path / "bare").mkdir()
    assert gate_probe.pools_temperature([str(a), str(b)]) == 0.7
    assert gate_probe.pools_temperature([str(tmp_path / "bare")]) == 1.0
    with pytest.raises(cli.UserError, match=r"temperatures \[0.7, 1.0\]"):
        gate_probe.pools_temperature([str(a), str(c)])


def test_gate_measure_on_a_pool(tmp_path, pool_dir, vhack_file):
    """scripts/gate_probe.measure (`just gate-probe`): both scopes reported,
    consistent with each other and with the rows."""
    import sys

    import gate

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import gate_probe

    res = gate_probe.measure("tiny-random", vhack_file, [str(pool_dir)], qs=(0.25,),
                             out=str(tmp_path / "g.json"))
    assert json.loads((tmp_path / "g.json").read_text())["n_rows"] == res["n_rows"] == 24
    for agg in gate.AGGS:
        g = res["gate"][agg]
        rows = g["rows"]
        assert len(rows) == res["n_scored"]
        pos = [r for r in rows if r["advantage"] > 0]
        assert g["positive"]["n"] == len(pos) and g["positive"]["n_hack"] == sum(r["hack"] for r in pos)
        assert g["positive"]["auc"] == pytest.approx(g["auc_pos_adv"], nan_ok=True)
        want = gate.auc(torch.tensor([r["a"] for r in pos]), torch.tensor([r["hack"] for r in pos]))
        assert g["positive"]["auc"] == pytest.approx(want, nan_ok=True)
        n_route = g["positive"]["q=0.25"]["gate_n_route"]
        # top q of the positive rollouts (ties may add)
        assert n_route >= gate.zone_counts(len(pos), 0.25)[0] >= 1
