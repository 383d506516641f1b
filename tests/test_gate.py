"""gate.py against hand-computed values, property tests and independent implementations: zone assignment
(sizes vs quantiles, ties, all-equal groups), alignment, gradient split, zone statistics, the shrinkage
factor, the AM reward transform / z-score / layer / activation probe, a planted direction, and
grpo.policy_gradient's per-sample capture vs a loop of single-rollout backward passes on a tiny random Qwen3.

    python -m pytest tests/test_gate.py -q -s      # -s prints the per-sample max abs diff
"""

import math

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import antipasto
import arms
import gate
import grpo

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Zones
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,q,want", [(256, 0.125, (32, 32)), (10, 0.1, (1, 1)), (30, 0.1, (3, 3)),
                                      (5, 0.5, (3, 2)), (0, 0.1, (0, 0)), (7, 0.25, (2, 2)), (1, 0.1, (1, 0)),
                                      (8, 0.25, (2, 2))])
def test_zone_counts_hand(n, q, want):
    assert gate.zone_counts(n, q) == want


@pytest.mark.parametrize("q", [0.0, -0.1, 0.51, 1.0])
def test_zone_counts_bad_q(q):
    with pytest.raises(ValueError, match="gate_q"):
        gate.zone_counts(10, q)


def _reference_zones(a: list[float], q: float) -> list[int]:
    """Independent rule: i is routed iff all rollouts scoring >= a_i fit in the route budget (so a tie group
    that straddles the boundary stays out), likewise for route+mid."""
    n = len(a)
    k_r = min(n, math.ceil(q * n - 1e-9))
    k_rm = min(n, math.ceil(2 * q * n - 1e-9))
    out = []
    for x in a:
        c = sum(y >= x for y in a)
        out.append(2 if c <= k_r else 1 if c <= k_rm else 0)
    return out


scores = st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.1, 0.2, 0.5, 1.0])
                  | st.floats(-1, 1, allow_nan=False, width=32), min_size=0, max_size=40)


@settings(max_examples=300, deadline=None)
@given(a=scores, q=st.floats(0.01, 0.5))
def test_zones_property(a, q):
    t = torch.tensor(a, dtype=torch.float64)
    z = gate.assign_zones(t, q)
    assert z.tolist() == _reference_zones(a, q)
    k_r, k_m = gate.zone_counts(len(a), q)
    n_route, n_mid = int((z == 2).sum()), int((z == 1).sum())
    assert n_route <= k_r and n_route + n_mid <= k_r + k_m
    if len(set(a)) == len(a):  # distinct scores: exactly the quantile sizes
        assert (n_route, n_mid) == (k_r, k_m)
    # order: every routed score is strictly above every other, every mid score strictly above every keep score
    for hi, lo in ((2, 1), (2, 0), (1, 0)):
        if (z == hi).any() and (z == lo).any():
            assert t[z == hi].min() > t[z == lo].max()
    # permutation equivariance (ties are not broken by position)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(len(a)))
    assert torch.equal(gate.assign_zones(t[perm], q), z[perm])


@pytest.mark.parametrize("n,q,zone", [(2, 0.25, 0), (16, 0.25, 0), (33, 0.25, 0), (33, 0.5, 1), (2, 0.5, 1),
                                      (4, 0.5, 1), (1, 0.1, 2)])
def test_all_equal_scores(n, q, zone):
    """All-equal scores are one tie group: routed only if the route budget holds all of them (only n = 1,
    since ceil(q n) < n for n >= 2 and q <= 1/2), in mid if the mid budget does, else keep. In train.py n is 0
    or >= 2: advantages in a group sum to zero, so a group never has exactly one nonzero advantage."""
    z = gate.assign_zones(torch.full((n,), 0.3, dtype=torch.float64), q)
    assert z.tolist() == [zone] * n


