"""Tests for antipasto.py (the SVD adapter): identity, modes, grads, surgery, state, merge, per-sample grads.

    .venv/bin/python -m pytest tests/test_antipasto.py -q            # fast part (~30 s on 2 cores)
    .venv/bin/python -m pytest tests/test_antipasto.py -q -m smollm  # SmolLM2-135M identity (needs the GGUF)

The tiny model is built here (2-layer Qwen3, hidden 64, fixed seed): the adapter never touches a tokenizer.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import antipasto as ap
from tiny_qwen import VOCAB, ids, logits, tiny_model

torch.set_num_threads(2)

SMOLLM_DIR = Path(__file__).resolve().parent.parent / "out" / "models" / "smollm2-135m"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def randomise_deltas(ads, seed=0, scale=0.3, hack=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.copy_(torch.randn(a.r, generator=g) * scale)
            if hack:
                a.delta_S_hack.copy_(torch.randn(a.r, generator=g) * scale)


def lm_loss(model, x) -> torch.Tensor:
    out = model(x).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------------------------
# Wrapping, identity at init
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init_tiny(dtype):
    m = tiny_model(dtype=dtype)
    x = ids()
    want = logits(m, x)
    ads = ap.wrap_model(m)
    assert len(ads) == 2 * 7
    got = logits(m, x)
    diff = (got.float() - want.float()).abs().max().item()
    print(f"tiny {dtype}: max abs logit diff at init = {diff}")
    assert diff == 0.0  # the adapter branch is exactly zero at init, in any dtype
    for a in ads.values():
        assert a.U.dtype == dtype and a.Vh.dtype == dtype and a.S.dtype == dtype
        assert a.delta_S.dtype == torch.float32 and a.delta_S_hack.dtype == torch.float32


def test_identity_at_init_models_tiny_random():
    """The project's tiny model (models.load_model), when models.py provides it."""
    import models

    m, _ = models.load_model("tiny-random")
    m.eval()
    x = ids(B=2, T=12, seed=7) % m.config.vocab_size
    want = logits(m, x)
    ads = ap.wrap_model(m)
    diff = (logits(m, x) - want).abs().max().item()
    print(f"models tiny-random float32: {len(ads)} adapters, max abs logit diff at init = {diff}")
    assert diff == 0.0 and len(ads) == 7 * m.config.num_hidden_layers


def test_cast_after_wrap_is_refused():
    m = tiny_model()
    ap.wrap_model(m)
    m.to(torch.bfloat16)  # also casts delta_S: the adapter refuses rather than train a bf16 delta
    with pytest.raises(RuntimeError, match="cast the model"):
        logits(m, ids())


