"""Tests for extract_vhack_grad.py and scripts/verify_vhack_heldout.py on the tiny-random model.

    .venv/bin/python -m pytest tests/test_vhack.py -q

- encoding: prompt via the chat template, completion tokens end with the end-of-turn token;
- the batched per-sample delta_S gradients equal an independent batch-1 reference built on the HF
  `labels=` loss and plain autograd (no hooks), padding included;
- planted direction: at delta_S = 0 the forward does not depend on the adapter basis (U, Vh), and
  dL/d delta_S_k = u_k^T (dL/dW) v_k. Choosing (U, V) from the mean weight-gradient difference plants a
  chosen unit vector p as the exact answer; the pipeline must recover it (cos > 0.9, in fact ~1);
- aggregation (mean / svd with majority sign) on synthetic differences;
- metadata mismatch (model id, dtype, ranks, module keys) raises a ValueError naming the field;
- the verify script's statistics, Haar baseline and exit code.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import antipasto
import extract_vhack_grad as ex
import models
import pairs as pairs_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import verify_vhack_heldout as vv  # noqa: E402

torch.set_num_threads(1)
RANK = 8
TINY = "tiny-random"


@pytest.fixture(scope="module")
def tiny():
    model, tok = models.load_model(TINY)
    return model.eval(), tok


@pytest.fixture(scope="module")
def few_pairs():
    return pairs_mod.load_pairs(select="@id=ow01|sc01|hc01|ae01")


def hf_side_loss(model, ids: list[int], n_prompt: int, norm_const: float) -> torch.Tensor:
    """Independent reference loss: HF's own causal-LM loss (mean over labelled tokens) x count / C."""
    x = torch.tensor([ids])
    labels = x.clone()
    labels[:, :n_prompt] = -100  # label position t is predicted from t-1 inside HF's shift
    out = model(input_ids=x, labels=labels)
    return out.loss * (len(ids) - n_prompt) / norm_const


# -------------------------------------------------------------------------------------------- encoding / loss
def test_encode_side(tiny, few_pairs):
    _, tok = tiny
    p = few_pairs[0]
    ids, n = pairs_mod.encode_side(tok, p, "hack")
    assert ids[:n] == models.chat_ids(tok, pairs_mod.pair_messages(p))
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[n:-1]
    assert tok.decode(ids[n:-1]) == p.hack
    ids_c, n_c = pairs_mod.encode_side(tok, p, "clean")
    assert n_c == n and tok.decode(ids_c[n:-1]) == p.clean
    with pytest.raises(AssertionError, match="side must be"):
        pairs_mod.encode_side(tok, p, "both")