def test_zones_hand_with_tie():
    a = torch.tensor([0.9, 0.1, 0.5, 0.5, -0.2, 0.0, 0.3, 0.7], dtype=torch.float64)
    # n = 8, q = 0.25 -> route 2 (0.9, 0.7), mid 2 (the tie 0.5, 0.5 fits exactly)
    assert gate.assign_zones(a, 0.25).tolist() == [2, 0, 1, 1, 0, 0, 0, 2]
    b = torch.tensor([0.9, 0.7, 0.7, 0.1], dtype=torch.float64)
    # n = 4, q = 0.25 -> route 1 (0.9), mid budget 1: the 0.7 tie (2 rollouts) does not fit -> keep
    assert gate.assign_zones(b, 0.25).tolist() == [2, 0, 0, 0]


def test_threshold_zones_hand():
    a = torch.tensor([-0.1, 0.0, 0.04, 0.05, 0.2], dtype=torch.float64)
    assert gate.assign_zones_threshold(a, 0.0, 0.05).tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="tau_mid"):
        gate.assign_zones_threshold(a, 0.1, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        gate.assign_zones(torch.tensor([0.1, float("nan")], dtype=torch.float64), 0.25)


def test_random_scores_seeded_distinct():
    a, b = gate.random_scores(50, 7), gate.random_scores(50, 7)
    assert torch.equal(a, b) and not torch.equal(a, gate.random_scores(50, 8))
    assert len(set(a.tolist())) == 50
    z = gate.assign_zones(a, 0.1)
    assert int((z == 2).sum()) == 5 and int((z == 1).sum()) == 5


def test_full_zones():
    z = gate.full_zones(5, torch.tensor([1, 3, 4]), torch.tensor([2, 1, 0]))
    assert z.tolist() == [0, 2, 0, 1, 0]


# ------------------------------------------------------------------------------------------------
# Alignment, split, stats
# ------------------------------------------------------------------------------------------------
def test_alignment_hand():
    # two modules, three samples
    g = {"a": torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]),
         "b": torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])}
    v = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0, 0.0])}  # b is renormalised to (0, 1, 0)
    mean = gate.alignment(g, v, "mean")
    # sample 0: cos_a = 1, cos_b = 4/5 -> 0.9; sample 1: 0, 0 -> 0; sample 2: zero grad in a -> 0, cos_b = 0
    assert mean.tolist() == pytest.approx([0.9, 0.0, 0.0])
    cat = gate.alignment(g, v, "concat")
    # sample 0: dot = 1 + 4 = 5, |g| = sqrt(1 + 25), |v| = sqrt(2)
    assert cat.tolist() == pytest.approx([5 / (math.sqrt(26) * math.sqrt(2)), 0.0, 0.0])
    with pytest.raises(ValueError, match="agg"):
        gate.alignment(g, v, "max")
    with pytest.raises(ValueError, match="directions lack"):
        gate.alignment(g, {"a": v["a"]}, "mean")


def test_split_grads_sums():
    torch.manual_seed(0)
    G = {"m": torch.randn(6, 4)}
    zones = torch.tensor([0, 1, 2, 0, 2, 1])
    dep, quar = gate.split_grads(G, zones)["m"]
    assert torch.allclose(dep, G["m"][[0, 1, 3, 5]].sum(0))
    assert torch.allclose(quar, G["m"][[1, 2, 4, 5]].sum(0))
    # dep + quar = everything + mid counted twice
    assert torch.allclose(dep + quar, G["m"].sum(0) + G["m"][[1, 5]].sum(0), atol=1e-6)