def test_svd_buffers_reconstruct_weight_and_flags():
    m = tiny_model()
    ads = ap.wrap_model(m)
    for name, a in ads.items():
        W = a.base.weight
        assert a.U.shape == (a.d_out, a.r) and a.Vh.shape == (a.r, a.d_in) and a.r == min(W.shape)
        rec = (a.U * a.S) @ a.Vh  # (d_out, d_in)
        assert (rec - W).abs().max() < 1e-5, name
        assert torch.allclose(a.U.T @ a.U, torch.eye(a.r), atol=1e-5)
        assert bool((a.S[:-1] >= a.S[1:]).all()), "singular values must be sorted descending"
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta_S") for n in trainable)
    ap.set_trainable(m, quarantine=True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(ads) and all(re.search(r"\.delta_S(_hack)?$", n) for n in trainable)


def test_wrap_selection_layers_targets_rank_and_counts():
    m = tiny_model()
    # count on the unwrapped model (shapes only), compare with hand numbers for hidden 64, q 64->64,
    # k/v 64->32, o 64->64, gate/up 64->128, down 128->64: ranks 64, 32, 32, 64, 64, 64, 64 = 384 per layer
    c = ap.count_adapter_params(m)
    assert c["n_modules"] == 14 and c["delta_S"] == 2 * 384
    c1 = ap.count_adapter_params(m, layers=[1], rank=16)
    assert c1 == {"n_modules": 7, "delta_S": 7 * 16, "trainable_route": 14 * 16,
                  # U + Vh: r * (d_out + d_in) summed over q, k, v, o, gate, up, down; + S: r per module
                  "frozen_buffers": 16 * ((64 + 64) + (32 + 64) * 2 + (64 + 64) + (128 + 64) * 3) + 7 * 16,
                  "base_linear": 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3}
    ads = ap.wrap_model(m, layers=[1], rank=16)
    assert all(".layers.1." in k for k in ads) and len(ads) == 7
    assert all(a.r == 16 for a in ads.values())
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == c1["delta_S"]
    assert ap.count_adapter_params(m) == c1  # counting a wrapped model counts its adapters
    with pytest.raises(ValueError, match="already has SVDAdapter"):
        ap.wrap_model(m)

    m2 = tiny_model()
    ads2 = ap.wrap_model(m2, targets=("*.mlp.*",), rank=1000)  # rank clipped per module
    assert sorted({k.rsplit(".", 1)[-1] for k in ads2}) == ["down_proj", "gate_proj", "up_proj"]
    assert all(a.r == min(a.d_in, a.d_out) for a in ads2.values())
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        ap.wrap_model(tiny_model(), targets=("nonexistent",))


def test_qwen3_4b_count_from_config_on_meta_device():
    """Qwen3-4B shapes without weights: hand count 36 * (5 * 2560 + 2 * 1024) = 534,528 per delta set."""
    cfg = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        m = transformers.Qwen3ForCausalLM(cfg)
    c = ap.count_adapter_params(m)
    print("Qwen3-4B:", c)
    assert c["n_modules"] == 36 * 7
    assert c["delta_S"] == 534_528 and c["trainable_route"] == 1_069_056


# ------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------
def test_reference_equals_base_after_training():
    m = tiny_model()
    x = ids()
    base = logits(m, x)
    ads = ap.wrap_model(m)
    opt = torch.optim.Adam(ap.set_trainable(m, quarantine=False), lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        lm_loss(m, x).backward()
        opt.step()
    assert max(a.delta_S.abs().max().item() for a in ads.values()) > 0.01
    trained = logits(m, x)
    assert (trained - base).abs().max() > 1e-3, "training must have changed the model"
    with ap.reference(m):
        ref = logits(m, x)
    print("reference vs base max abs diff:", (ref - base).abs().max().item())
    assert torch.equal(ref, base)
    assert torch.equal(logits(m, x), trained), "mode must be restored on exit"


def test_ablate_equals_zeroed_hack_model():
    m = tiny_model()
    x = ids()
    ads = ap.wrap_model(m)
    randomise_deltas(ads)
    m_zero = copy.deepcopy(m)
    with torch.no_grad():
        for a in ap.get_adapters(m_zero).values():
            a.delta_S_hack.zero_()
    full = logits(m, x)
    with ap.ablate_quarantine(m):
        abl = logits(m, x)
    want = logits(m_zero, x)
    assert (full - want).abs().max() > 1e-3, "delta_S_hack must matter, else the test proves nothing"
    assert torch.equal(abl, want)


def test_modes_nest_and_restore_on_exception():
    m = tiny_model()
    ads = ap.wrap_model(m)
    a = next(iter(ads.values()))
    with ap.reference(m):
        with ap.ablate_quarantine(m):  # nested inside reference stays reference
            assert (a.use_dep, a.use_hack) == (False, False)
        assert (a.use_dep, a.use_hack) == (False, False)
    assert (a.use_dep, a.use_hack) == (True, True)
    with ap.ablate_quarantine(m):
        with pytest.raises(RuntimeError, match="boom"):
            with ap.reference(m):
                raise RuntimeError("boom")
        assert (a.use_dep, a.use_hack) == (True, False)
    assert all((b.use_dep, b.use_hack) == (True, True) for b in ads.values())


def test_merged_inference_matches_unmerged_and_guards():
    m = tiny_model()
    x = ids()
    ads = ap.wrap_model(m)
    randomise_deltas(ads)
    for ctx in (None, ap.ablate_quarantine, ap.reference):
        if ctx is None:
            un = logits(m, x)
            with ap.merged_inference(m):
                me = logits(m, x)
        else:
            with ctx(m):
                un = logits(m, x)
                with ap.merged_inference(m):
                    me = logits(m, x)
        d = (un - me).abs().max().item()
        print(f"merged vs unmerged ({ctx.__name__ if ctx else 'train'}): max abs diff {d:.3g}")
        assert d < 1e-4
    with ap.merged_inference(m):
        with pytest.raises(RuntimeError, match="grad enabled"):
            m(x)
        with pytest.raises(RuntimeError, match="changed inside merged_inference"):
            with ap.ablate_quarantine(m):
                logits(m, x)
        with torch.no_grad():
            next(iter(ads.values())).delta_S.add_(1.0)
        with pytest.raises(RuntimeError, match="changed inside merged_inference"):
            logits(m, x)
    assert all(a._merged is None for a in ads.values())


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------
def test_grad_matches_finite_difference(monkeypatch):
    # Qwen3RMSNorm upcasts to float32 internally, which puts ~1e-9 noise on a float64 loss and swamps a
    # tight finite difference; for this check the norm runs in the input dtype (float64) instead.
    from transformers.models.qwen3 import modeling_qwen3

    def norm_f64(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", norm_f64)
    m = tiny_model(dtype=torch.float64)
    m.config._attn_implementation = "sdpa"  # eager attention also upcasts its softmax to float32
    x = ids(B=2, T=8)
    ads = ap.wrap_model(m)
    randomise_deltas(ads, scale=0.1, hack=False)
    m.zero_grad()
    lm_loss(m, x).backward()
    eps = 1e-4
    worst = 0.0
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.0.self_attn.v_proj"]:
        a = ads[name]
        for i in (0, 3, a.r - 1):
            with torch.no_grad():
                orig = a.delta_S[i].item()
                a.delta_S[i] = orig + eps
                xp = a.delta_S[i].item()  # the float32 value actually used
                lp = lm_loss(m, x).item()
                a.delta_S[i] = orig - eps
                xm = a.delta_S[i].item()
                lm = lm_loss(m, x).item()
                a.delta_S[i] = orig
            fd = (lp - lm) / (xp - xm)
            ag = a.delta_S.grad[i].item()
            worst = max(worst, abs(fd - ag))
            assert abs(fd - ag) <= 1e-8 + 1e-5 * abs(fd), (name, i, fd, ag)
    print("finite-difference vs autograd worst abs diff:", worst)


@settings(max_examples=200, deadline=None)
@given(r=st.integers(1, 300), seed=st.integers(0, 2**31 - 1), gscale=st.floats(1e-6, 1e6))
def test_projection_properties(r, seed, gscale):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(r, generator=gen) * gscale  # (r,)
    v = torch.randn(r, generator=gen)
    v = v / v.norm()  # (r,)
    dot = float(g.double() @ v.double())
    gn = g.double().norm().item()
    ge, rem_e, ste = ap.project_one(g, v, "erase")
    gd, rem_r, str_ = ap.project_one(g, v, "route")
    gm, rem_m, stm = ap.project_one(g, v, "measure")
    # measure never changes g
    assert torch.equal(gm, g.double()) and rem_m.abs().max() == 0 and not stm["fired"]
    ge32 = ge.float()  # what is written into .grad
    assert float(ge32.double() @ v.double()) <= 1e-6 * gn
    if dot <= 0:
        assert torch.equal(ge, g.double()) and not ste["fired"]
    else:
        assert ste["fired"] and abs(float(ge.double() @ v.double())) <= 1e-6 * gn
    # route: deployed part is erase's, and g_dep + g_quar == g_in (float32 as written to .grad)
    assert torch.equal(gd, ge)
    assert (gd.float() + rem_r.float() - g).abs().max().item() <= 1e-6 * gn


def _hand_adapters():
    """3 adapters with r = 2 and hand-set grads (names a, b, c)."""
    ads = {}
    for name in "abc":
        lin = torch.nn.Linear(2, 2, bias=False)
        ad = ap.SVDAdapter(lin)
        ad._name = name
        ads[name] = ad
    grads = {"a": [3.0, 4.0], "b": [1.0, 0.0], "c": [0.0, 2.0]}
    dirs = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0, 0.0]), "c": torch.tensor([0.6, 0.8])}
    for k, ad in ads.items():
        ad.delta_S.grad = torch.tensor(grads[k])
        ad.delta_S_hack.requires_grad_(True)
        ad.delta_S_hack.grad = torch.tensor(grads[k])  # raw quarantine grad equals g (forward uses the sum)
    return ads, dirs


