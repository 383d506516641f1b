"""Dr.GRPO, the library half: rollouts, advantages, the loss, log-probs, generation, the policy gradient, the
data order and the learning-rate schedule, teacher pools. train.py and probe_distill.py both use it.

    python -c "import grpo, torch; print(grpo.dr_grpo_advantages(torch.tensor([[1., 0.]]),
                                                                   torch.ones(1, 2, dtype=torch.bool)))"
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from loguru import logger
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import antipasto
import cli
from cli import UserError


@dataclass(frozen=True)
class LossConfig:
    """What the train pass needs from a run's config (train.loss_config builds it from TrainConfig)."""

    micro_batch: int = 8
    """sequences per forward/backward"""
    l_max: int = 1536
    """Dr.GRPO's constant normaliser (the completion budget)"""
    beta_kl: float = 1e-3
    """KL(k3) coefficient against the base model (delta_S = 0)"""
    clip_eps: float = 0.2
    """PPO clip range"""
    inner_steps: int = 1
    """PPO-style passes per batch"""
    logits_chunk: int = 512
    """tokens per chunk of the memory-light log-softmax"""
    fused_adapter: bool = False
    """svd adapters: one-matmul train pass (antipasto.fused_training)"""
    temperature: float = 1.0
    """the rollouts' sampling temperature: the policy, behaviour and reference passes score tokens under
    softmax(logits / temperature), the distribution they were sampled from before top-p (0 = greedy: 1)"""
    tis_cap: float | None = 2.0
    """sampler correction: the policy term of each live token is weighted by min(pi_train / pi_sampler, cap),
    pi_sampler the sampler's own processed log-prob (temperature and top-p), pi_train the train pass's
    behaviour log-prob (token-level truncated importance sampling, as TRL's vLLM correction);
    None: weight 1"""


# ----------------------------------------------------------------------------------------------------
# Advantages and loss


@jaxtyped(typechecker=beartype)
def dr_grpo_advantages(rewards: Float[Tensor, "P G"], valid: Bool[Tensor, "P G"]) -> Float[Tensor, "P G"]:
    """A_i = r_i - mean(r over the valid members of i's group); no std division (Dr.GRPO).

    Invalid rollouts (infrastructure failures) get A = 0 and do not enter the mean. A group whose valid
    rewards are all equal (or that has < 2 valid members) gets exactly zero advantages."""
    v = valid.to(rewards.dtype)  # (P, G)
    n = v.sum(dim=1, keepdim=True).clamp(min=1)  # (P, 1)
    mean = (rewards * v).sum(dim=1, keepdim=True) / n  # (P, 1)
    adv = (rewards - mean) * v  # (P, G)
    r_valid_max = torch.where(valid, rewards, -torch.inf).amax(dim=1, keepdim=True)  # (P, 1)
    r_valid_min = torch.where(valid, rewards, torch.inf).amin(dim=1, keepdim=True)  # (P, 1)
    zero_var = (r_valid_max <= r_valid_min) | (n < 2)  # (P, 1)
    return torch.where(zero_var, torch.zeros_like(adv), adv)


