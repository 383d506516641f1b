"""Tests for antipasto.py's structurally separated adapters (kind="block", kind="lora"; issue #10 item 3).

    .venv/bin/python -m pytest tests/test_antipasto_variants.py -q        # ~30-40 s on 2 shared cores

Each variant: exact at init (bit-exact logits), ablate_quarantine() == a zeroed quarantine, reference() ==
base, forward == an independently built weight delta, merge / unmerge / merged_inference, save/load with the
kind in the metadata, per-sample grads vs a single-sample loop, surgery semantics per kind, counts, random
directions, per-rollout weights, shrinkage, and a planted-direction routing check. The tiny 2-layer Qwen3 is
the one from tests/test_antipasto.py (hidden 64, fixed seed).
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import antipasto as ap
from tiny_qwen import VOCAB, ids, logits, tiny_model

torch.set_num_threads(1)

# (kind, wrap kwargs) for every non-default variant; svd is covered by tests/test_antipasto.py and used here
# as the reference point where a comparison needs it
VARIANTS = {
    "block-next": dict(kind="block", rank=8),
    "block-random": dict(kind="block", rank=8, quarantine_basis="random", basis_seed=3),
    "lora": dict(kind="lora", rank=4),
}
VARIANT_IDS = list(VARIANTS)
ALL_KINDS = {"svd": dict(kind="svd", rank=8), **VARIANTS}


def wrapped(variant: str, dtype=torch.float32, quarantine=False, **kw):
    m = tiny_model(dtype=dtype)
    ads = ap.wrap_model(m, quarantine=quarantine, **{**ALL_KINDS[variant], **kw})
    return m, ads


def randomise(ads, seed=0, scale=0.3, hack=True, hack_scale=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ads.values():
            a.dep.copy_(torch.randn(a.dep.shape, generator=g) * scale)
            if hack:
                a.quar.copy_(torch.randn(a.quar.shape, generator=g)
                             * (scale if hack_scale is None else hack_scale))


def masked_sum_loss(model, x, mask):
    out = model(x).logits  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(out[:, :-1].transpose(1, 2), x[:, 1:],
                                            reduction="none")  # (B, T-1)
    return (nll * mask[:, 1:]).sum()


def indep_delta(lin_W: torch.Tensor, variant: str, a, dep=True, quar=True) -> torch.Tensor:
    """Weight delta of one module built here from a fresh float64 SVD of W
    (independent of antipasto's buffers)."""
    U, S, Vh = torch.linalg.svd(lin_W.double(), full_matrices=False)
    r = a.r
    d = torch.zeros_like(lin_W, dtype=torch.float64)
    # fix the SVD sign ambiguity against the adapter's frame: a sign flip of (u_i, v_i) leaves u_i v_i^T alone
    if variant == "lora":
        # B is U_r up to column signs; B A with A' = diag(sign) A is the same delta
        # -> compare via the adapter's B
        Bsign = torch.sign((U[:, :r] * a.B.double()).sum(0))  # (r,)
        Bi = U[:, :r] * Bsign
        if dep:
            d += Bi @ a.A.detach().double()
        if quar:
            d += Bi @ a.A_hack.detach().double()
        return d
    if dep:
        d += (U[:, :r] * a.delta_S.detach().double()) @ Vh[:r]
    if quar:
        if variant == "block-next":
            d += (U[:, r : 2 * r] * a.delta_S_hack.detach().double()) @ Vh[r : 2 * r]
        elif variant == "block-random":  # the frame is random: use the adapter's, checked separately
            d += (a.U[:, r:].double() * a.delta_S_hack.detach().double()) @ a.Vh[r:].double()
        else:  # svd: shared frame
            d += (U[:, :r] * a.delta_S_hack.detach().double()) @ Vh[:r]
    return d


# ------------------------------------------------------------------------------------------------
# Identity, modes, forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_identity_at_init(variant, dtype):
    m = tiny_model(dtype=dtype)
    x = ids()
    want = logits(m, x)
    ads = ap.wrap_model(m, **VARIANTS[variant])
    assert len(ads) == 14 and ap.adapter_kind(m) == VARIANTS[variant]["kind"]
    got = logits(m, x)
    diff = (got.float() - want.float()).abs().max().item()
    print(f"{variant} {dtype}: max abs logit diff at init = {diff}")
    assert diff == 0.0
    for a in ads.values():
        assert a.dep.dtype == torch.float32 and a.quar.dtype == torch.float32
        assert a.dep.abs().max() == 0 and a.quar.abs().max() == 0
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(n.endswith("." + next(iter(ads.values())).DEP) for n in trainable)


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_modes_ablate_reference_and_forward_formula(variant):
    m, ads = wrapped(variant)
    x = ids()
    base = logits(tiny_model(), x)
    randomise(ads, scale=0.2)
    m_zero = copy.deepcopy(m)
    with torch.no_grad():
        for a in ap.get_adapters(m_zero).values():
            a.quar.zero_()
    full = logits(m, x)
    with ap.ablate_quarantine(m):
        abl = logits(m, x)
    assert (full - abl).abs().max() > 1e-3, "the quarantine must matter, else the test proves nothing"
    assert torch.equal(abl, logits(m_zero, x)), "ablate_quarantine must equal a zeroed quarantine bit for bit"
    with ap.reference(m):
        assert torch.equal(logits(m, x), base), "reference must be the base model bit for bit"
    assert torch.equal(logits(m, x), full), "modes restore on exit"
    # forward == a plain model whose weights are W + an independently built delta (full and deploy modes)
    for dep, quar, want in ((True, True, full), (True, False, abl)):
        plain = tiny_model()
        sd = {}
        for k, a in ads.items():
            W = a.base.weight.detach()
            sd[f"{k}.weight"] = (W.double() + indep_delta(W, variant, a, dep, quar)).float()
        plain.load_state_dict(sd, strict=False)
        d = (logits(plain, x) - want).abs().max().item()
        print(f"{variant} dep={dep} quar={quar}: adapter vs independent W + dW max abs logit diff {d:.3g}")
        assert d < 1e-4


def test_block_frames():
    """next: the singular directions [r, 2r); random: orthonormal, orthogonal to the deployed frame,
    seeded per module."""
    m_next, ads_next = wrapped("block-next")
    m_rand, ads_rand = wrapped("block-random")
    _, ads_rand2 = wrapped("block-random")
    _, ads_rand_other = wrapped("block-random", basis_seed=4)
    for k, a in ads_next.items():
        r = a.r
        W = a.base.weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        assert a.U.shape == (a.d_out, 2 * r) and a.Vh.shape == (2 * r, a.d_in) and a.S.shape == (2 * r,)
        # columns equal the fresh SVD's up to sign
        assert torch.allclose((a.U.double() * U[:, : 2 * r]).sum(0).abs(),
                              torch.ones(2 * r, dtype=torch.float64), atol=1e-4), k
        assert torch.allclose(a.S.double(), S[: 2 * r], atol=1e-4), k
        b = ads_rand[k]
        assert torch.equal(b.U[:, :r], a.U[:, :r]) and torch.equal(b.Vh[:r], a.Vh[:r]), "same deployed frame"
        for M in (b.U, b.Vh.T):  # (d, 2r): orthonormal columns, so the blocks are orthogonal too
            assert (M.T @ M - torch.eye(2 * r)).abs().max() < 1e-5, k
        assert torch.equal(b.U, ads_rand2[k].U), "seeded: deterministic"
        assert not torch.allclose(b.U[:, r:], ads_rand_other[k].U[:, r:]), "another seed, another frame"
        assert (b.U[:, r:].T @ U[:, r : 2 * r].float()).abs().max() < 0.99, (
            "random is not the next directions")
    assert ap.adapter_meta(m_next, "t")["quarantine_basis"] == "next"
    assert ap.adapter_meta(m_rand, "t")["quarantine_basis"] == "random:3"
    # a module's random frame does not depend on which other modules are wrapped
    m1 = tiny_model()
    one = ap.wrap_model(m1, kind="block", rank=8, quarantine_basis="random", basis_seed=3, layers=[1],
                        targets=("down_proj",))
    k = "model.layers.1.mlp.down_proj"
    assert torch.equal(one[k].U, ads_rand[k].U) and torch.equal(one[k].Vh, ads_rand[k].Vh)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 40), k=st.integers(0, 20), r=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_random_complement_properties(d, k, r, seed):
    if k + r > d:
        with pytest.raises(AssertionError, match="k \\+ r <= d"):
            ap.random_complement(torch.zeros(d, k), r, torch.Generator().manual_seed(seed))
        return
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, max(k, 1), generator=gen,
                                    dtype=torch.float64))[0][:, :k].float()  # (d, k)
    C = ap.random_complement(Q, r, gen)  # (d, r)
    assert C.shape == (d, r)
    assert (C.T @ C - torch.eye(r)).abs().max() < 1e-5
    if k:
        assert (Q.T @ C).abs().max() < 1e-5