@pytest.mark.parametrize("mode", ["measure", "erase", "route"])
def test_surgery_hand_computed_three_modules(mode):
    # a: g=(3,4), v=(1,0): g.v=3 > 0, cos_in=0.6, erase -> (0,4), removed (3,0)
    # b: g=(1,0), v=(-1,0): g.v=-1, cos=-1, untouched
    # c: g=(0,2), v=(.6,.8): g.v=1.6, cos_in=0.8, removed (.96,1.28), erase -> (-.96,.72), cos_out=0
    ads, dirs = _hand_adapters()
    out = ap.surgery(ads, dirs, mode)
    assert out["cos_in"] == pytest.approx((0.6 - 1.0 + 0.8) / 3, abs=1e-6)
    assert out["per_module"]["cos_in"] == pytest.approx([0.6, -1.0, 0.8], abs=1e-6)
    assert out["cos_in_global"] == pytest.approx((3 - 1 + 1.6) / (math.sqrt(30) * math.sqrt(3)), abs=1e-6)
    assert out["frac_positive"] == pytest.approx(2 / 3)
    assert out["proj_norm_frac"] == pytest.approx(math.sqrt(9 + 1.6**2) / math.sqrt(30), abs=1e-6)
    assert out["grad_norm_in"] == pytest.approx(math.sqrt(30), abs=1e-6)
    if mode == "measure":
        assert out["frac_fired"] == 0.0 and out["removed_norm_frac"] == 0.0
        assert out["cos_out"] == pytest.approx(out["cos_in"], abs=1e-6)
        assert ads["a"].delta_S.grad.tolist() == [3.0, 4.0]
        return
    assert out["frac_fired"] == pytest.approx(2 / 3)
    assert out["per_module"]["fired"] == [True, False, True]
    assert out["cos_out"] == pytest.approx(-1 / 3, abs=1e-6)
    assert out["removed_norm_frac"] == pytest.approx(math.sqrt(9 + 1.6**2) / math.sqrt(30), abs=1e-6)
    assert out["grad_norm_out"] == pytest.approx(math.sqrt(16 + 1 + 0.96**2 + 0.72**2), abs=1e-6)
    assert ads["a"].delta_S.grad.tolist() == pytest.approx([0.0, 4.0], abs=1e-6)
    assert ads["b"].delta_S.grad.tolist() == [1.0, 0.0]
    assert ads["c"].delta_S.grad.tolist() == pytest.approx([-0.96, 0.72], abs=1e-6)
    if mode == "route":
        assert ads["a"].delta_S_hack.grad.tolist() == pytest.approx([3.0, 0.0], abs=1e-6)
        assert ads["b"].delta_S_hack.grad.tolist() == [0.0, 0.0]
        assert ads["c"].delta_S_hack.grad.tolist() == pytest.approx([0.96, 1.28], abs=1e-6)
    else:  # erase leaves the (frozen-in-non-route-arms) quarantine grad alone
        assert ads["a"].delta_S_hack.grad.tolist() == [3.0, 4.0]


