"""antipasto.fused_training (the one-matmul svd train pass, TrainConfig.fused_adapter) against the unfused
adapter: outputs, input gradients and delta gradients, per mode, after an optimizer step, through
grpo.policy_gradient on tiny-random (with KL and activation checkpointing), and the per-sample capture
fallback. The unfused path is the reference; a float64 copy of the layer is the referee for bf16."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn

import antipasto
import models
import grpo

torch.set_num_threads(2)


def _layer(dtype=torch.float32, d_in=24, d_out=16, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=True).to(dtype)
    model = nn.Sequential()
    model.add_module("proj", lin)
    ads = antipasto.wrap_model(model, targets=("proj",), quarantine=True)
    ad = ads["proj"]
    with torch.no_grad():
        ad.delta_S.copy_(0.3 * torch.randn(ad.r))
        ad.delta_S_hack.copy_(0.2 * torch.randn(ad.r))
    return model, ad


def _run(model, ad, x, fused: bool, ctx=None):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with antipasto.fused_training(model) if fused else torch.enable_grad():
        with (ctx(model) if ctx else torch.enable_grad()):
            y = model(x)
            (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    g = lambda p: None if p.grad is None else p.grad.clone()  # noqa: E731
    return y.detach(), x.grad.clone(), g(ad.delta_S), g(ad.delta_S_hack)


@pytest.mark.parametrize("mode", ["full", "deploy"])
def test_fused_matches_unfused_fp32(mode):
    model, ad = _layer()
    x = torch.randn(3, 5, ad.d_in)  # (B, T, d_in)
    ctx = antipasto.ablate_quarantine if mode == "deploy" else None
    want = _run(model, ad, x, fused=False, ctx=ctx)
    got = _run(model, ad, x, fused=True, ctx=ctx)
    for w, g in zip(want, got):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert (want[3] is None) == (mode == "deploy")  # deploy mode: the quarantine gets no gradient
    assert got[2].abs().max() > 0


def test_fused_path_is_taken_and_rebuilds_after_a_step():
    """The fused forward really runs (its cached weight exists) and follows an in-place optimizer step."""
    model, ad = _layer()
    x = torch.randn(2, 4, ad.d_in)
    opt = torch.optim.SGD([ad.delta_S], lr=0.5)
    with antipasto.fused_training(model):
        y0 = model(x)
        assert "weight" in ad._fused, "fused path not taken"
        y0.sum().backward()
        opt.step()
        y1 = model(x)
    unfused = model(x)  # outside the context: the ordinary path at the new delta_S
    torch.testing.assert_close(y1, unfused, rtol=1e-5, atol=1e-6)
    assert (y1 - y0).abs().max() > 1e-4
    assert ad._fused is None  # restored on exit


def test_reference_and_no_grad_take_the_ordinary_path():
    model, ad = _layer()
    x = torch.randn(2, 4, ad.d_in)
    with antipasto.fused_training(model):
        with antipasto.reference(model):
            y = model(x)
        assert torch.equal(y, ad.base(x))
        assert "weight" not in ad._fused
        with torch.no_grad():
            model(x)
        assert "weight" not in ad._fused


def test_fused_bf16_error_is_that_of_the_unfused_path():
    """bf16: both paths' delta gradients sit within the same distance of a float64 referee."""
    model, ad = _layer(torch.bfloat16, d_in=64, d_out=48)
    ref_model = copy.deepcopy(model).double()
    ref_ad = antipasto.get_adapters(ref_model)["proj"]
    with torch.no_grad():  # the float64 referee keeps float64 deltas
        ref_ad.delta_S.data = ref_ad.delta_S.data.double()
        ref_ad.delta_S_hack.data = ref_ad.delta_S_hack.data.double()
    x = torch.randn(4, 8, ad.d_in)
    ref_ad._check_float32 = lambda: None  # the referee is float64 on purpose
    gr = _run(ref_model, ref_ad, x.double(), fused=False)[2].float()
    gu = _run(model, ad, x.bfloat16(), fused=False)[2]
    gf = _run(model, ad, x.bfloat16(), fused=True)[2]
    eu, ef = (gu - gr).norm() / gr.norm(), (gf - gr).norm() / gr.norm()
    assert ef < 0.05 and ef < 2 * eu + 1e-3, (float(eu), float(ef))


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-random")


def _rollouts(vocab, n=8, seed=0):
    rng = random.Random(seed)
    out = []
    for j in range(n // 4):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(5, 12))]
        for k in range(4):
            comp = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 10))]
            out.append(grpo.Rollout(j, prompt, comp, "", "student", False, advantage=rng.uniform(-2, 2)))
    return out


@pytest.mark.parametrize("ckpt", [False, True])
def test_policy_gradient_fused_equals_unfused(tiny, ckpt):
    """grpo.policy_gradient (KL on, micro-batches) gives the same loss, KL and delta_S gradient fused."""
    base, tok = tiny
    m = copy.deepcopy(base)
    ads = antipasto.wrap_model(m)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.copy_(0.05 * torch.randn(a.r, generator=g))
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    rs = _rollouts(m.config.vocab_size)
    res = {}
    for fused in (False, True):
        cfg = grpo.LossConfig(micro_batch=3, l_max=16, beta_kl=0.05, fused_adapter=fused)
        m.zero_grad(set_to_none=True)
        st = grpo.policy_gradient(m, rs, len(rs), cfg, tok.pad_token_id, "cpu")
        res[fused] = (st, {k: a.delta_S.grad.clone() for k, a in ads.items()})
    (s0, g0), (s1, g1) = res[False], res[True]
    assert abs(s0["loss"] - s1["loss"]) < 1e-6 and abs(s0["kl"] - s1["kl"]) < 1e-8
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-7)
    assert max(v.abs().max() for v in g0.values()) > 0


def test_per_sample_capture_falls_back(tiny):
    """Gate arms: per-sample gradients under fused_training equal those without it."""
    base, tok = tiny
    m = copy.deepcopy(base)
    ads = antipasto.wrap_model(m)
    rs = _rollouts(m.config.vocab_size, n=4, seed=2)
    out = {}
    for fused in (False, True):
        cfg = grpo.LossConfig(micro_batch=4, l_max=16, beta_kl=0.0, fused_adapter=fused)
        m.zero_grad(set_to_none=True)
        per: dict = {}
        grpo.policy_gradient(m, rs, len(rs), cfg, tok.pad_token_id, "cpu", per_sample=per)
        out[fused] = {k: torch.cat(v) for k, v in per["dep"].items()}
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=0, atol=0)


def test_bench_fused_runs_and_prints(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_fused

    rows = bench_fused.main(bench_fused.FusedBenchConfig(shapes=("16x24",), tokens=64, repeats=1))
    assert rows[0]["rank"] == 16 and all(
        rows[0][k] > 0 for k in ("plain_fwd", "fused_fwd", "plain_fwd_bwd", "fused_fwd_bwd"))
    assert "16x24" in capsys.readouterr().out