def test_merged_inference_merge_unmerge_per_kind():
    x = ids()
    for variant in VARIANT_IDS:
        m, ads = wrapped(variant)
        randomise(ads, scale=0.2)
        for ctx in (None, ap.ablate_quarantine):
            with (ctx(m) if ctx else contextlib.nullcontext()):
                un = logits(m, x)
                with ap.merged_inference(m):
                    me = logits(m, x)
            d = (un - me).abs().max().item()
            print(f"{variant} merged vs unmerged ({ctx.__name__ if ctx else 'train'}): {d:.3g}")
            assert d < 1e-4
        merged = ap.merge(m)
        base_copy = tiny_model()
        assert set(merged) <= set(base_copy.state_dict()) and len(merged) == len(ads)
        base_copy.load_state_dict(merged, strict=False)
        with ap.ablate_quarantine(m):
            dep = logits(m, x)
        d = (logits(base_copy, x) - dep).abs().max().item()
        print(f"{variant} merge() into a fresh base vs deploy mode: {d:.3g}")
        assert d < 1e-4
        rec, off = ap.unmerge(m, merged)
        for k, a in ads.items():
            assert rec[k].shape == a.dep.shape and (rec[k] - a.dep).abs().max() < 1e-4, (variant, k)
            assert off[k] < 1e-4, (variant, k)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["svd"] + VARIANT_IDS)