def test_surgery_errors_and_none_directions():
    ads, dirs = _hand_adapters()
    out = ap.surgery(ads, None, "measure")
    assert out["grad_norm_in"] == pytest.approx(math.sqrt(30)) and math.isnan(out["cos_in"])
    with pytest.raises(ValueError, match="needs directions"):
        ap.surgery(ads, None, "erase")
    with pytest.raises(ValueError, match="unit norm"):
        ap.surgery(ads, {**dirs, "b": torch.tensor([2.0, 0.0])}, "erase")
    with pytest.raises(ValueError, match="lacks 1 adapter keys"):
        ap.surgery(ads, {k: dirs[k] for k in "ab"}, "erase")
    with pytest.raises(ValueError, match="surgery mode"):
        ap.surgery(ads, dirs, "project")
    ads["b"].delta_S_hack.requires_grad_(False)
    with pytest.raises(ValueError, match="set_trainable"):
        ap.surgery(ads, dirs, "route")
    assert ads["a"].delta_S.grad.tolist() == [3.0, 4.0], "a failed surgery must not have edited anything"


def test_route_on_model_conserves_and_trains_quarantine():
    m = tiny_model()
    x = ids()
    ads = ap.wrap_model(m, quarantine=True)
    dirs = ap.random_directions(ads, seed=3)
    lm_loss(m, x).backward()
    g_in = {k: a.delta_S.grad.clone() for k, a in ads.items()}
    assert all(torch.equal(a.delta_S_hack.grad, g_in[k]) for k, a in ads.items()), "raw hack grad == g"
    out = ap.surgery(ads, dirs, "route")
    for k, a in ads.items():
        s = a.delta_S.grad + a.delta_S_hack.grad
        assert (s - g_in[k]).abs().max() <= 1e-6 * g_in[k].norm() + 1e-12
        assert float(a.delta_S.grad.double() @ dirs[k].double()) <= 1e-6 * g_in[k].norm()
    assert 0 < out["frac_fired"] < 1 and 0 < out["removed_norm_frac"] < 1


