"""No optimisation changes results: the optimised train pass of train.py (micro-batches, chunked
log-softmax with checkpointing, HF activation checkpointing, KL reference via antipasto.reference,
skipping zero-advantage rollouts when beta = 0) gives the same loss and delta_S gradient as a
straightforward full-batch, full-logits implementation written here (an unwrapped copy of the model
with W + U diag(delta) Vh substituted functionally, a separate base model as the KL reference), and
merged-inference generation samples the same tokens as the unmerged adapter."""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import antipasto
import models
import grpo

torch.set_num_threads(2)
N_SEQS, L_MAX = 8, 16


@pytest.fixture(scope="module")
def base():
    m, tok = models.load_model("tiny-random")
    return m, tok


def wrapped(base_model, quarantine=False, seed=0):
    """A wrapped copy with non-zero delta_S (and delta_S_hack when quarantine)."""
    m = copy.deepcopy(base_model)
    ads = antipasto.wrap_model(m, quarantine=quarantine)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.copy_(0.05 * torch.randn(a.r, generator=g))
            if quarantine:
                a.delta_S_hack.copy_(0.05 * torch.randn(a.r, generator=g))
    return m, ads


def rollouts(vocab: int, seed: int = 0, zero_adv: bool = False) -> list[grpo.Rollout]:
    """N_SEQS rollouts in groups of 4 (shared prompt), varying prompt and completion lengths."""
    rng = random.Random(seed)
    out = []
    for j in range(N_SEQS // 4):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(5, 20))]
        for k in range(4):
            comp = [rng.randrange(3, vocab) for _ in range(rng.randint(2, L_MAX))]
            adv = 0.0 if (zero_adv and (j + k) % 3 == 0) else rng.uniform(-2, 2)
            out.append(grpo.Rollout(j, prompt, comp, "", "student", False, advantage=adv))
    return out


def naive(base_model, ads, rs, beta: float, quarantine: bool, temperature: float = 1.0):
    """Full batch, full (B, T, V) logits, adapter as merged weights W + U diag(d) Vh with d a leaf; every
    log-prob (policy and KL reference) under softmax(logits / temperature).
    Returns (loss, {module name: dL/d(delta)})."""
    B = len(rs)
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rs)
    ids = torch.zeros(B, T, dtype=torch.long)  # (B, T) right-padded with 0
    att = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    cm = torch.zeros(B, T)  # (B, T) completion tokens
    for i, r in enumerate(rs):
        seq = r.prompt_ids + r.completion_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        cm[i, len(r.prompt_ids) : len(seq)] = 1
    adv = torch.tensor([r.advantage for r in rs])  # (B,)

    def logp_of(logits):  # (B, T, V) -> (B, T) with position 0 = 0
        lp = torch.log_softmax(logits.float() / temperature, dim=-1)[:, :-1].gather(
            -1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        return F.pad(lp, (1, 0))

    with torch.no_grad():
        ref = logp_of(base_model(input_ids=ids, attention_mask=att).logits)  # (B, T)
    d = {k: (a.delta_S.detach() + (a.delta_S_hack.detach() if quarantine else 0)).clone().requires_grad_(True)
         for k, a in ads.items()}
    weights = {f"{k}.weight": base_model.get_submodule(k).weight + (a.U * d[k]) @ a.Vh
               for k, a in ads.items()}
    logp = logp_of(functional_call(base_model, weights, args=(),
                                   kwargs={"input_ids": ids, "attention_mask": att}).logits)  # (B, T)
    ratio = torch.exp(logp - logp.detach())  # (B, T), == 1 in value
    k3 = torch.exp(ref - logp) - (ref - logp) - 1  # (B, T)
    loss = ((-adv[:, None] * ratio + beta * k3) * cm).sum() / (N_SEQS * L_MAX)
    loss.backward()
    return loss.item(), {k: v.grad for k, v in d.items()}


def optimised(m, ads, rs, beta: float, micro_batch: int, chunk: int, ckpt: bool, n_seqs: int = N_SEQS,
              temperature: float = 1.0):
    cfg = grpo.LossConfig(micro_batch=micro_batch, logits_chunk=chunk, beta_kl=beta, l_max=L_MAX,
                          temperature=temperature)
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    for p in m.parameters():
        p.grad = None
    ps = grpo.policy_gradient(m, rs, n_seqs, cfg, 0, "cpu")
    return (ps["loss"], {k: a.delta_S.grad for k, a in ads.items()},
            {k: a.delta_S_hack.grad for k, a in ads.items()})


def assert_grads_close(got: dict, want: dict, rtol=1e-4):
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0, "reference gradient is zero: the test would prove nothing"
    for k in want:
        assert got[k] is not None, f"{k}: no gradient"
        err = float((got[k] - want[k]).abs().max())
        assert err <= rtol * scale + 1e-9, f"{k}: max |grad diff| {err:.3e} > {rtol} x {scale:.3e}"


@pytest.mark.parametrize("micro_batch,chunk,ckpt", [(3, 7, True), (1, 5, False), (8, 100_000, False)])
def test_policy_gradient_matches_full_batch(base, micro_batch, chunk, ckpt):
    model, tok = base
    m, ads = wrapped(model)
    rs = rollouts(len(tok))
    want_loss, want = naive(model, ads, rs, beta=0.05, quarantine=False)
    loss, got, _ = optimised(m, ads, rs, beta=0.05, micro_batch=micro_batch, chunk=chunk, ckpt=ckpt)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-8)
    assert_grads_close(got, want)