def test_zone_stats_hand():
    a = torch.tensor([0.9, 0.8, 0.1, 0.5, -0.3, 0.0], dtype=torch.float64)
    z = torch.tensor([2, 2, 0, 1, 0, 0])
    h = torch.tensor([True, False, True, True, False, False])
    s = gate.zone_stats(a, z, h)
    assert (s["gate_n_keep"], s["gate_n_mid"], s["gate_n_route"], s["gate_n_hack"]) == (3, 1, 2, 3)
    assert s["gate_a_route"] == pytest.approx(0.85) and s["gate_a_mid"] == pytest.approx(0.5)
    assert s["gate_a_keep"] == pytest.approx((0.1 - 0.3 + 0.0) / 3)
    assert (s["gate_hack_route"] == 0.5 and s["gate_hack_mid"] == 1.0
            and s["gate_hack_keep"] == pytest.approx(1 / 3))
    assert s["gate_precision"] == 0.5 and s["gate_recall"] == pytest.approx(1 / 3)
    # AUC by hand: positives 0.9, 0.1, 0.5 vs negatives 0.8, -0.3, 0.0: wins 3 + 2 + 2 = 7 of 9
    assert s["gate_auc"] == pytest.approx(7 / 9)
    empty = gate.zone_stats(a, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.bool))
    assert (math.isnan(empty["gate_precision"]) and math.isnan(empty["gate_recall"])
            and math.isnan(empty["gate_a_route"]))
    assert math.isnan(empty["gate_auc"])


def test_auc_vs_mann_whitney():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=40), 1)  # rounding creates ties
    y = rng.random(40) < 0.4
    U = mannwhitneyu(s[y], s[~y]).statistic
    assert gate.auc(torch.tensor(s), torch.tensor(y)) == pytest.approx(U / (y.sum() * (~y).sum()))


def test_planted_direction_precision():
    """64 rollouts, 3 modules: 8 planted ones carry +v plus noise of the same norm; the gate
    (q = 1/8) routes them."""
    gen = torch.Generator().manual_seed(3)
    r, N, planted = 32, 64, torch.arange(0, 64, 8)
    dirs = {f"m{i}": torch.nn.functional.normalize(torch.randn(r, generator=gen), dim=0) for i in range(3)}
    grads = {}
    for k, v in dirs.items():
        G = torch.randn(N, r, generator=gen)  # (N, r) noise, |row| ~ sqrt(r)
        G[planted] += 1.5 * math.sqrt(r) * v  # (8, r)
        grads[k] = G
    is_hack = torch.zeros(N, dtype=torch.bool)
    is_hack[planted] = True
    for agg in gate.AGGS:
        a = gate.alignment(grads, dirs, agg)
        z = gate.assign_zones(a, 0.125)
        s = gate.zone_stats(a, z, is_hack)
        print(f"planted ({agg}): precision {s['gate_precision']:.3f} recall {s['gate_recall']:.3f} auc "
              f"{s['gate_auc']:.3f}")
        assert s["gate_precision"] > 0.9 and s["gate_recall"] > 0.9
    # a Haar-random direction routes the same number, but not the planted ones
    rnd = {k: torch.nn.functional.normalize(torch.randn(r, generator=gen), dim=0) for k in dirs}
    s = gate.zone_stats(gate.alignment(grads, rnd),
                        gate.assign_zones(gate.alignment(grads, rnd), 0.125), is_hack)
    assert s["gate_n_route"] == 8 and s["gate_precision"] < 0.5


# ------------------------------------------------------------------------------------------------
# Shrinkage
# ------------------------------------------------------------------------------------------------
def test_shrink_one_hand():
    g, v = torch.tensor([3.0, 4.0]), torch.tensor([2.0, 0.0])  # v renormalised to (1, 0); g.v = 3 > 0
    out, c = gate.shrink_one(g, v)
    assert c == pytest.approx(0.8)  # |erase(g)| = |(0, 4)| = 4, |g| = 5
    assert out.tolist() == pytest.approx([2.4, 3.2])
    out, c = gate.shrink_one(torch.tensor([-3.0, 4.0]), v)  # g.v < 0: erase removes nothing
    assert c == 1.0 and out.tolist() == [-3.0, 4.0]
    out, c = gate.shrink_one(torch.zeros(2), v)
    assert c == 1.0 and out.tolist() == [0.0, 0.0]


