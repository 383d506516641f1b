"""Dr.GRPO advantages and loss against hand-computed values and an independent loop implementation."""

import math

import pytest
import torch

from grpo import dr_grpo_advantages, dr_grpo_loss, prompts_for_step, token_logprobs


def test_advantages_hand_computed():
    r = torch.tensor([[3.5, 0.5, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    v = torch.ones_like(r, dtype=torch.bool)
    a = dr_grpo_advantages(r, v)
    # group 0: mean = 4.5 / 4 = 1.125; no std division
    assert a[0].tolist() == pytest.approx([2.375, -0.625, -0.625, -1.125])
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # zero-variance group: exactly zero


def test_advantages_mask_infra_failures():
    r = torch.tensor([[3.5, 0.5, 0.0, 99.0]])  # last one is an infra failure: must not enter the mean
    v = torch.tensor([[True, True, True, False]])
    a = dr_grpo_advantages(r, v)
    assert a[0].tolist() == pytest.approx([3.5 - 4.0 / 3, 0.5 - 4.0 / 3, -4.0 / 3, 0.0])
    # one valid member left: no baseline, no signal
    a1 = dr_grpo_advantages(torch.tensor([[2.0, 0.0]]), torch.tensor([[True, False]]))
    assert a1.tolist() == [[0.0, 0.0]]


def _loop_loss(logp, old, ref, adv, mask, n_seqs, l_max, beta, eps):
    """Independent reference: explicit loops over sequences and tokens, python floats."""
    tot = 0.0
    B, T = len(logp), len(logp[0])
    for i in range(B):
        for t in range(T):
            if mask[i][t] == 0:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            pg = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            d = ref[i][t] - logp[i][t]
            tot += pg + beta * (math.exp(d) - d - 1)
    return tot / (n_seqs * l_max)


def test_loss_and_grad_hand_batch():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5)).requires_grad_(True)  # (B, T)
    ref = -torch.rand(3, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([1.5, -0.5, -1.0])
    loss, st = dr_grpo_loss(logp, logp.detach(), ref, adv, mask, n_seqs=3, l_max=8, beta=0.1, clip_eps=0.2)
    want = _loop_loss(logp.tolist(), logp.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 3, 8, 0.1, 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # hand gradient at ratio == 1: d/dlogp [-A * rho + beta * (e^{ref-logp} - (ref-logp) - 1)] / (N L)
    #                                    = (-A - beta * e^{ref-logp} + beta) / (N L) on masked tokens
    g = (-adv[:, None] - 0.1 * torch.exp(ref - logp.detach()) + 0.1) * mask / (3 * 8)
    assert torch.allclose(logp.grad, g, atol=1e-7)
    assert st["tokens"].item() == mask.sum().item()


def test_loss_ppo_clip_branch_matches_loop():
    torch.manual_seed(1)
    logp = -torch.rand(4, 6)
    old = logp + 0.5 * torch.randn(4, 6)  # ratios far from 1: clipping active
    ref = -torch.rand(4, 6)
    mask = (torch.rand(4, 6) > 0.3).float()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    loss, _ = dr_grpo_loss(logp, old, ref, adv, mask, n_seqs=4, l_max=6, beta=0.05, clip_eps=0.2)
    want = _loop_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 4, 6, 0.05, 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_normaliser_independent_of_lengths():
    """Same per-token terms, longer padding / different completion lengths elsewhere: each sequence's
    gradient per token is unchanged (Dr.GRPO's constant normaliser, unlike per-sequence length means)."""
    logp = torch.zeros(2, 10, requires_grad=True)
    m_short = torch.zeros(2, 10)
    m_short[0, :2] = 1
    m_short[1, :9] = 1
    adv = torch.tensor([1.0, 1.0])
    loss, _ = dr_grpo_loss(logp, logp.detach(), None, adv, m_short, n_seqs=2, l_max=10,
                           beta=0.0, clip_eps=0.2)
    loss.backward()
    # same weight per token, both lengths
    assert logp.grad[0, 0].item() == pytest.approx(logp.grad[1, 0].item())
    assert logp.grad[0, 0].item() == pytest.approx(-1.0 / 20)


def test_zero_variance_group_gives_zero_gradient_and_beta0_kl():
    logp = torch.randn(4, 5, requires_grad=True)
    adv = dr_grpo_advantages(torch.full((1, 4), 3.5), torch.ones(1, 4, dtype=torch.bool)).view(-1)
    loss, st = dr_grpo_loss(logp, logp.detach(), torch.randn(4, 5), adv, torch.ones(4, 5), 4, 5,
                            beta=0.0, clip_eps=0.2)
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0
    assert st["kl_sum"].item() == 0.0


def test_ratio_is_one_at_first_inner_step():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, _ = dr_grpo_loss(logp, logp.detach(), None, torch.tensor([2.0, -1.0]), torch.ones(2, 3),
                           2, 3, 0.0, 0.2)
    # value equals -sum(A * 1 * mask) / (N L): the ratio contributes exactly 1
    assert loss.item() == pytest.approx(-(2.0 * 3 - 1.0 * 3) / 6)


def test_microbatch_accumulation_exact():
    torch.manual_seed(2)
    logp = torch.randn(6, 7, requires_grad=True)
    ref = torch.randn(6, 7)
    mask = (torch.rand(6, 7) > 0.4).float()
    adv = torch.randn(6)
    full, _ = dr_grpo_loss(logp, logp.detach(), ref, adv, mask, 6, 7, 0.01, 0.2)
    parts = sum(dr_grpo_loss(logp[s:s + 2], logp[s:s + 2].detach(), ref[s:s + 2], adv[s:s + 2], mask[s:s + 2],
                             6, 7, 0.01, 0.2)[0] for s in (0, 2, 4))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_prompt_order_deterministic_and_epochs():
    a, e0 = prompts_for_step(10, 4, seed=3, step=0)
    b, _ = prompts_for_step(10, 4, seed=3, step=1)
    c, e2 = prompts_for_step(10, 4, seed=3, step=2)  # 10 // 4 = 2 steps per epoch -> epoch 1
    assert (e0, e2) == (0, 1)
    assert len(set(a) | set(b)) == 8  # no repeats inside an epoch
    assert prompts_for_step(10, 4, seed=3, step=2) == (c, e2)
    with pytest.raises(AssertionError, match="prompts per step"):
        prompts_for_step(3, 4, seed=0, step=0)


def test_token_logprobs_chunked_matches_full_logits():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    m = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (3, 11))
    att = torch.ones_like(ids)
    att[2, 8:] = 0  # right padding
    with torch.no_grad():
        lp = token_logprobs(m, ids, att, chunk=5)  # chunk smaller than T: several chunks per row
        full = torch.log_softmax(m(input_ids=ids, attention_mask=att).logits.float(), -1)  # (B, T, V)
    want = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert lp[:, 0].abs().max() == 0
    assert torch.allclose(lp[:, 1:], want, atol=1e-5)
    # with grad: checkpointed chunks give the same gradient as the full computation
    ids2 = ids[:2]
    m.zero_grad()
    token_logprobs(m, ids2, torch.ones_like(ids2), chunk=4).sum().backward()
    g1 = m.model.layers[0].mlp.up_proj.weight.grad.clone()
    m.zero_grad()
    f = torch.log_softmax(m(input_ids=ids2).logits.float(), -1)[:, :-1].gather(-1, ids2[:, 1:, None]).sum()
    f.backward()
    assert torch.allclose(g1, m.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5)


def test_token_logprobs_where_heads_only_the_masked_positions():
    """`where` (the completion mask): the LM head runs only there; those values and the loss gradient equal
    the full log-softmax's (an independent computation from HF's logits),
    every other position is exactly 0."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    m = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (3, 12))
    att = torch.ones_like(ids)
    att[1, 9:] = 0
    where = torch.zeros(3, 12)
    where[0, 7:] = 1
    where[1, 4:9] = 1
    where[2, 11:] = 1  # one completion token
    head = m.get_output_embeddings()
    import torch.nn.functional as F

    real = F.linear
    rows = []
    try:

        def spy(x, w, b=None):
            if w is head.weight:
                rows.append(x.shape[0])
            return real(x, w, b)

        F.linear = spy
        lp = token_logprobs(m, ids, att, chunk=4, where=where)
    finally:
        F.linear = real
    assert sum(rows) == int(where[:, 1:].sum()) == 5 + 5 + 1  # only the completion positions hit the head
    with torch.no_grad():
        full = torch.log_softmax(m(input_ids=ids, attention_mask=att).logits.float(), -1)  # (B, T, V)
    want = F.pad(full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0)) * where
    assert torch.allclose(lp.detach(), want, atol=1e-5)
    assert (lp.detach()[where == 0] == 0).all()
    m.zero_grad()
    (lp * where).sum().backward()
    g1 = m.model.layers[0].mlp.up_proj.weight.grad.clone()
    m.zero_grad()
    lpf = torch.log_softmax(m(input_ids=ids, attention_mask=att).logits.float(), -1)[:, :-1]
    (lpf.gather(-1, ids[:, 1:, None]).squeeze(-1) * where[:, 1:]).sum().backward()
    assert torch.allclose(g1, m.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5)