def test_random_directions():
    m = tiny_model()
    ads = ap.wrap_model(m)
    d1, d2, d3 = ap.random_directions(ads, 0), ap.random_directions(ads, 0), ap.random_directions(ads, 1)
    for k, a in ads.items():
        assert d1[k].shape == (a.r,) and abs(d1[k].norm().item() - 1) < 1e-6
        assert torch.equal(d1[k], d2[k]) and not torch.equal(d1[k], d3[k])
    sub = ap.random_directions({k: ads[k] for k in list(ads)[3:5]}, 0)
    assert all(torch.equal(sub[k], d1[k]) for k in sub), "a module's direction must not depend on the others"
    # Haar: for r = 64 the mean of v_1^2 over many draws is 1/64; across the 4 r=64 modules x 200 seeds
    vals = [ap.random_directions(ads, s)["model.layers.0.self_attn.q_proj"][0].item() ** 2
            for s in range(400)]
    assert abs(sum(vals) / len(vals) - 1 / 64) < 0.006


# ------------------------------------------------------------------------------------------------
# State: save / load / merge
# ------------------------------------------------------------------------------------------------
def test_save_load_bit_exact_and_mismatch_errors(tmp_path):
    m = tiny_model()
    x = ids()
    ads = ap.wrap_model(m)
    randomise_deltas(ads)
    want = logits(m, x)
    p = tmp_path / "adapter.safetensors"
    ap.save_adapter(p, m, "tiny-test", extra={"step": 7})
    m2 = tiny_model()
    ap.wrap_model(m2)
    meta = ap.load_adapter(p, m2, "tiny-test")
    assert meta["extra"] == {"step": 7} and meta["module_keys"] == list(ads)
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", meta["git_sha"])
    assert torch.equal(logits(m2, x), want)

    def fresh(**kw):
        mm = tiny_model(dtype=kw.pop("dtype", torch.float32))
        ap.wrap_model(mm, **kw)
        return mm

    cases = [("model_id", fresh(), "other-model"), ("dtype", fresh(dtype=torch.bfloat16), "tiny-test"),
             ("module_keys", fresh(layers=[0]), "tiny-test"), ("ranks", fresh(rank=8), "tiny-test")]
    for field, mm, mid in cases:
        with pytest.raises(ValueError, match=f"field '{field}'"):
            ap.load_adapter(p, mm, mid)
        assert all(a.delta_S.abs().max() == 0 for a in ap.get_adapters(mm).values()), "nothing modified"

    dirs = ap.random_directions(ads, 5)
    dp = tmp_path / "dirs.safetensors"
    ap.save_directions(dp, dirs, {**ap.adapter_meta(m, "tiny-test"), "source": "placebo"})
    back = ap.load_directions(dp, m2, "tiny-test")
    assert all(torch.equal(back[k], dirs[k]) for k in dirs)
    for field, mm, mid in cases:
        with pytest.raises(ValueError, match=f"field '{field}'"):
            ap.load_directions(dp, mm, mid)


def test_merge_and_inverse():
    m = tiny_model()
    x = ids()
    base_copy = copy.deepcopy(m)
    ads = ap.wrap_model(m)
    randomise_deltas(ads, scale=0.2)
    merged = ap.merge(m)
    sd_keys = set(base_copy.state_dict())
    assert set(merged) <= sd_keys and len(merged) == len(ads), "merge keys are the base model's weight keys"
    missing, unexpected = base_copy.load_state_dict(merged, strict=False)
    assert not unexpected
    with ap.ablate_quarantine(m):
        dep = logits(m, x)
    d = (logits(base_copy, x) - dep).abs().max().item()
    print("merged base model vs adapter deploy mode: max abs logit diff", d)
    assert d < 1e-4
    assert (logits(m, x) - dep).abs().max() > 1e-3, "hack part is excluded from merge (deploy mode)"
    rec, off = ap.unmerge(m, merged)
    for k, a in ads.items():
        assert (rec[k] - a.delta_S).abs().max() < 1e-4, k
        assert off[k] < 1e-4, k