def test_shrink_matches_erase_norm():
    torch.manual_seed(1)
    for _ in range(20):
        g, v = torch.randn(16), torch.nn.functional.normalize(torch.randn(16), dim=0)
        out, _ = gate.shrink_one(g, v)
        g_dep, _, _ = antipasto.project_one(g, v, "erase")
        assert float(out.norm()) == pytest.approx(float(g_dep.norm()), rel=1e-9)
        assert float(torch.nn.functional.cosine_similarity(out, g.double(), dim=0)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# AM
# ------------------------------------------------------------------------------------------------
def test_am_transform_hand():
    r = torch.tensor([[3.0, 0.5, 3.0, -1.0]])
    z = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    sig1, sig2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    want = [3 * (1 - 2 * sig1), 0.5, 3.0, -1 * (1 - 2 * sig2)]  # -1.386, 0.5, 3.0, 0.762
    assert gate.am_transform(r, z, 2.0)[0].tolist() == pytest.approx(want, abs=1e-6)
    assert gate.am_transform(r, z, 0.0).tolist() == r.tolist()


def test_group_zscore_hand():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [1.0, 3.0, 100.0, 0.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    z = gate.group_zscore(s, valid)
    sd = math.sqrt(1.25)  # population std of 1..4
    assert z[0].tolist() == pytest.approx([-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd])
    assert z[1].tolist() == [0.0] * 4  # zero spread: no modification
    assert z[2].tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])  # invalid members excluded and zeroed


def test_am_layer():
    assert gate.am_layer(36, 0.67) == 24 and gate.am_layer(30, 0.67) == 20 and gate.am_layer(2, 0.67) == 1
    assert gate.am_layer(2, 0.1) == 1 and gate.am_layer(4, 1.0) == 4
    with pytest.raises(ValueError, match="am_layer_frac"):
        gate.am_layer(10, 0.0)


def tiny_qwen(seed: int = 0, layers: int = 3) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def test_mean_hidden_vs_output_hidden_states():
    m = tiny_qwen()
    x = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))  # (B, T)
    att = torch.ones_like(x)
    att[2, 7:] = 0
    mask = torch.zeros(3, 9)
    mask[0, 4:] = 1
    mask[1, 2:5] = 1
    mask[2, 3:7] = 1
    for layer in (1, 2):
        # hidden_states[n_layers] may be taken after the final norm; the probe uses inner layers
        got = arms.mean_hidden(m, x, att, mask, layer)  # (B, H)
        with torch.no_grad():
            hs = m(input_ids=x, attention_mask=att,
                   output_hidden_states=True).hidden_states[layer]  # (B, T, H)
        for b in range(3):
            want = hs[b, mask[b].bool()].mean(0)  # (H,)
            assert torch.allclose(got[b], want, atol=1e-5), f"layer {layer} row {b}"
    assert not torch.allclose(arms.mean_hidden(m, x, att, mask, 1), arms.mean_hidden(m, x, att, mask, 2))


def test_am_direction_hand():
    hack = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    clean = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    d = gate.am_direction(hack, clean)  # mean diff (1.5, 0) -> (1, 0)
    assert d.tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(AssertionError, match="norm"):
        gate.am_direction(hack, hack)