def test_policy_gradient_scores_at_the_sampling_temperature(base):
    """With LossConfig.temperature = 0.7 the policy and KL-reference log-probs are those of logits / 0.7:
    loss and gradient equal the full-logits reference at 0.7, and the gradient differs from the one at 1."""
    model, tok = base
    m, ads = wrapped(model, seed=3)
    rs = rollouts(len(tok), seed=3)
    want_loss, want = naive(model, ads, rs, beta=0.05, quarantine=False, temperature=0.7)
    _, want_one = naive(model, ads, rs, beta=0.05, quarantine=False)
    loss, got, _ = optimised(m, ads, rs, beta=0.05, micro_batch=3, chunk=7, ckpt=False, temperature=0.7)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-8)
    assert_grads_close(got, want)
    with pytest.raises(AssertionError, match="max .grad diff"):
        assert_grads_close(got, want_one)


def test_sampled_tokens_follow_the_scored_distribution(base):
    """Generation at temperature 0.25 (top_p 1) and the train pass's token_logprobs at 0.25 describe one
    distribution: over 4000 sampled first tokens, the mean of log p_0.25(x) - log p_1(x) (both from
    token_logprobs) is KL(p_0.25 || p_1) computed from the logits, within 4 standard errors; sampled from
    p_1 it would be -KL(p_1 || p_0.25) (~ -0.12 here, ~20 standard errors away)."""
    model, tok = base
    T = 0.25
    prompt = tok("def run_tests():")["input_ids"]
    outs = grpo.generate(model, tok, [prompt] * 4000, 1, T, 1.0, 1000, seed=3)
    x = torch.tensor([o[0][0] for o in outs])  # (N,)
    with torch.no_grad():
        lg = model(torch.tensor([prompt])).logits[0, -1].float()  # (V,)
        ids = torch.tensor([prompt + [t] for t in x.unique().tolist()])  # (u, P + 1)
        att, where = torch.ones_like(ids), torch.zeros(ids.shape)
        where[:, -1] = 1
        lp_t = grpo.token_logprobs(model, ids, att, where=where, temperature=T)[:, -1]  # (u,)
        lp_1 = grpo.token_logprobs(model, ids, att, where=where)[:, -1]  # (u,)
    lpT, lp1 = torch.log_softmax(lg / T, -1), torch.log_softmax(lg, -1)  # (V,) the hand reference
    torch.testing.assert_close(lp_t, lpT[ids[:, -1]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp_1, lp1[ids[:, -1]], rtol=1e-4, atol=1e-5)
    d = dict(zip(ids[:, -1].tolist(), (lp_t - lp_1).tolist()))
    r = torch.tensor([d[t] for t in x.tolist()])  # (N,) per-sample log-ratio
    kl = float((lpT.exp() * (lpT - lp1)).sum())
    se = float(r.std() / len(r) ** 0.5)
    assert kl > 10 * se, f"KL {kl:.3g} vs standard error {se:.3g}: the test cannot tell the two apart"
    assert abs(float(r.mean()) - kl) < 4 * se, (float(r.mean()), kl, se)


def test_skipping_zero_advantage_rollouts_without_kl_is_exact(base):
    """train.main skips zero-advantage rollouts when beta_kl = 0 but keeps them in n_seqs."""
    model, tok = base
    m, ads = wrapped(model, seed=1)
    rs = rollouts(len(tok), seed=1, zero_adv=True)
    kept = [r for r in rs if r.advantage != 0.0]
    assert 0 < len(kept) < len(rs)
    want_loss, want = naive(model, ads, rs, beta=0.0, quarantine=False)
    loss, got, _ = optimised(m, ads, kept, beta=0.0, micro_batch=2, chunk=9, ckpt=True, n_seqs=len(rs))
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-8)
    assert_grads_close(got, want)


