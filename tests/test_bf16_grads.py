"""Per-rollout gradients in a bf16 model: autograd's .grad is rounded there, the per-sample sums are float32.

    .venv/bin/python -m pytest tests/test_bf16_grads.py -q
"""

import dataclasses

import pytest
import torch

import antipasto
import arms
import extract_vhack_grad as ex
import grpo
import train
from tiny_qwen import ids, tiny_model


def capture(kind: str):
    """A bf16 tiny Qwen3 with a quarantine (adapter `kind`), delta_S != 0, one Dr.GRPO backward under
    per-sample capture."""
    torch.manual_seed(0)
    m = tiny_model(dtype=torch.bfloat16)
    ads = antipasto.wrap_model(m, quarantine=True, kind=kind)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.normal_(0, 0.02)
    B, T = 8, 40
    x, att = ids(B=B, T=T), torch.ones(B, T, dtype=torch.long)
    cm = torch.zeros(B, T)
    cm[:, 10:] = 1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, -0.25])  # (B,)
    m.zero_grad()
    with antipasto.capture_per_sample(m) as cap:
        lp = grpo.token_logprobs(m, x, att, 512, cm)  # (B, T)
        loss, _ = grpo.dr_grpo_loss(lp, lp.detach(), None, adv, cm, B, 64, 0.0, 0.2)
        loss.backward()
    return m, ads, cap, adv


@pytest.fixture(scope="module")
def bf16_capture():
    return capture("svd")


def test_check_is_as_tight_as_bf16_allows(bf16_capture):
    """The rounding is real (the float32 tolerance rejects it on some module), the bf16 tolerance accepts it,
    and a dropped rollout still fails the bf16 check on every module."""
    _, ads, cap, _ = bf16_capture
    fp32_fails = 0
    for k, a in ads.items():
        assert a.S.dtype == torch.bfloat16
        antipasto.check_per_sample_sum(k, cap.grads[k], a.delta_S.grad, a.S.dtype)
        try:
            antipasto.check_per_sample_sum(k, cap.grads[k], a.delta_S.grad, torch.float32)
        except AssertionError:
            fp32_fails += 1
        with pytest.raises(AssertionError, match="do not sum"):
            antipasto.check_per_sample_sum(k, cap.grads[k][1:], a.delta_S.grad, a.S.dtype)
    assert fp32_fails > 0, "the bf16 .grad matched the float32 sums to fp32 tolerance: the test lost its case"


def test_side_grads_runs_in_bf16():
    """extract_vhack_grad.side_grads on a bf16 model: per-sequence grads whose sum is the bf16 .grad to within
    bf16 rounding (it raised before the check knew the dtype)."""
    m = tiny_model(dtype=torch.bfloat16)
    antipasto.wrap_model(m)
    batch = [(ids(B=1, T=20, seed=s)[0].tolist(), 8) for s in range(3)]
    g = ex.side_grads(m, batch, pad_id=0, norm_const=64.0)
    assert all(v.shape[0] == 3 and v.dtype == torch.float32 and torch.isfinite(v).all() for v in g.values())


@pytest.mark.parametrize("kind", ["svd", "block"])
def test_gate_uses_the_float32_sum_as_grad(kind):
    """gate_parts in a bf16 model: .grad becomes the float32 per-rollout sum, so the deployed and quarantine
    shares add up to the gradient AdamW's moments see (no bf16 rounding residual routed every step); the
    block adapter's own-basis quarantine (its own per-rollout grads and optimizer state) too."""
    _, ads0, cap, adv = capture(kind)
    quar_before = {k: a.quar.grad.clone() for k, a in ads0.items()}
    grads_before = {k: a.delta_S.grad.clone() for k, a in ads0.items()}
    rs = [grpo.Rollout(0, [1], [2], "", "student", False, grade={"is_reward_hack_strict": False},
                       advantage=float(v)) for v in adv]
    per = {"dep": {k: [cap.grads[k]] for k in ads0}, "quar": {k: [cap.grads_hack[k]] for k in ads0}}
    cfg = dataclasses.replace(train.PRESETS["smoke"][1], arm="gate-route", gate_q=0.25)
    dirs = antipasto.random_directions(ads0, seed=1)
    parts, row = arms.gate_parts(cfg, ads0, dirs, per, rs, seed=0)
    assert row["gate_n_route"] >= 1
    rounded = 0
    for k, a in ads0.items():
        want = cap.grads[k].sum(0)  # (r,) float32
        torch.testing.assert_close(a.delta_S.grad, want, rtol=0, atol=0)
        g_d, g_q = parts[k]
        if kind == "svd":  # shared frame: the two shares split one gradient
            torch.testing.assert_close((g_d + g_q).float(), a.delta_S.grad, rtol=1e-6, atol=1e-9)
        want_q = cap.grads_hack[k].sum(0)  # (r,) float32, the quarantine's own per-rollout grads
        torch.testing.assert_close(a.quar.grad, want_q, rtol=0, atol=0)
        rounded += int(not torch.equal(grads_before[k], want)) + int(not torch.equal(quar_before[k], want_q))
    assert rounded > 0, "autograd's bf16 .grad equalled the float32 sums: the test lost its case"


def test_gate_route_trains_a_step_in_bf16(tmp_path, pool_dir):
    """One gate-route step of train.py on the tiny model in bf16 (it stopped at the per-sample check)."""
    import models
    from test_gate_arms import adapter_state, small_cfg

    m, _ = models.load_model("tiny-random", dtype="bfloat16")
    antipasto.wrap_model(m)
    p = tmp_path / "planted-bf16.safetensors"
    meta = antipasto.adapter_meta(m, models.model_id("tiny-random"))
    meta.update(pair_set="planted", n_pairs="0", method="random")
    antipasto.save_directions(p, antipasto.random_directions(antipasto.get_adapters(m), seed=99), meta)
    run = train.main(small_cfg(tmp_path, pool_dir, arm="gate-route", run_name="bf16-gate", vhack_path=str(p),
                               dtype="bfloat16"))
    st = adapter_state(run)
    assert any(v.abs().max() > 0 for k, v in st.items() if k.endswith("delta_S"))
    assert all(torch.isfinite(v).all() for v in st.values())