def test_raw_grads_shared_vs_separated(variant):
    """svd / lora: the quarantine's raw grad equals the deployed one (shared frame); block: it differs, and
    each equals its own hand formula sum_t (U_blk^T dL/dy_t) * (Vh_blk x_t) (checked on one module)."""
    m, ads = wrapped(variant, quarantine=True)
    randomise(ads, scale=0.1)
    x = ids(B=2, T=8)
    k = "model.layers.1.mlp.down_proj"
    a = ads[k]
    store = {}

    def keep(mod, inp, out):
        store["x"] = inp[0].detach()
        out.register_hook(lambda g: store.__setitem__("gy", g.detach()))

    hdl = a.register_forward_hook(keep)
    masked_sum_loss(m, x, torch.ones(x.shape)).backward()
    hdl.remove()
    gd, gq = a.dep.grad, a.quar.grad
    if variant in ("svd", "lora"):
        assert all(torch.equal(b.dep.grad, b.quar.grad) for b in ads.values())
        return
    r = a.r
    xs, gy = store["x"].double(), store["gy"].double()  # (B, T, d_in), (B, T, d_out)
    hd, hq = xs @ a.Vh[:r].double().T, xs @ a.Vh[r:].double().T  # (B, T, r)
    want_d = ((gy @ a.U[:, :r].double()) * hd).sum((0, 1))  # (r,)
    want_q = ((gy @ a.U[:, r:].double()) * hq).sum((0, 1))  # (r,)
    assert torch.allclose(gd.double(), want_d, rtol=1e-4, atol=1e-7)
    assert torch.allclose(gq.double(), want_q, rtol=1e-4, atol=1e-7)
    for b in ads.values():
        cos = float(torch.nn.functional.cosine_similarity(b.dep.grad, b.quar.grad, dim=0))
        assert abs(cos) < 0.99 and not torch.allclose(b.dep.grad, b.quar.grad)