def test_route_quarantine_gets_the_same_raw_gradient(base):
    """With delta_S_hack trainable, the forward uses the sum: both raw grads equal the naive grad wrt
    (delta_S + delta_S_hack), and the KL reference is still the base model."""
    model, tok = base
    m, ads = wrapped(model, quarantine=True, seed=2)
    rs = rollouts(len(tok), seed=2)
    want_loss, want = naive(model, ads, rs, beta=0.05, quarantine=True)
    loss, got, got_hack = optimised(m, ads, rs, beta=0.05, micro_batch=4, chunk=11, ckpt=False)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-8)
    assert_grads_close(got, want)
    assert_grads_close(got_hack, want)


def test_merged_inference_generation_matches_unmerged(base):
    model, tok = base
    m, _ = wrapped(model, seed=3)
    prompts = [r.prompt_ids for r in rollouts(len(tok), seed=3)][::4]
    ids = torch.tensor([prompts[0]])  # (1, P)
    with torch.no_grad():
        plain_logits = m(input_ids=ids).logits  # (1, P, V)
        with antipasto.merged_inference(m):
            merged_logits = m(input_ids=ids).logits  # (1, P, V)
    assert (plain_logits - merged_logits).abs().max() < 1e-4
    assert (plain_logits - model(input_ids=ids).logits).abs().max() > 1e-3, (
        "adapter has no effect: the check would be vacuous")
    m.eval()
    plain = grpo.generate(m, tok, prompts, 12, 1.0, 1.0, 4, seed=7)
    with antipasto.merged_inference(m):
        merged = grpo.generate(m, tok, prompts, 12, 1.0, 1.0, 4, seed=7)
    assert [(o.ids, o.truncated) for o in merged] == [(o.ids, o.truncated) for o in plain]
    for a, b in zip(merged, plain):  # the sampler log-probs agree to float noise (fp32 merge)
        torch.testing.assert_close(torch.tensor(a.logp), torch.tensor(b.logp), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_bf16_train_pass_direction_matches_fp32(base):
    """bf16 base weights (adapter deltas stay fp32): same gradient direction as fp32 to ~1%."""
    model, tok = base
    m32, ads32 = wrapped(model, seed=4)
    m16, ads16 = wrapped(copy.deepcopy(model).to(torch.bfloat16), seed=4)
    rs = rollouts(len(tok), seed=4)
    l32, g32, _ = optimised(m32, ads32, rs, beta=0.05, micro_batch=4, chunk=16, ckpt=False)
    l16, g16, _ = optimised(m16, ads16, rs, beta=0.05, micro_batch=4, chunk=16, ckpt=False)
    a = torch.cat([g32[k] for k in g32])
    b = torch.cat([g16[k].float() for k in g32])
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos > 0.99, f"bf16 vs fp32 gradient cosine {cos:.4f}"
    assert abs(b.norm() / a.norm() - 1) < 0.05
    assert l16 == pytest.approx(l32, rel=0.05)


@pytest.mark.parametrize("clip_eps,temperature", [(0.2, 1.0), (10.0, 1.0), (0.2, 0.7)])
def test_behaviour_policy_ratio_matches_an_importance_weighted_reference(base, clip_eps, temperature):
    """Rollouts sampled in deploy mode (quarantine ablated), trained with the quarantine on: the policy
    gradient uses the behaviour log-probs as old_logp and equals the clipped importance-weighted surrogate
    written here, full batch and full logits: -min(rho A, clip(rho) A), rho = pi_train / pi_behaviour,
    behaviour = W + U diag(dS) Vh, train = W + U diag(dS + dS_hack) Vh, both at the sampling temperature.
    clip_eps = 10: the unclipped importance-weighted gradient."""
    model, tok = base
    m, ads = wrapped(model, quarantine=True, seed=3)
    rs = rollouts(len(tok), seed=3)
    B = len(rs)
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rs)
    ids, att, cm = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T)
    for i, r in enumerate(rs):
        seq = r.prompt_ids + r.completion_ids
        ids[i, : len(seq)], att[i, : len(seq)], cm[i, len(r.prompt_ids) : len(seq)] = torch.tensor(seq), 1, 1
    adv = torch.tensor([r.advantage for r in rs])[:, None]  # (B, 1)

    def logp_of(d):  # merged weights with per-module singular-value offsets d
        w = {f"{k}.weight": model.get_submodule(k).weight + (a.U * d[k]) @ a.Vh for k, a in ads.items()}
        logits = functional_call(model, w, args=(), kwargs={"input_ids": ids, "attention_mask": att}).logits
        lp = torch.log_softmax(logits.float() / temperature, -1)[:, :-1].gather(
            -1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        return F.pad(lp, (1, 0))  # (B, T)

    with torch.no_grad():
        behaviour = logp_of({k: a.delta_S.detach() for k, a in ads.items()})  # (B, T)
    d = {k: (a.delta_S.detach() + a.delta_S_hack.detach()).clone().requires_grad_(True)
         for k, a in ads.items()}
    rho = torch.exp(logp_of(d) - behaviour)  # (B, T)
    assert float(((rho - 1).abs() * cm).max()) > 1e-3, (
        "quarantine too small: ratio == 1, the test proves nothing")
    surr = torch.minimum(rho * adv, rho.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    (-(surr * cm).sum() / (N_SEQS * L_MAX)).backward()
    want = {k: v.grad for k, v in d.items()}

    cfg = grpo.LossConfig(micro_batch=3, logits_chunk=7, beta_kl=0.0, l_max=L_MAX, clip_eps=clip_eps,
                          temperature=temperature)
    m.train()
    for p in m.parameters():
        p.grad = None
    st = grpo.policy_gradient(m, rs, N_SEQS, cfg, 0, "cpu", behaviour=antipasto.ablate_quarantine)
    assert_grads_close({k: a.delta_S.grad for k, a in ads.items()}, want)
    assert st["ratio_mean"] == pytest.approx(float((rho.detach() * cm).sum() / cm.sum()), rel=1e-4)
    assert st["logratio_abs"] > 0 and 0 <= st["frac_clipped"] <= 1
    if clip_eps > 1:
        assert st["frac_clipped"] == 0


def test_without_a_behaviour_policy_the_ratio_is_exactly_one(base):
    model, tok = base
    m, ads = wrapped(model, quarantine=True, seed=4)
    st = grpo.policy_gradient(m, rollouts(len(tok), seed=4), N_SEQS,
                              grpo.LossConfig(l_max=L_MAX, beta_kl=0.0), 0, "cpu")
    assert st["ratio_mean"] == 1.0 and st["frac_clipped"] == 0.0 and st["logratio_abs"] == 0.0


def test_runs_score_at_their_sampling_temperature():
    """train.py and probe_distill.py hand their sampling temperature to the train pass."""
    import probe_distill
    import train

    for name, (_, cfg) in train.PRESETS.items():
        assert train.loss_config(cfg).temperature == cfg.temperature, name
    assert train.loss_config(train.PRESETS["full"][1]).temperature == 0.7
    cfg = probe_distill.ProbeConfig(temperature=0.6)
    assert probe_distill.loss_config(cfg).temperature == 0.6


# ------------------------------------------------------------------------------------------------
# the sampler correction: the sampler's own log-probs, and the truncated importance weight in the loss


def _top_p_logp(logits, T: float, top_p: float):
    """Hand reference of the distribution sampled from: softmax(logits / T) cut to the smallest set of the
    most probable tokens whose mass reaches top_p, renormalised. Returns (log-probs (V,), kept mask (V,))."""
    p = torch.softmax(logits.double() / T, -1)  # (V,)
    order = torch.argsort(p, descending=True)
    before = torch.cumsum(p[order], 0) - p[order]  # mass of the more probable tokens
    kept = torch.zeros_like(p, dtype=torch.bool)
    kept[order[before < top_p]] = True
    z = p[kept].sum()
    return torch.where(kept, torch.log(p / z), -torch.inf), kept


# generation_config settings a model may ship that add HF logits processors before or after our recorder
POLLUTED_GEN = dict(min_p=0.3, typical_p=0.5, epsilon_cutoff=1e-3, eta_cutoff=1e-3, top_h=0.5, top_k=3,
                    temperature=0.3, top_p=0.5, repetition_penalty=1.5, no_repeat_ngram_size=2,
                    min_new_tokens=8, suppress_tokens=[5], sequence_bias={(8,): -5.0},
                    renormalize_logits=True)


@pytest.mark.parametrize("polluted", [False, True], ids=["plain", "model-gen-config"])
def test_sampler_logp_is_the_distribution_sampled_from(base, polluted):
    """grpo.generate at T = 0.7, top_p = 0.8 records, per token, the log-prob under the tempered, top-p
    cut and renormalised distribution (checked against a hand reference from unpadded full forwards);
    every sampled token lies in the nucleus, and the nucleus cuts often enough that the recorded values
    differ from the train pass's full-softmax ones. With a model generation_config that would add
    processors (min_p, repetition penalty, minimum length, ...) the reference still holds: generate ignores
    it, and leaves it in place."""
    model, tok = base
    m, _ = wrapped(model, seed=5)
    m.eval()
    if polluted:
        for k, v in POLLUTED_GEN.items():
            setattr(m.generation_config, k, v)
    prompts = [r.prompt_ids for r in rollouts(len(tok), seed=5)][::2]  # 4 prompts of different lengths
    T, top_p = 0.7, 0.8
    outs = grpo.generate(m, tok, prompts, 10, T, top_p, 4, seed=11)
    gaps = []
    with torch.no_grad():
        for prompt, o in zip(prompts, outs):
            assert o.logp is not None and len(o.logp) == len(o.ids)
            seq = torch.tensor([prompt + o.ids])  # (1, P + n)
            logits = m(input_ids=seq).logits[0].float()  # (P + n, V)
            for t, (tid, lp) in enumerate(zip(o.ids, o.logp)):
                ref, kept = _top_p_logp(logits[len(prompt) - 1 + t], T, top_p)
                assert kept[tid], f"token {t} ({tid}) outside the nucleus"
                assert lp == pytest.approx(float(ref[tid]), abs=1e-4), (t, lp, float(ref[tid]))
                gaps.append(lp - float(torch.log_softmax(logits[len(prompt) - 1 + t] / T, -1)[tid]))
    assert max(gaps) > 0.05 and min(gaps) >= -1e-4, "the nucleus never cut: the test would prove nothing"
    assert all(o.logp is None for o in grpo.generate(m, tok, prompts, 4, 0.0, 1.0, 4, seed=0)), "greedy"
    if polluted:
        assert m.generation_config.min_p == 0.3 and m.generation_config.repetition_penalty == 1.5


def test_recording_leaves_the_samples_unchanged(base):
    """The warpers generate is handed (and the recorder after them) sample exactly what transformers' own
    temperature / top-p settings sample with the same seed."""
    model, tok = base
    m, _ = wrapped(model, seed=6)
    m.eval()
    prompts = [r.prompt_ids for r in rollouts(len(tok), seed=6)][::2]
    got = grpo.generate(m, tok, prompts, 12, 0.7, 0.8, 4, seed=13)
    torch.manual_seed(13)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # (b, P) left padded
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (b, P)
    eos = grpo.eos_ids(tok)
    with torch.no_grad():
        want = m.generate(input_ids=ids, attention_mask=att, max_new_tokens=12, do_sample=True,
                          temperature=0.7, top_p=0.8, top_k=0, pad_token_id=tok.pad_token_id,
                          eos_token_id=eos)[:, width:].tolist()  # (b, <= 12)
    for g, w in zip(got, want):
        cut = next((i for i, t in enumerate(w) if t in eos), None)
        assert g.ids == (w[: cut + 1] if cut is not None else w)


def _with_sampler_logp(m, rs, temperature, shift_seed: int | None):
    """Each rollout's sampler_logp = the train pass's log-probs minus a per-token shift in [-1, 1] (None:
    no shift); returns the (B, T) shifts at the completion positions."""
    B = len(rs)
    ids, att, cm = grpo.pack(rs, 0, "cpu")  # (B, T) x3
    with torch.no_grad():
        lp = grpo.token_logprobs(m, ids, att, where=cm, temperature=temperature)  # (B, T)
    g = torch.Generator().manual_seed(shift_seed or 0)
    shift = torch.zeros_like(lp)  # (B, T)
    if shift_seed is not None:
        shift = (2 * torch.rand(lp.shape, generator=g) - 1) * cm
    for i, r in enumerate(rs):
        p, n = len(r.prompt_ids), len(r.completion_ids)
        r.sampler_logp = (lp[i, p : p + n] - shift[i, p : p + n]).tolist()
    assert B == len(rs)
    return shift, cm


def _reference_logp(model, ads, ids, att, T):
    """The adapted model's token log-probs at T written out: W + U diag(delta_S) Vh through functional_call,
    with fresh leaf copies of every delta_S (returned) to take the reference gradient."""
    d = {k: a.delta_S.detach().clone().requires_grad_(True) for k, a in ads.items()}
    weights = {f"{k}.weight": model.get_submodule(k).weight + (a.U * d[k]) @ a.Vh for k, a in ads.items()}
    logits = functional_call(model, weights, args=(), kwargs={"input_ids": ids, "attention_mask": att}).logits
    lp = F.pad(torch.log_softmax(logits.float() / T, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1),
               (1, 0))  # (B, T)
    return d, lp


@pytest.mark.parametrize("cap", [2.0, None])
def test_sampler_correction_weights_the_policy_term(base, cap):
    """With sampler log-probs pi_train / pi_sampler = exp(shift), shift in [-1, 1]: the gradient equals a
    full-batch reference written here whose policy term is weighted by min(exp(shift), cap) (the KL term
    unweighted); cap None leaves the gradient unweighted and still measures the gap. The logged gap,
    mean weight and capped share equal their hand values."""
    model, tok = base
    m, ads = wrapped(model, seed=7)
    rs = rollouts(len(tok), seed=7)
    T, beta = 0.7, 0.05
    shift, cm = _with_sampler_logp(m, rs, T, shift_seed=7)
    B, Tn = shift.shape
    ids, att, _ = grpo.pack(rs, 0, "cpu")
    adv = torch.tensor([r.advantage for r in rs])[:, None]  # (B, 1)
    w = shift.exp().clamp(max=cap) if cap is not None else torch.ones_like(shift)  # (B, T)
    with torch.no_grad():
        ref = grpo.token_logprobs(model, ids, att, where=cm, temperature=T)  # (B, T) the base model
    d, lp = _reference_logp(model, ads, ids, att, T)  # leaves (per module), (B, T)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1  # (B, T)
    ((-adv * w * torch.exp(lp - lp.detach()) + beta * k3) * cm).sum().div(N_SEQS * L_MAX).backward()
    want = {k: v.grad for k, v in d.items()}

    cfg = grpo.LossConfig(micro_batch=3, logits_chunk=7, beta_kl=beta, l_max=L_MAX, temperature=T,
                          tis_cap=cap)
    m.train()
    for p in m.parameters():
        p.grad = None
    st = grpo.policy_gradient(m, rs, N_SEQS, cfg, 0, "cpu")
    assert_grads_close({k: a.delta_S.grad for k, a in ads.items()}, want)
    n = float(cm.sum())
    assert st["sampler_gap"] == pytest.approx(float((shift.abs() * cm).sum()) / n, rel=1e-3)
    assert st["is_weight_mean"] == pytest.approx(float((w * cm).sum()) / n, rel=1e-3)
    capped = float(((shift.exp() > 2.0) * cm).sum()) / n
    assert st["frac_is_capped"] == pytest.approx(capped if cap is not None else 0.0, abs=1e-6)
    if cap is not None:
        assert 0 < capped < 0.5, "no weight reached the cap: the test would not see the truncation"
        _, unweighted = naive(model, ads, rs, beta=beta, quarantine=False, temperature=T)
        with pytest.raises(AssertionError, match="max .grad diff"):
            assert_grads_close({k: a.delta_S.grad for k, a in ads.items()}, unweighted)


def test_sampler_correction_holds_across_inner_steps(base):
    """inner_steps = 2: at the second inner step (delta_S moved by a small step) the policy term keeps the
    first step's sampler weight min(pi_old / pi_sampler, 2), pi_old the cached first-step log-probs, and its
    ratio is exp(logp - old); the gradient equals a full-batch reference written here (no token clipped)."""
    model, tok = base
    m, ads = wrapped(model, seed=9)
    rs = rollouts(len(tok), seed=9)
    T, beta, cap = 0.7, 0.05, 2.0
    shift, cm = _with_sampler_logp(m, rs, T, shift_seed=9)
    ids, att, _ = grpo.pack(rs, 0, "cpu")
    with torch.no_grad():
        old = grpo.token_logprobs(m, ids, att, where=cm, temperature=T)  # (B, T) first inner step
        ref = grpo.token_logprobs(model, ids, att, where=cm, temperature=T)  # (B, T) the base model
    cfg = grpo.LossConfig(micro_batch=3, logits_chunk=7, beta_kl=beta, l_max=L_MAX, temperature=T,
                          tis_cap=cap, inner_steps=2)
    m.train()
    cache: dict = {}
    grpo.policy_gradient(m, rs, N_SEQS, cfg, 0, "cpu", cache, inner=0)
    g = torch.Generator().manual_seed(19)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.add_(0.002 * torch.randn(a.r, generator=g))
    for p in m.parameters():
        p.grad = None
    st = grpo.policy_gradient(m, rs, N_SEQS, cfg, 0, "cpu", cache, inner=1)
    assert st["frac_clipped"] == 0.0 and st["logratio_abs"] > 1e-5, "the step must move pi, within the clip"

    adv = torch.tensor([r.advantage for r in rs])[:, None]  # (B, 1)
    w = shift.exp().clamp(max=cap)  # (B, T)
    d, lp = _reference_logp(model, ads, ids, att, T)  # leaves (per module), (B, T)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1  # (B, T)
    ((-adv * w * torch.exp(lp - old) + beta * k3) * cm).sum().div(N_SEQS * L_MAX).backward()
    assert_grads_close({k: a.delta_S.grad for k, a in ads.items()}, {k: v.grad for k, v in d.items()})
    n = float(cm.sum())
    assert st["is_weight_mean"] == pytest.approx(float((w * cm).sum()) / n, rel=1e-3)


def test_sampler_correction_compares_with_the_behaviour_pass(base):
    """Route arms sample in deploy mode and train with the quarantine on: the sampler weight compares the
    sampler's log-probs with the behaviour pass's (deploy mode), not with the train mode's. Sampler
    log-probs equal to deploy mode's give weight 1 and gap ~0; the train mode differs by more than 1e-3."""
    model, tok = base
    m, ads = wrapped(model, quarantine=True, seed=8)
    rs = rollouts(len(tok), seed=8)
    with antipasto.ablate_quarantine(m):
        _with_sampler_logp(m, rs, 1.0, shift_seed=None)
    cfg = grpo.LossConfig(micro_batch=4, logits_chunk=7, beta_kl=0.0, l_max=L_MAX)
    m.train()
    st = grpo.policy_gradient(m, rs, N_SEQS, cfg, 0, "cpu", behaviour=antipasto.ablate_quarantine)
    assert st["sampler_gap"] < 1e-5 and st["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert st["logratio_abs"] > 1e-3, "train and deploy mode agree: the test would prove nothing"
    for p in m.parameters():
        p.grad = None
    st = grpo.policy_gradient(m, rs, N_SEQS, cfg, 0, "cpu")  # no behaviour pass: compares with train mode
    assert st["sampler_gap"] > 1e-3


def test_rows_without_sampler_logp_get_weight_one(base):
    """Pool rows (and greedy decoding) carry no sampler log-probs: weight 1, and no gap is reported."""
    model, tok = base
    rs = rollouts(len(tok), seed=9)
    old = -torch.rand(len(rs), max(len(r.prompt_ids) + len(r.completion_ids) for r in rs))  # (B, T)
    w, sums = grpo.sampler_weights(rs, old, 2.0)
    assert torch.equal(w, torch.ones_like(w)) and sums["tokens"] == 0.0
    st = grpo.policy_gradient(wrapped(model, seed=9)[0], rs, N_SEQS, grpo.LossConfig(l_max=L_MAX), 0, "cpu")
    assert math.isnan(st["sampler_gap"]) and math.isnan(st["is_weight_mean"])