@jaxtyped(typechecker=beartype)
def dr_grpo_loss(
    logp: Float[Tensor, "B T"],
    old_logp: Float[Tensor, "B T"],
    ref_logp: Float[Tensor, "B T"] | None,
    adv: Float[Tensor, "B"],
    mask: Float[Tensor, "B T"],
    n_seqs: int,
    l_max: int,
    beta: float,
    clip_eps: float,
    is_weight: Float[Tensor, "B T"] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr.GRPO surrogate for one micro-batch of a batch of `n_seqs` sequences.

        loss = 1/(n_seqs * l_max) * sum_i sum_t mask_it
               * ( -w_it min(rho_it A_i, clip(rho_it) A_i) + beta * k3_it )
        rho_it = exp(logp_it - old_logp_it),  k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1

    w_it (`is_weight`, no grad; 1 when None) is the sampler correction: the truncated importance weight of
    the train pass's behaviour policy over the sampler's (policy_gradient builds it); the KL term is not
    weighted. The normaliser is a constant (not the completion lengths), so summing micro-batch losses gives
    the full-batch loss exactly. At the first inner step old_logp == logp.detach(), so rho == 1 in value and
    the gradient is the (w-weighted) policy gradient. Returns (loss, sums for logging)."""
    assert logp.shape == old_logp.shape == mask.shape, (
        f"shape mismatch {logp.shape} {old_logp.shape} {mask.shape}"
    )
    assert l_max > 0 and n_seqs > 0, f"bad normaliser n_seqs={n_seqs} l_max={l_max}"
    logr = logp - old_logp  # (B, T)
    ratio = torch.exp(logr)  # (B, T)
    a = adv[:, None]  # (B, 1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # (B, T)
    if is_weight is not None:
        assert is_weight.shape == logp.shape and not is_weight.requires_grad, (
            f"is_weight {tuple(is_weight.shape)} (grad {is_weight.requires_grad}) for logp "
            f"{tuple(logp.shape)}")
        pg = pg * is_weight  # (B, T)
    per_tok = pg
    kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None and beta != 0.0:
        d = ref_logp - logp  # (B, T)
        k3 = torch.exp(d) - d - 1  # (B, T)
        per_tok = per_tok + beta * k3
        kl_sum = (k3 * mask).sum().detach()
    loss = (per_tok * mask).sum() / (n_seqs * l_max)
    # the clipped branch is the active one: the ratio is outside the range on the side A pushes
    with torch.no_grad():
        clipped = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))  # (B, T)
        diag = {"ratio_sum": (ratio * mask).sum(), "clipped": (clipped * mask).sum(),
                "abs_logratio_sum": (logr.abs() * mask).sum()}
    return loss, {"kl_sum": kl_sum, "tokens": mask.sum().detach(), **diag}


def _logp_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_t: float) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (n, V)
    if inv_t != 1.0:
        logits = logits * inv_t  # (n, V) the sampling temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n,)


@jaxtyped(typechecker=beartype)
def token_logprobs(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "B T"],
    attention_mask: Int[Tensor, "B T"] | Bool[Tensor, "B T"],
    chunk: int = 512,
    where: Float[Tensor, "B T"] | Bool[Tensor, "B T"] | None = None,
    temperature: float = 1.0,
) -> Float[Tensor, "B T"]:
    """log p(input_ids[t] | input_ids[:t]) for t >= 1 (position 0 gets 0), float32, with p the softmax of
    logits / temperature (the sampling distribution before top-p; temperature 0, greedy, scores at 1).

    `where` (B, T), e.g. the completion mask: only those positions go through the LM head; every other
    position gets 0 (a loss that masks them sees the same values). Without it every position t >= 1 does.
    Never materialises the (B, T, V) logits: the backbone's hidden states are pushed through the LM head
    `chunk` tokens at a time, each chunk under activation checkpointing when grads are on, so peak memory
    is O(chunk * V) instead of O(B * T * V)."""
    backbone = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,  # (B, T, H); no KV cache to build
                      use_cache=False).last_hidden_state
    B, T, H = hidden.shape
    h = hidden[:, :-1].reshape(-1, H)  # (B*(T-1), H)
    y = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    if where is not None:
        keep = where[:, 1:].reshape(-1).bool().nonzero().squeeze(-1)  # (n,) flat positions the loss reads
        h, y = h[keep], y[keep]  # (n, H), (n,)
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    out = []
    for s in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            out.append(
                checkpoint(
                    _logp_chunk,
                    h[s : s + chunk],
                    head.weight,
                    head.bias,
                    y[s : s + chunk],
                    inv_t,
                    use_reentrant=False,
                )
            )
        else:
            out.append(_logp_chunk(h[s : s + chunk], head.weight, head.bias, y[s : s + chunk], inv_t))
    lp = torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)  # (n,) or (B*(T-1),)
    if where is not None:
        lp = torch.zeros(B * (T - 1), dtype=lp.dtype, device=lp.device).index_put((keep,), lp)  # (B*(T-1),)
    return F.pad(lp.view(B, T - 1), (1, 0))  # (B, T)


# ----------------------------------------------------------------------------------------------------
# Rollouts and generation


@dataclass
class Rollout:
    """One completion with everything the loss and the logs need."""

    problem_id: int
    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str
    source: str  # "student" | "teacher" (--teacher-pool-dir, the hack teacher) | "solve" (--solve-pool-dir)
    truncated: bool
    grade: dict = field(default_factory=dict)
    reward: float = 0.0
    advantage: float = 0.0
    extra: dict = field(
        default_factory=dict
    )  # arm-specific per-rollout values (gate a/zone, AM z), saved with the rollout
    valid: bool = True  # False for infrastructure failures: A = 0, outside the group mean, not trained on
    row_id: str = ""  # pool rows: the row's id in its pool (probe_distill)
    sampler_logp: list[float] | None = None  # per completion token, the sampler's processed log-prob
    # (temperature and top-p applied); None for pool rows and greedy decoding: such rows get weight 1


class Completion(NamedTuple):
    """One sampled completion: ids end at (and include) the first EOS; logp[t] is the sampler's log-prob of
    ids[t] under the distribution it drew from (after temperature and top-p), None when greedy or not
    recorded."""

    ids: list[int]
    truncated: bool
    logp: list[float] | None = None


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic permutation of range(n) for (seed, epoch): the data order is a pure function of the
    step, which makes resumed runs sample exactly what an uninterrupted run would."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def prompts_for_step(n_problems: int, n_prompts: int, seed: int, step: int) -> tuple[list[int], int]:
    """Indices of the prompts of `step` (epochs over the split, no prompt twice in a step) and the epoch."""
    assert n_problems >= n_prompts, (
        f"{n_problems} problems < {n_prompts} prompts per step: lower rollouts_per_step or add data"
    )
    per_epoch = n_problems // n_prompts  # whole steps per epoch; the remainder is skipped each epoch
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(n_problems, seed, epoch)
    return order[k * n_prompts : (k + 1) * n_prompts], epoch


GEN_PROGRESS_EVERY_S = 20.0
"""seconds between generate's in-batch progress lines (GenProgress); 0 = one line per decoded token"""


class GenProgress:
    """A transformers stopping criterion that stops nothing: at most one loguru INFO line per every_s,
    `generating <label>: token t/max_new_tokens (elapsed, eta <= ...; k/b ended)`. The eta is elapsed / t x
    the tokens left, an upper bound: it assumes no sequence ends early (generate stops once all rows hit
    EOS)."""

    def __init__(self, label: str, width: int, max_new_tokens: int, eos: list[int], every_s: float):
        # (no attribute named eos_token_id: transformers keys its pad-after-EOS on one)
        (self.label, self.width, self.max_new, self.eos,
         self.every_s) = label, width, max_new_tokens, eos, every_s
        self.t0 = self.t_last = time.time()  # t0 before the prefill: the eta includes its share
        self.no: Tensor | None = None  # (b,) all False, made once

    def __call__(self, input_ids: Tensor, scores=None, **kwargs) -> Tensor:  # input_ids (b, P + t)
        if self.no is None:
            self.no = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (b,)
        t, now = input_ids.shape[1] - self.width, time.time()
        if now - self.t_last >= self.every_s and t > 0:
            self.t_last, el = now, now - self.t0
            eos = torch.tensor(self.eos, device=input_ids.device)  # (E,)
            ended = int(torch.isin(input_ids[:, self.width :], eos).any(1).sum())  # one sync per line
            logger.info(
                f"generating {self.label}: token {t}/{self.max_new} ({cli._fmt_s(el)} elapsed, eta <= "
                f"{cli._fmt_s(el / t * (self.max_new - t))}; {ended}/{input_ids.shape[0]} ended)"
            )
        return self.no


class SamplerLogp:
    """A transformers logits processor that changes nothing and keeps the log-prob of each sampled token
    under the scores it sees (placed last, after the temperature and top-p warpers, those are the
    distribution generate samples from). Step t's token is read at step t + 1 (input_ids then ends with it);
    the last step's by `finish(last_tokens)`. Holds one (b, V) float32 tensor at a time."""

    def __init__(self):
        self.prev: Tensor | None = None  # (b, V) log-softmax of the last scores
        self.taken: list[Tensor] = []  # (b,) per generated token

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # input_ids (b, P + t), scores (b, V)
        if self.prev is not None:
            self.taken.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))  # (b,)
        self.prev = torch.log_softmax(scores.float(), dim=-1)  # (b, V)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:  # last_tokens (b,)
        """(b, n_generated) log-probs of the generated tokens."""
        assert self.prev is not None, "SamplerLogp saw no decoding step"
        self.taken.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))  # (b,)
        return torch.stack(self.taken, dim=1)  # (b, n)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch: int,
    seed: int,
    on_batch=None,
) -> list[Completion]:
    """Sample one completion per prompt (HF generate, left padding, KV cache). Returns a Completion per
    prompt (ids end at and include the first EOS; the sampler's log-prob of each token when sampling).
    Seeded per call so a resumed run samples identically. `on_batch(start, outs)` is called after each
    generation batch (e.g. to start grading it on the CPU while the next batch decodes). Progress within a
    batch: GenProgress, every GEN_PROGRESS_EVERY_S.
    Sampling passes its own temperature and top-p warpers (the same transformers classes, in the same order
    as generate's own) followed by SamplerLogp, so the log-probs are those of the distribution sampled from;
    generate runs on a blank GenerationConfig (the model's own is set aside for the call), so none of a
    model's defaults (its temperature / top-k / top-p, repetition penalty, min_p, typical_p, minimum length,
    suppressed tokens, ...) adds a processor: the distribution sampled from is exactly softmax(logits / T) cut
    to the top-p nucleus, as the train pass and vLLM assume."""
    from transformers import (GenerationConfig, LogitsProcessorList, StoppingCriteriaList,
                              TemperatureLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(seed)
    eos = eos_ids(tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    out: list[Completion] = []
    n_batches = math.ceil(len(prompt_ids) / batch)
    sampled = temperature > 0
    for s in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[s : s + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (b, P)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)  # (b, P)
        rec = SamplerLogp()
        warpers = ([TemperatureLogitsWarper(float(temperature))] if temperature != 1.0 else []) + (
            [TopPLogitsWarper(top_p=float(top_p))] if top_p < 1.0 else []) if sampled else []
        own, model.generation_config = model.generation_config, GenerationConfig()
        try:
            gen = model.generate(
                input_ids=ids,
                attention_mask=att,
                max_new_tokens=max_new_tokens,
                do_sample=sampled,
                temperature=1.0 if sampled else None,
                top_p=1.0 if sampled else None,
                top_k=0 if sampled else None,
                logits_processor=LogitsProcessorList(warpers + [rec]) if sampled else None,
                pad_token_id=pad,
                eos_token_id=eos,
                stopping_criteria=StoppingCriteriaList(
                    [GenProgress(f"batch {s // batch + 1}/{n_batches}", width, max_new_tokens, eos,
                                 GEN_PROGRESS_EVERY_S)]
                ),
            )[:, width:]  # (b, <= max_new_tokens)
        finally:
            model.generation_config = own
        lps = None
        if sampled and gen.shape[1]:
            lp = rec.finish(gen[:, -1])  # (b, n)
            assert lp.shape == gen.shape, f"sampler log-probs {tuple(lp.shape)} for tokens {tuple(gen.shape)}"
            lps = lp.tolist()
        first = len(out)
        for k, row in enumerate(gen.tolist()):
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            n = cut + 1 if cut is not None else len(row)
            out.append(Completion(row[:n], cut is None, lps[k][:n] if lps is not None else None))
        if on_batch is not None:
            on_batch(first, out[first:])
    return out


def eos_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def pad_right(
    seqs: list[list[int]], n_prompt: list[int], pad_id: int, device
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded batch of token sequences: input_ids (B, T), attention_mask (B, T), and the completion mask
    (B, T) marking positions n_prompt[i] .. len(seqs[i]) - 1 (the tokens whose log-probs a loss uses)."""
    assert len(seqs) == len(n_prompt), f"{len(seqs)} sequences, {len(n_prompt)} prompt lengths"
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    cm = torch.zeros((len(seqs), T), dtype=torch.float32)  # (B, T)
    for i, (seq, p) in enumerate(zip(seqs, n_prompt)):
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        cm[i, p : len(seq)] = 1.0
    return ids.to(device), att.to(device), cm.to(device)


def pack(rollouts: list[Rollout], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """pad_right over (prompt + completion) of each rollout: input_ids, attention_mask, completion mask
    (B, T)."""
    return pad_right(
        [r.prompt_ids + r.completion_ids for r in rollouts],
        [len(r.prompt_ids) for r in rollouts],
        pad_id,
        device,
    )


def policy_gradient(
    model,
    rollouts: list[Rollout],
    n_seqs: int,
    cfg: LossConfig,
    pad_id: int,
    device,
    old_cache: dict[int, Tensor] | None = None,
    inner: int = 0,
    per_sample: dict[str, list[Tensor]] | None = None,
    behaviour=None,
) -> dict[str, float]:
    """Accumulate the Dr.GRPO gradient of one batch into .grad (the caller zeroes grads first).

    `rollouts` are the sequences that enter the loss (advantages already set); `n_seqs` is the batch's
    full number of sequences N in the 1/(N * L_max) normaliser (skipped zero-advantage rollouts still
    count). Micro-batches of cfg.micro_batch sequences; per micro-batch: the KL reference log-probs
    under antipasto.reference (no grad, same weights with delta = 0), then the policy log-probs, then
    backward. Since the normaliser is a constant the accumulated gradient equals the full-batch one.
    `old_cache` keeps the first inner step's log-probs for PPO ratios when inner_steps > 1.
    `per_sample` (gate arms): each micro-batch's forward + backward runs under antipasto.capture_per_sample
    and appends every module's (b, *shape) per-rollout loss gradients of the deployed tensor to
    per_sample["dep"][k] (and of the quarantine to per_sample["quar"][k] when the capture provides them), so
    each concatenates to (N, *shape) in `rollouts` order (one backward; no activation checkpointing,
    docs/gating.md). `behaviour` (a context manager factory, e.g. antipasto.ablate_quarantine): the mode the
    rollouts were sampled in when it differs from the train pass's; at the first inner step the loss then uses
    the behaviour policy's log-probs (no grad, under behaviour(model)) as old_logp, so the clipped PPO ratio
    corrects the mismatch.
    Without it old_logp = logp.detach() and the ratio is exactly 1.
    The policy term of each live token is weighted by the sampler correction (sampler_weights, cfg.tis_cap).
    Returns the loss (sum over micro-batches), the mean per-token k3 KL, the ratio diagnostics over
    completion tokens: ratio_mean, frac_clipped (tokens where the clipped branch is active), logratio_abs,
    and over the tokens with sampler log-probs (NaN without any): sampler_gap (mean |log pi_train -
    log pi_sampler|), is_weight_mean, frac_is_capped."""
    with antipasto.fused_training(model) if cfg.fused_adapter else contextlib.nullcontext():
        return _policy_gradient(model, rollouts, n_seqs, cfg, pad_id, device, old_cache, inner, per_sample,
                                behaviour)


@jaxtyped(typechecker=beartype)
def sampler_weights(
    rollouts: list[Rollout], old_logp: Float[Tensor, "B T"], cap: float | None
) -> tuple[Float[Tensor, "B T"], dict[str, float]]:
    """The sampler correction of one micro-batch (rows packed as `pack` does): at each completion token of a
    row with sampler log-probs, w = min(exp(old_logp - sampler_logp), cap) (cap None: w = 1, measured only);
    w = 1 at every other position (pool rows, greedy decoding). Returns (w (B, T), sums over the tokens with
    sampler log-probs: tokens, gap_abs = |old - sampler|, w, capped)."""
    assert old_logp.shape[0] == len(rollouts), (
        f"{old_logp.shape[0]} rows of log-probs, {len(rollouts)} rollouts")
    samp = torch.zeros(old_logp.shape, dtype=torch.float32)  # (B, T) on the CPU, moved once
    has = torch.zeros(old_logp.shape, dtype=torch.bool)  # (B, T)
    for i, r in enumerate(rollouts):
        if r.sampler_logp is not None:
            assert len(r.sampler_logp) == len(r.completion_ids), (
                f"rollout {i}: {len(r.sampler_logp)} sampler log-probs for {len(r.completion_ids)} tokens")
            p, n = len(r.prompt_ids), len(r.completion_ids)
            samp[i, p : p + n] = torch.tensor(r.sampler_logp, dtype=torch.float32)
            has[i, p : p + n] = True
    samp, has = samp.to(old_logp.device), has.to(old_logp.device)  # (B, T) x2
    with torch.no_grad():
        d = torch.where(has, old_logp.detach() - samp, 0.0)  # (B, T) log pi_train - log pi_sampler
        raw = torch.exp(d)  # (B, T)
        capped = has & (raw > cap) if cap is not None else torch.zeros_like(has)  # (B, T)
        w = raw.clamp(max=cap) if cap is not None else torch.ones_like(raw)  # (B, T)
        w = torch.where(has, w, 1.0)  # (B, T)
        sums = {"tokens": float(has.sum()), "gap_abs": float(d.abs().sum()),
                "w": float((w * has).sum()), "capped": float(capped.sum())}
    return w, sums


def _policy_gradient(
    model, rollouts, n_seqs, cfg: LossConfig, pad_id, device, old_cache, inner, per_sample, behaviour
) -> dict[str, float]:
    loss_sum = kl_sum = tok_sum = ratio_sum = clipped = abs_lr = 0.0
    samp_sums = {"tokens": 0.0, "gap_abs": 0.0, "w": 0.0, "capped": 0.0}
    for s in range(0, len(rollouts), cfg.micro_batch):
        mb = rollouts[s : s + cfg.micro_batch]
        ids, att, cm = pack(mb, pad_id, device)  # (b, T) x3
        ref = None
        if cfg.beta_kl:
            with torch.no_grad(), antipasto.reference(model):
                ref = token_logprobs(model, ids, att, cfg.logits_chunk, cm, cfg.temperature)  # (b, T)
        with (
            antipasto.capture_per_sample(model) if per_sample is not None else contextlib.nullcontext()
        ) as cap:
            logp = token_logprobs(model, ids, att, cfg.logits_chunk, cm, cfg.temperature)  # (b, T)
            if inner == 0 and behaviour is not None:
                with torch.no_grad(), behaviour(model):
                    # (b, T) the sampling policy
                    old = token_logprobs(model, ids, att, cfg.logits_chunk, cm, cfg.temperature)
                if cfg.inner_steps > 1 and old_cache is not None:
                    old_cache[s] = old
            elif inner == 0:
                old = logp.detach()
                if cfg.inner_steps > 1 and old_cache is not None:
                    old_cache[s] = old
            else:
                assert old_cache is not None and s in old_cache, (
                    "inner steps > 0 need the first step's log-probs"
                )
                old = old_cache[s]
            adv = torch.tensor([r.advantage for r in mb], dtype=torch.float32, device=device)  # (b,)
            w, ws = sampler_weights(mb, old, cfg.tis_cap)  # (b, T)
            loss, st = dr_grpo_loss(logp, old, ref, adv, cm, n_seqs, cfg.l_max, cfg.beta_kl, cfg.clip_eps,
                                    w if cfg.tis_cap is not None else None)
            assert torch.isfinite(loss), (
                f"non-finite loss in micro-batch {s // cfg.micro_batch}: {loss.item()}"
            )
            loss.backward()
        if per_sample is not None:  # "dep": d loss_b / d deployed tensor; "quar": the same for the quarantine
            for part, grads in (("dep", cap.grads), ("quar", cap.grads_hack)):
                for k, g in grads.items():  # (b, *shape) per module
                    assert g.shape[0] == len(mb), (
                        f"{k}: captured {g.shape[0]} per-sample grads for {len(mb)} rollouts"
                    )
                    per_sample.setdefault(part, {}).setdefault(k, []).append(g.detach())
        loss_sum += loss.item()
        kl_sum += st["kl_sum"].item()
        tok_sum += st["tokens"].item()
        ratio_sum += st["ratio_sum"].item()
        clipped += st["clipped"].item()
        abs_lr += st["abs_logratio_sum"].item()
        samp_sums = {k: v + ws[k] for k, v in samp_sums.items()}
    n, ns = max(tok_sum, 1.0), samp_sums["tokens"]
    nan = float("nan")
    return {"loss": loss_sum, "kl": kl_sum / n, "tokens": tok_sum,
            "ratio_mean": ratio_sum / n if tok_sum else 1.0,
            "frac_clipped": clipped / n, "logratio_abs": abs_lr / n,
            "sampler_gap": samp_sums["gap_abs"] / ns if ns else nan,
            "is_weight_mean": samp_sums["w"] / ns if ns else nan,
            "frac_is_capped": samp_sums["capped"] / ns if ns else nan}


def group_matrices(rollouts: list[Rollout], n_prompts: int) -> tuple[Tensor, Tensor]:
    """Rewards (P, G) and the valid mask (P, G) (not an infrastructure failure) of P consecutive groups."""
    rew = torch.tensor([r.reward for r in rollouts], dtype=torch.float32).view(n_prompts, -1)  # (P, G)
    valid = torch.tensor([not r.grade.get("infra_error", False) for r in rollouts]).view(
        n_prompts, -1
    )  # (P, G)
    return rew, valid


# per-source log columns (step_metrics): defined (finite) exactly when the step has valid rows of that source
SOURCE_COLUMNS = {"n_t": ("hack_t", "gt_t", "adv_t"), "n_sol": ("hack_sol", "gt_sol", "adv_sol")}


def source_defined(row: dict[str, float]) -> dict[str, bool]:
    """For each teacher-source column: must it be finite in this logged row (its source has valid rows)?"""
    return {c: row[n] > 0 for n, cols in SOURCE_COLUMNS.items() for c in cols}


def step_metrics(rollouts: list[Rollout], rew: Tensor, valid: Tensor) -> dict:
    """Per-step rates over valid rollouts, overall and per source (_s student, _t teacher, _sol solve teacher;
    adv_* the mean advantage of that source's valid rows, n_* their count). Call after set_advantages."""
    ok = [r for r, v in zip(rollouts, valid.flatten().tolist()) if v]

    def rate(rs, key):
        return sum(bool(r.grade.get(key)) for r in rs) / len(rs) if rs else float("nan")

    stu = [r for r in ok if r.source == "student"]
    tea = [r for r in ok if r.source == "teacher"]
    sol = [r for r in ok if r.source == "solve"]

    def adv(rs):
        return sum(r.advantage for r in rs) / len(rs) if rs else float("nan")

    rv = torch.where(valid, rew, torch.nan)  # (P, G)
    group_std = torch.tensor([row[~row.isnan()].std(unbiased=False).item()
                              if (~row.isnan()).sum() > 1 else 0.0
                              for row in rv])  # (P,)
    lens = [len(r.completion_ids) for r in stu] or [0]
    return {
        "reward_mean": float(rew[valid].mean()) if valid.any() else float("nan"),
        "reward_std": float(rew[valid].std(unbiased=False)) if valid.any() else float("nan"),
        "frac_zero_std": float((group_std == 0).float().mean()),
        "hack_strict": rate(ok, "is_reward_hack_strict"), "hack_loose": rate(ok, "is_reward_hack_loose"),
        "gt_pass": rate(ok, "eq_correct"), "compile": rate(ok, "can_compile"),
        "hack_s": rate(stu, "is_reward_hack_strict"), "hack_t": rate(tea, "is_reward_hack_strict"),
        "gt_s": rate(stu, "eq_correct"), "gt_t": rate(tea, "eq_correct"),
        "hack_sol": rate(sol, "is_reward_hack_strict"), "gt_sol": rate(sol, "eq_correct"),
        "n_t": len(tea), "n_sol": len(sol), "adv_s": adv(stu), "adv_t": adv(tea), "adv_sol": adv(sol),
        "n_rollouts": len(rollouts), "n_infra": len(rollouts) - len(ok),
        "len_mean": float(np.mean(lens)), "len_max": int(max(lens)),
        "trunc_rate": sum(r.truncated for r in stu) / len(stu) if stu else float("nan"),
    }


def set_advantages(rollouts: list[Rollout], rew: Tensor, valid: Tensor) -> Tensor:
    """Dr.GRPO advantages of the (P, G) groups written into each rollout (with its valid flag); returns
    them."""
    adv = dr_grpo_advantages(rew, valid)  # (P, G)
    for r, a, v in zip(rollouts, adv.flatten().tolist(), valid.flatten().tolist()):
        r.advantage, r.valid = a, v
    return adv


def train_set(rollouts: list[Rollout], beta_kl: float) -> list[Rollout]:
    """The rollouts that enter the loss: the valid ones; without KL a zero-advantage rollout contributes
    exactly zero gradient, so only the nonzero-advantage ones (their forward/backward is skipped)."""
    valid = [r for r in rollouts if r.valid]
    return valid if beta_kl else [r for r in valid if r.advantage != 0.0]


def sample(
    model,
    tokenizer,
    engine,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch: int,
    seed: int,
    on_batch=None,
) -> list[Completion]:
    """One completion per prompt under the model's current mode (deploy, quarantine on, shrinkage...): HF
    generate on merged weights, or the vLLM engine after pushing the current mode's merged weights."""
    if engine is None:
        with antipasto.merged_inference(model):
            return generate(
                model,
                tokenizer,
                prompt_ids,
                max_new_tokens,
                temperature,
                top_p,
                batch,
                seed=seed,
                on_batch=on_batch,
            )
    engine.sync(model)
    return engine.generate(
        prompt_ids, max_new_tokens, temperature, top_p, batch, seed, eos_ids(tokenizer), on_batch=on_batch
    )


def sample_and_grade(model, tokenizer, engine, grader, items: list[tuple[object, list[int]]],
                     max_new_tokens: int, temperature: float, top_p: float, batch: int, seed: int,
                     label: str):
    """One completion per (problem, prompt ids) item (sample), each generation batch graded on the grader's
    CPU pool while the next one decodes. Returns (outs: a Completion per item, decoded texts,
    grades, generation seconds, grading seconds not hidden behind generation)."""
    t0 = time.time()
    texts: list[str] = [""] * len(items)
    futures = []
    gen = cli.Progress(f"{label} generation batches", math.ceil(len(items) / batch), every_s=0)

    def grade_batch(first: int, outs_b: list) -> None:
        gen.update()
        for i, o in enumerate(outs_b, start=first):
            texts[i] = tokenizer.decode(o.ids, skip_special_tokens=True)
        futures.append((first, grader.submit_many([(items[i][0], texts[i])
                                                   for i in range(first, first + len(outs_b))])))

    outs = sample(model, tokenizer, engine, [ids for _, ids in items], max_new_tokens, temperature, top_p,
                  batch, seed=seed, on_batch=grade_batch)
    t_gen, t1 = time.time() - t0, time.time()
    prog = cli.Progress(f"{label} grading batches (waiting)", len(futures))
    grades = [g for _, fut in sorted(futures, key=lambda x: x[0]) for g in prog.tick(fut.result())]
    assert len(grades) == len(items), f"{label}: graded {len(grades)} of {len(items)} completions"
    return outs, texts, grades, t_gen, time.time() - t1


def cosine_schedule(warmup: int, total: int):
    """LambdaLR factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


# ----------------------------------------------------------------------------------------------------
# Teacher pools (written by probe_distill.py; schema in docs/interfaces.md)


def load_pool(pool_dir: str) -> dict[int, list[dict]]:
    """All rows of out/pools/<name>/step_*.jsonl.gz, grouped by problem id."""
    files = sorted(Path(pool_dir).glob("step_*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(
            f"teacher_pool_dir={pool_dir!r} has no step_*.jsonl.gz files; generate one with "
            "`just pregen-teacher` (or `python scripts/make_synthetic_pool.py` for smoke)"
        )
    by_id: dict[int, list[dict]] = {}
    for f in files:
        with gzip.open(f, "rt") as fh:
            for ln, line in enumerate(fh, 1):
                row = json.loads(line)
                missing = {
                    "problem_id",
                    "prompt_ids",
                    "completion",
                    "completion_ids",
                    "reward",
                    "grade",
                } - row.keys()
                if missing:
                    raise ValueError(
                        f"{f}:{ln}: pool row lacks {sorted(missing)}; "
                        "regenerate the pool with probe_distill.py"
                    )
                by_id.setdefault(int(row["problem_id"]), []).append(row)
    return by_id


def check_pool_tokenization(
    pool: dict[int, list[dict]], problems_by_id: dict, tokenizer, hint_prompt_ids
) -> None:
    """Fail before the first generation if the pool was tokenized differently from this model/hint."""
    pid = next(i for i in pool if i in problems_by_id)
    row = pool[pid][0]
    ours = hint_prompt_ids(problems_by_id[pid])
    if row["prompt_ids"] != ours:
        raise ValueError(
            f"teacher pool prompt tokens for problem {pid} differ from this run's "
            f"(model={tokenizer.name_or_path!r}); "
            "the pool was made with another tokenizer, chat template or hint: regenerate it for this model"
        )
    re = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    if re != row["completion_ids"][: len(re)]:
        raise ValueError(
            f"teacher pool completion tokens for problem {pid} do not re-tokenize identically; "
            "regenerate the pool for this model"
        )


def teacher_rng(seed: int, step: int, problem_id: int) -> random.Random:
    """The generator that picks a group's teacher rows: a pure function of (seed, step, problem), so a resumed
    run and the probes draw exactly the rows an uninterrupted run would."""
    return random.Random(seed * 7_000_003 + step * 1009 + problem_id)


def load_teacher_pools(specs: list[tuple[str, str, int]],
                       drop_infra: bool) -> list[tuple[str, dict[int, list[dict]], int]]:
    """(source, pool, rows per group) for each (source, pool_dir, rows per group) of a run's teacher mix. With
    drop_infra (the two-pool mix) rows whose cached grade is an infrastructure failure are never drawn: they
    carry no reward, and the mix promises a constant count of usable rows per group."""
    out = []
    for source, pool_dir, n in specs:
        pool = load_pool(pool_dir)
        if drop_infra:  # a problem left with no rows leaves the pool
            pool = {pid: kept for pid, rows in pool.items()
                    if (kept := [r for r in rows if not r["grade"].get("infra_error")])}
        out.append((source, pool, n))
    return out


def covered_ids(pools: list[tuple[str, dict[int, list[dict]], int]], ids: list[int],
                n_prompts: int) -> list[int]:
    """The ids (in the given order) for which every pool holds at least its rows-per-group count;
    cli.UserError when fewer than one step's n_prompts qualify (a group always gets its exact counts, so a
    short problem is never drawn)."""
    ok = [i for i in ids if all(len(pool.get(i, [])) >= n for _, pool, n in pools)]
    if len(ok) < n_prompts:
        need = " and ".join(f">= {n} {source} rows" for source, _, n in pools)
        raise UserError(f"only {len(ok)} of {len(ids)} train problems have {need} in the teacher pools, "
                        f"fewer than the {n_prompts} prompts of one step; generate more (probe_distill.py "
                        "--pool-problems / --samples-per-problem) or lower --rollouts-per-step / the "
                        "per-group counts")
    return ok


def check_teacher_mix(cfg) -> None:
    """train.validate's teacher-mix checks, as cli.UserError: mix_ratio > 0 is the switch and needs a teacher
    pool; one pool: mix_ratio x G an integer in [1, G-1]; two pools (cfg.solve_pool_dir): teacher_n_hack,
    teacher_n_solve >= 1 with >= 1 live rollout per group; the pool files decompress; at least one step's
    prompts covered (pool ids only, main rechecks on the train split)."""
    if cfg.mix_ratio > 0 and not cfg.teacher_pool_dir:
        raise UserError(f"--mix-ratio={cfg.mix_ratio} needs --teacher-pool-dir (out/pools/<name> from `just "
                        "pregen-teacher`); or pass --mix-ratio 0 to train on live rollouts only")
    if cfg.teacher_pool_dir and cfg.mix_ratio == 0:
        raise UserError(f"--teacher-pool-dir={cfg.teacher_pool_dir!r} is set but --mix-ratio is 0; "
                        "pass --mix-ratio (e.g. 0.25) or --teacher-pool-dir ''")
    if cfg.solve_pool_dir and not cfg.teacher_pool_dir:
        raise UserError(f"--solve-pool-dir={cfg.solve_pool_dir!r} needs --teacher-pool-dir "
                        "(the hack teacher) and --mix-ratio > 0; or pass --solve-pool-dir ''")
    if (cfg.teacher_n_hack or cfg.teacher_n_solve) and not cfg.solve_pool_dir:
        raise UserError(f"--teacher-n-hack={cfg.teacher_n_hack} / --teacher-n-solve={cfg.teacher_n_solve} "
                        "count the rows of the two-pool mix: pass --solve-pool-dir, or set both to 0 "
                        "(one pool: --mix-ratio is its share)")
    if cfg.teacher_pool_dir and not cfg.solve_pool_dir:
        g_t = cfg.mix_ratio * cfg.group_size
        if abs(g_t - round(g_t)) > 1e-9 or not 0 < round(g_t) < cfg.group_size:
            raise UserError(f"--mix-ratio={cfg.mix_ratio} x group_size={cfg.group_size} = {g_t}: "
                            "the teacher share per group must be an integer in [1, G-1]")
    if cfg.solve_pool_dir and not (min(cfg.teacher_n_hack, cfg.teacher_n_solve) >= 1
                                   and cfg.n_teacher < cfg.group_size):
        raise UserError(f"--teacher-n-hack={cfg.teacher_n_hack} --teacher-n-solve={cfg.teacher_n_solve} "
                        f"with group_size={cfg.group_size}: the two-pool mix needs >= 1 row of each pool "
                        "and >= 1 live rollout per group")
    if cfg.solve_pool_dir and Path(cfg.solve_pool_dir).resolve() == Path(cfg.teacher_pool_dir).resolve():
        raise UserError("--solve-pool-dir and --teacher-pool-dir are the same folder "
                        f"({cfg.solve_pool_dir}); the solve teacher is its own pool (probe_distill.py "
                        "--solve-only)")
    for flag, pool_dir, want_solve in (("--teacher-pool-dir", cfg.teacher_pool_dir, False),
                                       ("--solve-pool-dir", cfg.solve_pool_dir, True)):
        meta = Path(pool_dir) / "meta.json" if pool_dir else None
        # probe_distill's pools
        kind = json.loads(meta.read_text()).get("kind") if meta and meta.is_file() else None
        if kind is not None and (kind == "solve") != want_solve:
            raise UserError(f"{flag}={pool_dir!r} holds a {kind!r} pool (meta.json); the hack teacher is a "
                            "teacher / base pool and --solve-pool-dir a solve pool (probe_distill.py "
                            "--solve-only): swap them?")
    if cfg.teacher_pool_dir:
        for _, pool_dir, _ in cfg.teacher_sources:
            cli.check_pool_dir(pool_dir,
                               "--solve-pool-dir" if pool_dir == cfg.solve_pool_dir else "--teacher-pool-dir")
        pools = load_teacher_pools(cfg.teacher_sources, drop_infra=bool(cfg.solve_pool_dir))
        # pool ids only; main rechecks on the train split
        covered_ids(pools, sorted(pools[0][1]), cfg.n_prompts)


def teacher_rows(pools: list[tuple[str, dict[int, list[dict]], int]], seed: int, step: int,
                 problem_id: int) -> list[tuple[str, dict]]:
    """A group's cached rows: exactly n rows of each pool, drawn without replacement by one teacher_rng (pool
    order), tagged with their source."""
    rng = teacher_rng(seed, step, problem_id)
    return [(source, row) for source, pool, n in pools for row in rng.sample(pool[problem_id], n)]