# ------------------------------------------------------------------------------------------------
# Per-sample gradients (issue #10)
# ------------------------------------------------------------------------------------------------
def _masked_sum_loss(model, x, mask):
    out = model(x).logits  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(out[:, :-1].transpose(1, 2), x[:, 1:],
                                            reduction="none")  # (B, T-1)
    return (nll * mask[:, 1:]).sum()


def test_per_sample_grads_match_single_sample_loop():
    m = tiny_model()
    ads = ap.wrap_model(m, quarantine=True)
    randomise_deltas(ads, scale=0.1)
    B, T = 3, 9
    x = ids(B=B, T=T, seed=4)
    mask = torch.ones(B, T)
    mask[0, 6:] = 0  # per-sample loss masks (completion tokens only, say)
    mask[2, :3] = 0
    with ap.capture_per_sample(m) as cap:
        _masked_sum_loss(m, x, mask).backward()
    assert set(cap.grads) == set(ads)
    batch_grad = {k: a.delta_S.grad.clone() for k, a in ads.items()}
    worst = 0.0
    for b in range(B):
        m.zero_grad()
        _masked_sum_loss(m, x[b : b + 1], mask[b : b + 1]).backward()
        for k, a in ads.items():
            worst = max(worst, (cap.grads[k][b] - a.delta_S.grad).abs().max().item())
    print("per-sample capture vs single-sample loop: max abs diff", worst)
    assert worst < 1e-5
    for k in ads:
        assert (cap.grads[k].sum(0) - batch_grad[k]).abs().max() < 1e-5
    assert all(a._capture is None for a in ads.values())


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M identity (needs the GGUF)
# ------------------------------------------------------------------------------------------------
@pytest.mark.smollm
@pytest.mark.skipif(not (SMOLLM_DIR / SMOLLM_FILE).exists(),
                    reason=f"{SMOLLM_DIR / SMOLLM_FILE} absent (just fetch-smollm)")
def test_identity_at_init_smollm():
    m = transformers.AutoModelForCausalLM.from_pretrained(str(SMOLLM_DIR), gguf_file=SMOLLM_FILE,
                                                          dtype=torch.float32).eval()
    x = torch.tensor([[1, 504, 3458, 314, 253, 1373, 30, 2],
                      [28, 1701, 8423, 17, 1345, 11, 2177, 30]])  # (2, 8)
    want = logits(m, x)
    ads = ap.wrap_model(m)
    assert len(ads) == 30 * 7
    # scripts/count_params.py number
    assert sum(a.r for a in ads.values()) == 30 * (5 * 576 + 2 * 192) == 97_920
    got = logits(m, x)
    diff = (got - want).abs().max().item()
    print(f"SmolLM2-135M float32: max abs logit diff at init = {diff}")
    assert diff == 0.0
    randomise_deltas(ads, scale=0.01)
    with ap.reference(m):
        assert torch.equal(logits(m, x), want)
    with ap.merged_inference(m):
        me = logits(m, x)
    un = logits(m, x)
    print("SmolLM2 merged vs unmerged max abs diff:", (me - un).abs().max().item())
    assert (me - un).abs().max() < 1e-3 * un.abs().max()


@pytest.mark.smollm
@pytest.mark.slow  # bf16 matmuls on this CPU are slow: ~6 min of CPU time
@pytest.mark.skipif(not (SMOLLM_DIR / SMOLLM_FILE).exists(),
                    reason=f"{SMOLLM_DIR / SMOLLM_FILE} absent (just fetch-smollm)")
def test_identity_at_init_smollm_bf16():
    m = transformers.AutoModelForCausalLM.from_pretrained(str(SMOLLM_DIR), gguf_file=SMOLLM_FILE,
                                                          dtype=torch.bfloat16).eval()
    x = torch.tensor([[1, 504, 3458, 314, 253, 1373, 30, 2]])  # (1, 8)
    want = logits(m, x)
    ap.wrap_model(m)
    diff = (logits(m, x).float() - want.float()).abs().max().item()
    print(f"SmolLM2-135M bfloat16: max abs logit diff at init = {diff}")
    assert diff == 0.0