def test_completion_nll_matches_hf_loss(tiny, few_pairs):
    model, tok = tiny
    seqs = [pairs_mod.encode_side(tok, p, s) for p in few_pairs[:2] for s in ("hack", "clean")]
    T = max(len(i) for i, _ in seqs)
    ids = torch.tensor([i + [0] * (T - len(i)) for i, _ in seqs])  # (B, T) right-padded
    attn = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in seqs])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        got = ex.completion_nll(logits, ids, torch.tensor([n for _, n in seqs]),
                                torch.tensor([len(i) for i, _ in seqs]), 100.0)
        want = torch.stack([hf_side_loss(model, i, n, 100.0) for i, n in seqs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- gradients
def reference_diffs(base_model, tok, plist, norm_const: float, rank: int) -> dict[str, torch.Tensor]:
    """Batch-1 hack-minus-clean delta_S grads via plain autograd (hooks off) on a freshly wrapped copy."""
    m = copy.deepcopy(base_model)
    ads = antipasto.wrap_model(m, rank=rank)
    rows: dict[str, list] = {k: [] for k in ads}
    for p in plist:
        g = {}
        for side in ("hack", "clean"):
            m.zero_grad(set_to_none=True)
            ids, n = pairs_mod.encode_side(tok, p, side)
            hf_side_loss(m, ids, n, norm_const).backward()
            g[side] = {k: a.delta_S.grad.detach().clone() for k, a in ads.items()}
        for k in ads:
            rows[k].append(g["hack"][k] - g["clean"][k])
    return {k: torch.stack(v) for k, v in rows.items()}


def test_batched_per_sample_grads_equal_batch1_reference(tiny, few_pairs):
    model, tok = tiny
    m = copy.deepcopy(model)
    antipasto.wrap_model(m, rank=RANK)
    # 6 sequences, padded
    got = ex.pair_diffs(m, tok, few_pairs[:3], batch_size=3, norm_const=64.0, progress=False)
    want = reference_diffs(model, tok, few_pairs[:3], 64.0, RANK)
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == (3, RANK)
        torch.testing.assert_close(got[k], want[k], rtol=2e-3, atol=1e-6 + 2e-3 * float(want[k].abs().max()))
    # and the differences are not trivially zero
    assert all(float(v.norm()) > 0 for v in want.values())


def weight_grad_diff_mean(base_model, tok, plist, norm_const: float) -> dict[str, torch.Tensor]:
    """Mean over pairs of dL_hack/dW - dL_clean/dW for every targeted Linear (plain autograd, no adapter)."""
    m = copy.deepcopy(base_model)
    lin = antipasto.select_linears(m)
    for p_ in m.parameters():
        p_.requires_grad_(False)
    for l in lin.values():
        l.weight.requires_grad_(True)
    acc = {k: torch.zeros_like(l.weight) for k, l in lin.items()}
    for p in plist:
        for side, sign in (("hack", 1.0), ("clean", -1.0)):
            m.zero_grad(set_to_none=True)
            ids, n = pairs_mod.encode_side(tok, p, side)
            hf_side_loss(m, ids, n, norm_const).backward()
            for k, l in lin.items():
                acc[k] += sign * l.weight.grad / len(plist)
    return acc


def plant_basis(ad, G: torch.Tensor, p: torch.Tensor) -> None:
    """Set the adapter's (U, Vh) so that diag(U^T G V) = c p for a c > 0 (U, V orthonormal columns).

    With G = A diag(s) B^T: v_k = b_k, u_k = cos(t_k) a_k + sin(t_k) a_{r+k}, so u_k^T G v_k = cos(t_k) s_k.
    """
    r = ad.r
    A, s, Bh = torch.linalg.svd(G.double(), full_matrices=False)
    assert A.shape[1] >= 2 * r, "plant_basis needs min(d_out, d_in) >= 2r"
    c = 0.9 * float((s[:r] / p.double().abs().clamp_min(1e-12)).min())
    ct = (c * p.double() / s[:r]).clamp(-1, 1)  # (r,) cos(t_k)
    st = torch.sqrt(1 - ct**2)
    U = A[:, :r] * ct + A[:, r : 2 * r] * st  # (d_out, r)
    with torch.no_grad():
        ad.U.copy_(U.to(ad.U.dtype))
        ad.Vh.copy_(Bh[:r].to(ad.Vh.dtype))  # (r, d_in)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=U.dtype), atol=1e-8, rtol=0)


def test_planted_direction_is_recovered(tiny, tmp_path):
    model, tok = tiny
    plist = pairs_mod.load_pairs(select="@id=ow02|sc02|te01|wa01")
    Gbar = weight_grad_diff_mean(model, tok, plist, 256.0)
    m = copy.deepcopy(model)
    ads = antipasto.wrap_model(m, rank=RANK)
    gen = torch.Generator().manual_seed(123)
    planted = {}
    for k, a in ads.items():
        planted[k] = F.normalize(torch.randn(RANK, generator=gen), dim=0)
        x = torch.randn(3, 7, a.d_in)
        with torch.no_grad():
            before = a(x)
            plant_basis(a, Gbar[k], planted[k])
            assert torch.equal(a(x), before), "at delta_S = 0 the basis must not change the forward"
    cfg = ex.ExtractConfig(model=TINY, select="@id=ow02|sc02|te01|wa01", method="mean", rank=RANK,
                           batch_size=2, out_dir=str(tmp_path), name="planted", save_diffs=False)
    path, _ = ex.extract(cfg, model=m, tokenizer=tok, progress=False)
    v = antipasto.load_directions(path, m, models.model_id(TINY))
    cos = torch.tensor([float(v[k] @ planted[k]) for k in ads])
    assert float(cos.min()) > 0.9, f"planted direction not recovered: min cos {float(cos.min()):.4f}"
    assert float(cos.mean()) > 0.999, (
        f"mean cos {float(cos.mean()):.5f} (the construction is exact up to float error)")
    # the flipped plant is recovered as flipped: the sign convention is hack minus clean
    for k, a in ads.items():
        with torch.no_grad():
            a.U.neg_()
    path2, _ = ex.extract(ex.ExtractConfig(**{**cfg.__dict__, "name": "planted_neg"}), model=m, tokenizer=tok,
                          progress=False)
    v2 = antipasto.load_directions(path2, m, models.model_id(TINY))
    assert max(float(v2[k] @ planted[k]) for k in ads) < -0.9


# ---------------------------------------------------------------------------------------------- aggregation
def test_aggregate_mean_and_svd_recover_planted_rows():
    g = torch.Generator().manual_seed(0)
    r, n = 32, 40
    p = F.normalize(torch.randn(r, generator=g), dim=0)
    scales = 0.5 + torch.rand(n, generator=g)  # (n,) positive
    scales[:5] *= -1  # a minority of pairs point the other way
    D = scales[:, None] * p[None] + 0.3 * torch.randn(n, r, generator=g)  # (n, r)
    for method in ("mean", "svd"):
        v = ex.aggregate(D, method)
        assert abs(float(v.norm()) - 1) < 1e-5
        assert float(v @ p) > 0.9, (method, float(v @ p))
    # svd orientation follows the majority even when the minority is much larger
    D2 = torch.cat([p[None].repeat(6, 1), -10 * p[None].repeat(4, 1)])
    assert float(ex.aggregate(D2, "svd") @ p) > 0.999
    assert float(ex.aggregate(D2, "mean") @ p) < -0.999  # the mean follows the mass instead
    assert float(ex.aggregate(-D, "svd") @ p) < -0.9
    with pytest.raises(ValueError, match="method"):
        ex.aggregate(D, "median")
    with pytest.raises(AssertionError, match="norm"):
        ex.aggregate(torch.zeros(3, r), "mean")


# ---------------------------------------------------------------------------------------------- metadata
def test_extract_metadata_and_mismatch_errors(tiny, tmp_path):
    model, tok = tiny
    m = copy.deepcopy(model)
    cfg = ex.ExtractConfig(model=TINY, select="@id=ow01|hc01", rank=RANK, batch_size=2, out_dir=str(tmp_path),
                           name="meta", method="svd")
    path, summary = ex.extract(cfg, model=m, tokenizer=tok, progress=False)
    meta, tensors = antipasto._read_file(path)
    for f in ("model_id", "dtype", "module_keys", "ranks", "pair_set", "n_pairs", "method", "git_sha"):
        assert f in meta, f
    assert (meta["model_id"] == models.model_id(TINY) and meta["dtype"] == "float32"
            and meta["method"] == "svd")
    assert (meta["n_pairs"] == 2 and meta["pair_set"] == "@id=ow01|hc01"
            and meta["ranks"] == [RANK] * len(meta["module_keys"]))
    assert list(tensors) == meta["module_keys"] or set(tensors) == set(meta["module_keys"])
    for t in tensors.values():
        assert t.dtype == torch.float32 and t.shape == (RANK,) and abs(float(t.norm()) - 1) < 1e-5
    assert Path(path).with_suffix(".diffs.pt").is_file() and Path(path).with_suffix(".json").is_file()
    # re-aggregating the saved differences with another method needs no model
    saved = torch.load(Path(path).with_suffix(".diffs.pt"), weights_only=False)
    re_path, _ = ex.extract(ex.ExtractConfig(model=TINY, method="mean",
                                             from_diffs=str(Path(path).with_suffix(".diffs.pt")),
                                             out_dir=str(tmp_path), name="re"))
    re_meta, re_t = antipasto._read_file(re_path)
    assert (re_meta["method"] == "mean" and re_meta["module_keys"] == meta["module_keys"]
            and re_meta["ranks"] == meta["ranks"])
    for k in meta["module_keys"]:
        torch.testing.assert_close(re_t[k], ex.aggregate(saved["diffs"][k], "mean"))

    ok = copy.deepcopy(model)
    antipasto.wrap_model(ok, rank=RANK)
    assert set(antipasto.load_directions(path, ok, models.model_id(TINY))) == set(meta["module_keys"])
    with pytest.raises(ValueError, match="model_id"):
        antipasto.load_directions(path, ok, "HuggingFaceTB/SmolLM2-135M-Instruct")
    other_rank = copy.deepcopy(model)
    antipasto.wrap_model(other_rank, rank=4)
    with pytest.raises(ValueError, match="ranks"):
        antipasto.load_directions(path, other_rank, models.model_id(TINY))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    antipasto.wrap_model(bf16, rank=RANK)
    with pytest.raises(ValueError, match="dtype"):
        antipasto.load_directions(path, bf16, models.model_id(TINY))
    fewer = copy.deepcopy(model)
    antipasto.wrap_model(fewer, targets=("q_proj",), rank=RANK)
    with pytest.raises(ValueError, match="module_keys"):
        antipasto.load_directions(path, fewer, models.model_id(TINY))


def test_extract_is_deterministic(tiny, tmp_path):
    model, tok = tiny
    outs = []
    for i in range(2):
        m = copy.deepcopy(model)
        cfg = ex.ExtractConfig(model=TINY, select="@id=ae01|wa01", rank=RANK, batch_size=1 + i,
                               out_dir=str(tmp_path), name=f"det{i}", save_diffs=False)
        path, _ = ex.extract(cfg, model=m, tokenizer=tok, progress=False)
        outs.append(antipasto._read_file(path)[1])
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-5)  # batch size does not matter


# ---------------------------------------------------------------------------------------------- verify
def test_random_baseline_and_cos_matrix():
    g = torch.Generator().manual_seed(1)
    D = {"a": torch.randn(10, 16, generator=g), "b": torch.randn(10, 4, generator=g)}
    dirs = {"a": F.normalize(D["a"].mean(0), dim=0), "b": F.normalize(torch.ones(4), dim=0)}
    C = vv.cos_matrix(D, dirs)
    assert C.shape == (10, 2)
    assert math.isclose(float(C[3, 1]), float(D["b"][3].sum() / (2 * D["b"][3].norm())), rel_tol=1e-5)
    rb = vv.random_baseline(D, 400, seed=0)
    assert rb["median"].shape == (400,) and abs(float(rb["median"].mean())) < 0.05
    assert 0.4 < float(rb["frac_pos"].mean()) < 0.6
    # a direction equal to every row: cos 1 everywhere
    same = {"a": F.normalize(torch.ones(16), dim=0)}
    s = vv.stats(vv.cos_matrix({"a": torch.ones(5, 16) * torch.arange(1, 6)[:, None]}, same))
    assert s == {"n": 5, "frac_pos": 1.0, "mean": pytest.approx(1.0), "median": pytest.approx(1.0)}


def test_verify_passes_for_a_good_direction_and_fails_for_its_negative(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    m = copy.deepcopy(model)
    antipasto.wrap_model(m, rank=RANK)
    held = pairs_mod.load_pairs(select="heldout_within")[:1]
    D = ex.pair_diffs(m, tok, held, batch_size=1, norm_const=256.0, progress=False)
    # the held-out pair's own difference: cos 1 by construction
    good = {k: ex.aggregate(D[k], "mean") for k in D}
    meta = antipasto.adapter_meta(m, models.model_id(TINY))
    meta.update(pair_set="test", n_pairs=0, method="mean", pair_ids=[], norm_const=256.0)
    antipasto.save_directions(tmp_path / "good.safetensors", good, meta)
    antipasto.save_directions(tmp_path / "bad.safetensors", {k: -v for k, v in good.items()}, meta)
    base = dict(model=TINY, splits=("heldout_within",), require=("heldout_within",), max_pairs=1,
                batch_size=1, n_random=200)
    r = vv.verify(vv.VerifyConfig(vhack=str(tmp_path / "good.safetensors"), **base), model=m, tokenizer=tok,
                  progress=False)
    s = r["splits"]["heldout_within"]
    assert r["pass"] and s["frac_pos"] == 1.0 and s["median"] > s["random_median_threshold"]
    assert s["median"] == pytest.approx(1.0, abs=1e-4) and s["random_median_threshold"] < 0.5
    assert set(s["per_mode"]) == {p.mode for p in held} and len(s["per_pair_global_cos"]) == 1
    assert "heldout_within" in vv.to_markdown(r)
    # cached held-out differences (extract --save-diffs) give the same numbers without touching a model
    cx = ex.ExtractConfig(model=TINY, select=f"@id={held[0].id}", rank=RANK, batch_size=1,
                          out_dir=str(tmp_path), name="held")
    ex.extract(cx, model=copy.deepcopy(model), tokenizer=tok, progress=False)
    def no_model(*a, **k):
        raise AssertionError("verify loaded a model although the differences were cached")
    monkeypatch.setattr(vv.models, "load_model", no_model)
    r2 = vv.verify(vv.VerifyConfig(vhack=str(tmp_path / "good.safetensors"),
                                   diffs=(str(tmp_path / "held.diffs.pt"),), **base))
    s2 = r2["splits"]["heldout_within"]
    assert s2["median"] == pytest.approx(s["median"], abs=1e-4) and s2["frac_pos"] == s["frac_pos"]
    monkeypatch.undo()
    code = vv.main(vv.VerifyConfig(vhack=str(tmp_path / "bad.safetensors"), **base))
    assert code == 1
    assert (tmp_path / "bad.verify.json").is_file() and (tmp_path / "bad.verify.md").is_file()
    # a v_hack extracted from a pair must not be verified on that pair
    meta["pair_ids"] = [held[0].id]
    antipasto.save_directions(tmp_path / "leak.safetensors", good, meta)
    with pytest.raises(AssertionError, match="extracted from"):
        vv.verify(vv.VerifyConfig(vhack=str(tmp_path / "leak.safetensors"), **base), model=m, tokenizer=tok,
                  progress=False)