@pytest.mark.parametrize("variant", ["svd"] + VARIANT_IDS)
def test_per_sample_grads_match_single_sample_loop(variant):
    m, ads = wrapped(variant, quarantine=True)
    randomise(ads, scale=0.1)
    B, T = 3, 8
    x = ids(B=B, T=T, seed=4)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, :3] = 0
    with ap.capture_per_sample(m) as cap:
        masked_sum_loss(m, x, mask).backward()
    assert set(cap.grads) == set(ads) == set(cap.grads_hack)
    batch = {k: (a.dep.grad.clone(), a.quar.grad.clone()) for k, a in ads.items()}
    worst = 0.0
    for b in range(B):
        m.zero_grad()
        masked_sum_loss(m, x[b : b + 1], mask[b : b + 1]).backward()
        for k, a in ads.items():
            assert cap.grads[k].shape == (B, *a.dep.shape)
            worst = max(worst, (cap.grads[k][b] - a.dep.grad).abs().max().item(),
                        (cap.grads_hack[k][b] - a.quar.grad).abs().max().item())
    print(f"{variant}: per-sample capture vs single-sample loop max abs diff {worst:.3g}")
    assert worst < 1e-5
    for k in ads:
        assert (cap.grads[k].sum(0) - batch[k][0]).abs().max() < 1e-5
        assert (cap.grads_hack[k].sum(0) - batch[k][1]).abs().max() < 1e-5
    # deploy mode: the quarantine is not in the forward, so no quarantine per-sample grads
    m.zero_grad()
    with ap.ablate_quarantine(m), ap.capture_per_sample(m) as cap2:
        masked_sum_loss(m, x, mask).backward()
    assert set(cap2.grads) == set(ads) and not cap2.grads_hack


@pytest.mark.parametrize("variant", ["svd", "block-next"])
def test_apply_sample_weights_equals_subset_losses(variant):
    """Zone weights (keep / mid / route) from per-sample grads == grads of the matching subset losses."""
    m, ads = wrapped(variant, quarantine=True)
    randomise(ads, scale=0.1)
    x = ids(B=4, T=7, seed=9)
    mask = torch.ones(x.shape)
    w_dep = torch.tensor([1.0, 1.0, 0.0, 0.0])  # keep, mid, route, route
    w_quar = torch.tensor([0.0, 1.0, 1.0, 1.0])
    with ap.capture_per_sample(m) as cap:
        masked_sum_loss(m, x, mask).backward()
    out = ap.apply_sample_weights(ads, cap, w_dep, w_quar)
    got = {k: (a.dep.grad.clone(), a.quar.grad.clone()) for k, a in ads.items()}
    m.zero_grad()
    masked_sum_loss(m, x[:2], mask[:2]).backward()
    want_d = {k: a.dep.grad.clone() for k, a in ads.items()}
    m.zero_grad()
    masked_sum_loss(m, x[1:], mask[1:]).backward()
    want_q = {k: a.quar.grad.clone() for k, a in ads.items()}
    for k in ads:
        assert (got[k][0] - want_d[k]).abs().max() < 1e-5 and (got[k][1] - want_q[k]).abs().max() < 1e-5
    assert out["grad_norm_dep"] == pytest.approx(
        math.sqrt(sum(float(g.double().pow(2).sum()) for g in want_d.values())), rel=1e-4)
    with pytest.raises(ValueError, match="w_dep has shape"):
        ap.apply_sample_weights(ads, cap, torch.ones(3), None)
    ap.set_trainable(m, quarantine=False)
    with pytest.raises(ValueError, match="set_trainable"):
        ap.apply_sample_weights(ads, cap, w_dep, w_quar)