# ------------------------------------------------------------------------------------------------
# Per-sample gradients of train.py's Dr.GRPO loss: one capture backward vs a loop of single-rollout backwards
# ------------------------------------------------------------------------------------------------
def test_policy_gradient_per_sample_matches_loop():
    m = tiny_qwen(layers=2)
    ads = antipasto.wrap_model(m, quarantine=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.copy_(torch.randn(a.r, generator=g) * 0.05)  # nonzero: the KL term has a gradient
    rolls = []
    for i in range(5):
        p = torch.randint(1, 97, (3 + i % 2,), generator=g).tolist()
        c = torch.randint(1, 97, (2 + i,), generator=g).tolist()
        rolls.append(grpo.Rollout(i, p, c, "", "student", False, advantage=[1.5, -0.5, 0.0, 2.0, -1.0][i]))
    cfg = grpo.LossConfig(micro_batch=2, l_max=8, beta_kl=0.05, logits_chunk=7)
    per: dict = {}
    m.zero_grad(set_to_none=True)
    grpo.policy_gradient(m, rolls, 6, cfg, 0, "cpu", per_sample=per)
    G = {k: torch.cat(v) for k, v in per["dep"].items()}  # (5, r)
    assert set(G) == set(ads) and all(v.shape[0] == 5 for v in G.values())
    batch = {k: a.delta_S.grad.clone() for k, a in ads.items()}
    worst = worst_sum = 0.0
    for i, r in enumerate(rolls):
        m.zero_grad(set_to_none=True)
        grpo.policy_gradient(m, [r], 6, cfg, 0, "cpu")  # same normaliser N = 6
        for k, a in ads.items():
            worst = max(worst, float((G[k][i] - a.delta_S.grad).abs().max()))
    for k in ads:
        worst_sum = max(worst_sum, float((G[k].sum(0) - batch[k]).abs().max()))
    scale = max(float(v.abs().max()) for v in G.values())
    print("per-sample Dr.GRPO grads (capture) vs single-rollout loop: "
          f"max abs diff {worst:.3g} (max |g| {scale:.3g}); sum vs batch grad {worst_sum:.3g}")
    assert worst < 1e-6 * max(1.0, scale) and worst_sum < 1e-6 * max(1.0, scale)
    assert scale > 1e-6, "per-sample grads are all ~0: the test would not detect a mismatch"
    # the zero-advantage rollout still has a (KL-only) gradient since delta_S != 0
    assert max(float(G[k][2].abs().max()) for k in G) > 0


# ------------------------------------------------------------------------------------------------
# Planted direction through the real capture, per adapter kind
# ------------------------------------------------------------------------------------------------
def _per_sample_nll_grads(m, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence d(sum_t NLL_t)/d(deployed tensor) from one capture backward; {module: (B, *shape)}."""
    m.zero_grad(set_to_none=True)
    with antipasto.capture_per_sample(m) as cap:
        logits = m(x).logits  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:],
                                                reduction="none")  # (B, T-1)
        nll.sum().backward()
    m.zero_grad(set_to_none=True)
    return {k: g.detach().clone() for k, g in cap.grads.items()}


@pytest.mark.parametrize("kind", ["svd", "block", "lora"])
def test_planted_motif_is_routed(kind):
    """Sequences that share a token motif are the planted 'hacks': v = unit(mean grad(motif) - mean
    grad(plain)) per module from one set of sequences, then the gate (q = 1/8) on FRESH sequences (4 motif
    + 28 plain, all with A = 1 so the loss gradient is the NLL gradient) must route the motif ones
    (precision > 0.9)."""
    m = tiny_qwen(seed=2, layers=2)
    kw = {} if kind == "svd" else {"kind": kind}
    ads = antipasto.wrap_model(m, rank=8 if kind == "lora" else None, **kw)
    gen = torch.Generator().manual_seed(11)
    motif = torch.tensor([5, 9, 5, 9, 23, 5, 9, 5, 9, 23, 5, 9])

    def seqs(n: int, planted: bool) -> torch.Tensor:
        x = torch.randint(30, 97, (n, 18), generator=gen)  # (n, T) plain tokens avoid the motif's ids
        if planted:
            x[:, 4:16] = motif
        return x

    Gm, Gp = _per_sample_nll_grads(m, seqs(8, True)), _per_sample_nll_grads(m, seqs(8, False))
    dirs = {}
    for k in ads:
        d = (Gm[k].mean(0) - Gp[k].mean(0)).flatten()
        dirs[k] = (d / d.norm()).reshape(Gm[k].shape[1:])
    x = torch.cat([seqs(4, True), seqs(28, False)])  # (32, T)
    G = _per_sample_nll_grads(m, x)
    is_hack = torch.zeros(32, dtype=torch.bool)
    is_hack[:4] = True
    a = gate.alignment(G, dirs, "mean")
    s = gate.zone_stats(a, gate.assign_zones(a, 0.125), is_hack)
    print(f"{kind}: planted motif precision {s['gate_precision']:.2f} recall {s['gate_recall']:.2f} auc "
          f"{s['gate_auc']:.3f}")
    assert s["gate_n_route"] == 4 and s["gate_precision"] > 0.9