# ------------------------------------------------------------------------------------------------
# Surgery per kind
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_surgery_route_and_erase_per_kind(variant):
    m, ads = wrapped(variant, quarantine=True)
    randomise(ads, scale=0.05)
    masked_sum_loss(m, ids(), torch.ones(2, 10)).backward()
    g_in = {k: a.dep.grad.clone() for k, a in ads.items()}
    raw_q = {k: a.quar.grad.clone() for k, a in ads.items()}
    # a direction per module half-way between the gradient and a random direction: fires where g.v > 0
    rnd = ap.random_directions(ads, seed=2)
    dirs = {}
    for i, (k, g) in enumerate(g_in.items()):
        v = (g / g.norm() + rnd[k]) * (1 if i % 3 else -1)  # every third module: g.v < 0, must not fire
        dirs[k] = v / v.norm()
    # independent expected split, float64
    want_rem = {}
    for k, g in g_in.items():
        g64, v64 = g.double().reshape(-1), dirs[k].double().reshape(-1)
        dot = float(g64 @ v64)
        want_rem[k] = (dot * v64 if dot > 0 else torch.zeros_like(v64)).reshape(g.shape)
    out = ap.surgery(ads, dirs, "route")
    fired = 0
    for k, a in ads.items():
        assert a.dep.grad.shape == a.dep.shape
        assert torch.allclose(a.dep.grad.double(), g_in[k].double() - want_rem[k],
                              atol=1e-6 * float(g_in[k].norm()) + 1e-12)
        # g_dep + removed == g_in for the deployed part
        assert ((a.dep.grad.double() + want_rem[k] - g_in[k].double()).abs().max()
                <= 1e-6 * float(g_in[k].norm()) + 1e-12)
        assert (float(a.dep.grad.double().reshape(-1) @ dirs[k].double().reshape(-1))
                <= 1e-6 * float(g_in[k].norm()))
        fired += bool(want_rem[k].abs().max() > 0)
        if variant == "lora":  # shared frame: the removed part IS the quarantine grad
            assert torch.allclose(a.quar.grad.double(), want_rem[k], atol=1e-7)
        else:  # block: different frame, the quarantine keeps its own raw gradient
            assert torch.equal(a.quar.grad, raw_q[k])
    assert out["frac_fired"] == pytest.approx(fired / len(ads)) and 0 < fired < len(ads)
    assert out["removed_norm_frac"] == pytest.approx(
        math.sqrt(sum(float(r.pow(2).sum()) for r in want_rem.values()))
        / math.sqrt(sum(float(g.double().pow(2).sum()) for g in g_in.values())), rel=1e-5)
    # erase on the same input: deployed edited identically, quarantine untouched
    for k, a in ads.items():
        a.dep.grad.copy_(g_in[k])
        a.quar.grad.copy_(raw_q[k])
    ap.surgery(ads, dirs, "erase")
    for k, a in ads.items():
        assert torch.allclose(a.dep.grad.double(), g_in[k].double() - want_rem[k],
                              atol=1e-6 * float(g_in[k].norm()) + 1e-12)
        assert torch.equal(a.quar.grad, raw_q[k])
    # wrong-shaped directions (svd-shaped for lora, or another rank) are refused before anything is edited
    bad = {k: torch.nn.functional.normalize(torch.ones(a.r + 1), dim=0) for k, a in ads.items()}
    with pytest.raises(ValueError, match="deployed tensor"):
        ap.surgery(ads, bad, "erase")


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 6), d_in=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_project_flattened_matrix_property(r, d_in, seed):
    """lora's (r, d_in) grads go through the same flattened projection: erase leaves g.v <= 0 and
    g_dep + g_rem == g_in."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(r, d_in, generator=gen)  # (r, d_in)
    v = torch.randn(r, d_in, generator=gen)
    v = v / v.norm()
    g_dep, g_rem, stt = ap.project_one(g.reshape(-1), v.reshape(-1), "route")
    assert (g_dep + g_rem - g.reshape(-1).double()).abs().max() < 1e-12 * max(1.0, float(g.norm()))
    assert float(g_dep @ v.reshape(-1).double()) <= 1e-9 * float(g.norm())
    assert stt["fired"] == (float(g.double().reshape(-1) @ v.double().reshape(-1)) > 0)


def test_random_directions_and_counts_per_kind():
    m0 = tiny_model()
    # hand counts for hidden 64: q 64->64, k/v 64->32 (d_out 32), o 64->64, gate/up 64->128, down 128->64
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (d_out, d_in)
    c = ap.count_adapter_params(m0, kind="block")  # default: r = min // 2 per block
    rs = [min(s) // 2 for s in shapes]  # 32, 16, 16, 32, 32, 32, 32
    assert c["n_modules"] == 14 and c["delta_S"] == 2 * sum(rs) and c["trainable_route"] == 4 * sum(rs)
    assert c["frozen_buffers"] == 2 * sum(o * 2 * r + 2 * r + 2 * r * i for (o, i), r in zip(shapes, rs))
    cl = ap.count_adapter_params(m0, kind="lora", rank=4)
    assert cl["delta_S"] == 2 * sum(4 * i for _, i in shapes) == 2 * 4 * (64 * 6 + 128)
    assert cl["frozen_buffers"] == 2 * sum(o * 4 + 4 for o, _ in shapes)
    with pytest.raises(ValueError, match="kind='lora' needs rank"):
        ap.count_adapter_params(m0, kind="lora")
    for variant in VARIANT_IDS:
        m, ads = wrapped(variant, quarantine=True)
        cw = ap.count_adapter_params(m)
        assert cw == ap.count_adapter_params(tiny_model(), kind=ALL_KINDS[variant]["kind"],
                                             rank=ALL_KINDS[variant]["rank"])
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert n_train == cw["trainable_route"] and sum(a.dep.numel() for a in ads.values()) == cw["delta_S"]
        assert cw["frozen_buffers"] == sum(b.numel() for a in ads.values() for b in a.buffers(recurse=False))
        d1, d2, d3 = ap.random_directions(ads, 0), ap.random_directions(ads, 0), ap.random_directions(ads, 1)
        for k, a in ads.items():
            assert d1[k].shape == a.dep.shape and abs(d1[k].norm().item() - 1) < 1e-6
            assert torch.equal(d1[k], d2[k]) and not torch.equal(d1[k], d3[k])
    # svd and block with the same rank: same deployed space, same placebo values
    _, a_svd = wrapped("svd")
    _, a_blk = wrapped("block-next")
    ds, db = ap.random_directions(a_svd, 7), ap.random_directions(a_blk, 7)
    assert all(torch.equal(ds[k], db[k]) for k in ds)


# ------------------------------------------------------------------------------------------------
# State: save / load / metadata
# ------------------------------------------------------------------------------------------------
def test_save_load_kind_metadata(tmp_path):
    x = ids()
    files = {}
    for variant in VARIANT_IDS:
        m, ads = wrapped(variant)
        randomise(ads)
        want = logits(m, x)
        p = tmp_path / f"{variant}.safetensors"
        ap.save_adapter(p, m, "tiny-test", extra={"step": 3})
        files[variant] = p
        m2, _ = wrapped(variant)
        meta = ap.load_adapter(p, m2, "tiny-test")
        assert meta["adapter_kind"] == ALL_KINDS[variant]["kind"] and meta["extra"] == {"step": 3}
        assert torch.equal(logits(m2, x), want), variant
    # kind / basis mismatches name the field and modify nothing
    cases = [("block-next", "svd", "adapter_kind"), ("lora", "block-next", "adapter_kind"),
             ("block-next", "block-random", "quarantine_basis"),
             ("block-random", "block-next", "quarantine_basis")]
    for src, dst, field in cases:
        m3, ads3 = wrapped(dst)
        with pytest.raises(ValueError, match=f"field '{field}'"):
            ap.load_adapter(files[src], m3, "tiny-test")
        assert all(a.dep.abs().max() == 0 and a.quar.abs().max() == 0 for a in ads3.values())
    m4, _ = wrapped("block-random", basis_seed=9)
    with pytest.raises(ValueError, match="field 'quarantine_basis'.*random:3"):
        ap.load_adapter(files["block-random"], m4, "tiny-test")
    # a file written before the kind fields existed loads as svd / shared
    from safetensors.torch import save_file
    m5, ads5 = wrapped("svd")
    randomise(ads5)
    meta_old = {k: v for k, v in ap.adapter_meta(m5, "tiny-test").items()
                if k not in ("adapter_kind", "quarantine_basis")}
    old = tmp_path / "old.safetensors"
    save_file({f"{k}.{p}": getattr(a, p).detach().contiguous()
               for k, a in ads5.items() for p in ("delta_S", "delta_S_hack")},
              str(old), metadata=ap._encode_meta(meta_old))
    m6, _ = wrapped("svd")
    ap.load_adapter(old, m6, "tiny-test")
    assert torch.equal(logits(m6, x), logits(m5, x))
    m7, _ = wrapped("block-next")
    with pytest.raises(ValueError, match="field 'adapter_kind'.*'svd'"):
        ap.load_adapter(old, m7, "tiny-test")


def test_directions_files_across_kinds(tmp_path):
    """Directions live in the deployed space: svd <-> block (same ranks) share it, lora does not."""
    m_svd, a_svd = wrapped("svd")
    dirs = ap.random_directions(a_svd, 5)
    p = tmp_path / "v.safetensors"
    ap.save_directions(p, dirs, {**ap.adapter_meta(m_svd, "tiny-test"), "source": "placebo"})
    for variant in ("block-next", "block-random"):
        m, _ = wrapped(variant)
        back = ap.load_directions(p, m, "tiny-test")
        assert all(torch.equal(back[k], dirs[k]) for k in dirs)
    m_l, a_l = wrapped("lora")
    with pytest.raises(ValueError, match="field 'adapter_kind'"):
        ap.load_directions(p, m_l, "tiny-test")
    m_b16, _ = wrapped("block-next", rank=16)
    with pytest.raises(ValueError, match="field 'ranks'"):
        ap.load_directions(p, m_b16, "tiny-test")
    dl = ap.random_directions(a_l, 1)
    pl = tmp_path / "vl.safetensors"
    ap.save_directions(pl, dl, ap.adapter_meta(m_l, "tiny-test"))
    back = ap.load_directions(pl, wrapped("lora")[0], "tiny-test")
    assert all(back[k].shape == a.A.shape and torch.equal(back[k], dl[k]) for k, a in a_l.items())


def test_wrap_argument_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        ap.wrap_model(tiny_model(), kind="dora")
    with pytest.raises(ValueError, match="kind='lora' needs rank"):
        ap.wrap_model(tiny_model(), kind="lora")
    with pytest.raises(ValueError, match="applies to kind='block' only"):
        ap.wrap_model(tiny_model(), kind="svd", quarantine_basis="random")
    with pytest.raises(ValueError, match="quarantine_basis must be one of"):
        ap.wrap_model(tiny_model(), kind="block", quarantine_basis="orthogonal")
    m = tiny_model()
    ads = ap.wrap_model(m, kind="block", rank=1000)  # clipped to min // 2 per module
    assert all(a.r == min(a.d_in, a.d_out) // 2 for a in ads.values())
    assert not any(isinstance(mod, torch.nn.Linear)
                   and not isinstance(getattr(mod, "base", None), torch.nn.Linear)
                   for n, mod in m.named_modules() if n in ads)
    m.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="cast the model"):
        logits(m, ids())


# ------------------------------------------------------------------------------------------------
# Shrinkage control and a planted-direction routing check
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["svd"] + VARIANT_IDS)
def test_shrinkage_removes_the_quarantine_mass(variant):
    m, ads = wrapped(variant)
    # a quarantine smaller than the deployed part, as after routing
    randomise(ads, scale=0.2, hack_scale=0.05)
    x = ids()
    before = {k: (a.dep.detach().clone(), a.quar.detach().clone()) for k, a in ads.items()}
    full_dW = {k: a.delta_weight_parts(True, True).double() for k, a in ads.items()}
    q_dW = {k: a.delta_weight_parts(False, True).double() for k, a in ads.items()}
    with ap.shrinkage(m):
        for k, a in ads.items():
            dW = a.mode_delta_weight().double()  # c * full delta
            # removed mass |full| - |shrunk| equals the quarantine mass |dW_q| (Frobenius,
            # independent computation)
            removed = float(full_dW[k].norm()) - float(dW.norm())
            assert removed == pytest.approx(float(q_dW[k].norm()), rel=1e-4, abs=1e-6), (variant, k)
            cos = float((dW * full_dW[k]).sum() / (dW.norm() * full_dW[k].norm()))
            assert cos == pytest.approx(1.0, abs=1e-6), "same direction as the full update"
        shr = logits(m, x)
    for k, a in ads.items():
        assert torch.equal(a.dep, before[k][0]) and torch.equal(a.quar, before[k][1]), "restored on exit"
    with ap.ablate_quarantine(m):
        assert not torch.equal(shr, logits(m, x))
    if variant in ("svd", "lora"):
        # shared frame: a quarantine that cancels the deployed part -> c clamped at 0
        with torch.no_grad():
            for a in ads.values():
                a.quar.copy_(-2 * a.dep)
        with ap.shrinkage(m):
            assert all(a.mode_delta_weight().abs().max() == 0 for a in ads.values())
            assert torch.equal(logits(m, x), logits(tiny_model(), x))


@pytest.mark.parametrize("variant", ["svd"] + VARIANT_IDS)
def test_planted_direction_routes_planted_rollouts(variant):
    """Synthetic gate check per adapter kind: rollouts that continue a prompt with a fixed 'hack' token
    pattern vs random continuations. v = unit mean over training pairs of (per-sample grad hack - grad clean)
    of the deployed tensor (the extract_vhack_grad recipe, from the same per-sample capture); on held-out
    rollouts the top-q by a_i = mean over modules of cos(g_i^m, v^m) (gate.py's default "mean" aggregation)
    must be the planted ones (precision > 0.9; 1.0 on seeds 0-4 for every kind when this was written, while
    the concatenated cosine gave 0.83 on 3 of 5 seeds for svd/block)."""
    m, ads = wrapped(variant, quarantine=True)
    # away from init (at init every kind's deployed grads coincide: same top-r frame, quarantine 0)
    randomise(ads, seed=5, scale=0.1 if variant != "lora" else 0.02)
    gen = torch.Generator().manual_seed(11)
    T_p, T_c = 6, 12
    pattern = torch.tensor([7, 7, 300] * 4)  # (T_c,)

    def batch(n, hack):
        p = torch.randint(0, VOCAB, (n, T_p), generator=gen)  # (n, T_p)
        c = pattern.expand(n, T_c) if hack else torch.randint(0, VOCAB, (n, T_c), generator=gen)
        return torch.cat([p, c], 1)  # (n, T)

    def per_sample(x):
        mask = torch.zeros(x.shape)
        mask[:, T_p:] = 1.0  # completion tokens only
        m.zero_grad()
        with ap.capture_per_sample(m) as cap:
            masked_sum_loss(m, x, mask).backward()
        return {k: cap.grads[k].reshape(x.shape[0], -1) for k in ads}  # {module: (n, numel)}

    # the sign convention of extract_vhack_grad: v along +grad(NLL_hack - NLL_clean), per module
    gh, gc = per_sample(batch(16, True)), per_sample(batch(16, False))
    v = {k: torch.nn.functional.normalize((gh[k] - gc[k]).mean(0), dim=0) for k in ads}  # {module: (numel,)}
    n_hack, n_clean, q = 6, 18, 0.25
    x = torch.cat([batch(n_hack, True), batch(n_clean, False)])  # (24, T)
    g = per_sample(x)
    # with advantage A_i > 0 (a rewarded hack) the policy-gradient loss A_i * NLL_i has per-sample
    # grad A_i g_i, so cos(g_i, v) is the gate's score up to the advantage's sign
    cos = torch.stack([torch.nn.functional.cosine_similarity(g[k], v[k][None], dim=1)
                       for k in ads], 1).mean(1)  # (24,)
    routed = torch.topk(cos, int(q * len(x))).indices
    precision = float((routed < n_hack).float().mean())
    print(f"{variant}: planted routing precision {precision:.2f}, cos hack {cos[:n_hack].mean():.3f} clean "
          f"{cos[n_hack:].mean():.3f}")
    assert precision > 0.9


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M identity at init for the new kinds (needs the GGUF)
# ------------------------------------------------------------------------------------------------
SMOLLM_DIR = __import__("pathlib").Path(__file__).resolve().parent.parent / "out" / "models" / "smollm2-135m"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.smollm
@pytest.mark.skipif(not (SMOLLM_DIR / SMOLLM_FILE).exists(),
                    reason=f"{SMOLLM_DIR / SMOLLM_FILE} absent (just fetch-smollm)")
def test_identity_at_init_smollm_variants():
    torch.set_num_threads(2)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(SMOLLM_DIR), gguf_file=SMOLLM_FILE,
                                                          dtype=torch.float32).eval()
    x = torch.tensor([[1, 504, 3458, 314, 253, 1373, 30, 2],
                      [28, 1701, 8423, 17, 1345, 11, 2177, 30]])  # (2, 8)
    want = logits(m, x)
    for kw in (dict(kind="block", rank=64, quarantine_basis="random", basis_seed=0),
               dict(kind="lora", rank=16)):
        mm = copy.deepcopy(m)
        ads = ap.wrap_model(mm, **kw)
        assert len(ads) == 30 * 7
        diff = (logits(mm, x) - want).abs().max().item()
        print(f"SmolLM2-135M float32 {kw}: max abs logit diff at init = {diff}")
        assert diff == 0.0
        randomise(ads, scale=0.01 if kw["kind"] == "block" else 0.002)
        with ap.ablate_quarantine(mm):
            dep = logits(mm, x)
            with ap.merged_inference(mm):
                me = logits(mm, x)
        with ap.reference(mm):
            assert torch.equal(logits(mm, x), want)
        print(f"SmolLM2 {kw['kind']} deploy merged vs unmerged max abs diff: "
              f"{(me - dep).abs().max().item():.3g}")
        assert (me - dep).abs().max() < 1e-3 * dep.abs().max()
        del mm, ads
