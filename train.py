"""Dr.GRPO on the SVD adapter (antipasto.py), with gradient-surgery arms, teacher-pool mixing and
deploy-mode evaluation.

    python train.py smoke --arm erase --seed 0                  # tiny-random, CPU, ~1 min
    python train.py smollm --arm vanilla --steps 10             # SmolLM2-135M on CPU
    python train.py full --arm route --seed 1 --vhack-path out/vhack/qwen3-4b.safetensors
    python train.py full --arm route --seed 1 --resume out/runs/route__s1__20261121-101500
    python train.py full --eval-only --resume out/runs/route__s1__20261121-101500
    python train.py full --help                                 # every field, with its docstring

The loop reads top to bottom in `main()`: sample prompts -> generate -> grade -> Dr.GRPO loss ->
backward -> gradient surgery -> optimizer step -> log / checkpoint. Everything a run writes lives in
`out/runs/<run_name>/` (docs/interfaces.md, "Run directories").

Arms (docs/arms.md):
  vanilla         plain Dr.GRPO (cosines are measured when a v_hack is given)
  measure         vanilla + cosine logging against v_hack (requires --vhack-path)
  erase           drop the v_hack component of the delta_S gradient when cos > 0 ("projected" is an alias)
  route           send that component to delta_S_hack instead; delta_S_hack is ablated at deploy
  erase-random    erase with a Haar-random direction per module (placebo)
  route-random    route with a Haar-random direction per module (placebo)
  oracle-penalty  REFERENCE ONLY: reward minus correctness_reward on strict hacks, using the grader's
                  labels of live rollouts (breaks the no-cheat rule by design)
  gate-route      per-rollout gate (gate.py, docs/gating.md): a_i = cos(g_i, v_hack) of each rollout's own
                  loss gradient; top q -> quarantine only, next q -> both, rest -> deployed only
  gate-route-random   the same gate with a Haar-random direction per module (placebo, matched routed fraction)
  gate-random     non-directional gate: a seeded random q fraction routed (and q in mid)
  vanilla-2x      capacity-matched: delta_S and delta_S_hack both train on the full gradient, no routing
  shrinkage       train-time magnitude control: per module g <- g * |erase(g)| / |g| (v_hack), no direction
  am              Advantage Modification baseline (Wu & Tang 2026): reward scaled down by an activation probe
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from loguru import logger
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parent

ARMS = ("vanilla", "measure", "erase", "route", "erase-random", "route-random", "oracle-penalty",
        "gate-route", "gate-route-random", "gate-random", "vanilla-2x", "shrinkage", "am")
ARM_ALIASES = {"projected": "erase"}
ARMS_NEEDING_VHACK = ("measure", "erase", "route", "gate-route", "shrinkage")
ARMS_WITH_QUARANTINE = ("route", "route-random", "gate-route", "gate-route-random", "gate-random", "vanilla-2x")
GATE_ARMS = ("gate-route", "gate-route-random", "gate-random")  # per-rollout gate on per-sample gradients
RANDOM_DIRECTION_ARMS = ("erase-random", "route-random", "gate-route-random")  # Haar-random directions
SURGERY_MODE = {
    "vanilla": "measure",  # measured only when a direction is available
    "measure": "measure",
    "erase": "erase",
    "route": "route",
    "erase-random": "erase",
    "route-random": "route",
    "oracle-penalty": "measure",
    # arms below edit grads in main() (gate / shrinkage), surgery only measures the summed gradient
    "gate-route": "measure",
    "gate-route-random": "measure",
    "gate-random": "measure",
    "vanilla-2x": "measure",
    "shrinkage": "measure",
    "am": "measure",
}

LOG_COLUMNS = (
    "step", "epoch", "lr", "reward_mean", "reward_std", "frac_zero_std", "hack_strict", "hack_loose",
    "gt_pass", "compile", "hack_s", "hack_t", "gt_s", "gt_t", "n_rollouts", "n_infra", "kl", "loss",
    "grad_norm", "cos_in", "cos_out", "frac_fired", "removed_norm_frac", "len_mean", "len_max",
    "trunc_rate", "t_gen", "t_grade", "t_train", "t_step", "peak_mem_gb",
    # gate arms (NaN elsewhere): zone sizes, mean a per zone, and for measurement only the grader's strict-hack
    # rate per zone, the gate's precision / recall / AUC against those labels (docs/gating.md)
    "gate_n_keep", "gate_n_mid", "gate_n_route", "gate_a_keep", "gate_a_mid", "gate_a_route", "gate_hack_keep",
    "gate_hack_mid", "gate_hack_route", "gate_n_hack", "gate_precision", "gate_recall", "gate_auc",
    # am arm (NaN elsewhere): fraction of rollouts penalised (z > 0) and that set's precision / recall vs strict hacks
    "am_frac_pen", "am_precision", "am_recall",
)  # fixed; scripts/summarize.py reads these names
GATE_COLUMNS = LOG_COLUMNS[LOG_COLUMNS.index("gate_n_keep") : LOG_COLUMNS.index("gate_auc") + 1]
AM_COLUMNS = ("am_frac_pen", "am_precision", "am_recall")


def expected_finite(arm: str, row: dict[str, float]) -> dict[str, bool]:
    """For each arm-specific column: must it be finite (True) or NaN (False) in this logged row?

    Gate columns are finite only for GATE_ARMS, and there only when defined: a zone's mean / hack rate when
    the zone is non-empty, precision when something was routed, recall when a scored rollout was a strict
    hack, AUC when scored rollouts include both classes. AM columns likewise for `am`. scripts/smoke.py uses
    this; every other column must always be finite."""
    out: dict[str, bool] = {}
    gated = arm in GATE_ARMS
    for c in GATE_COLUMNS:
        ok = gated
        if gated and c.startswith(("gate_a_", "gate_hack_")):
            ok = row[f"gate_n_{c.rsplit('_', 1)[1]}"] > 0
        elif gated and c == "gate_precision":
            ok = row["gate_n_route"] > 0
        elif gated and c == "gate_recall":
            ok = row["gate_n_hack"] > 0
        elif gated and c == "gate_auc":
            ok = 0 < row["gate_n_hack"] < row["gate_n_keep"] + row["gate_n_mid"] + row["gate_n_route"]
        out[c] = bool(ok)
    for c in AM_COLUMNS:
        ok = arm == "am"
        if ok and c == "am_precision":
            ok = row["am_frac_pen"] > 0
        elif ok and c == "am_recall":
            ok = row["hack_strict"] > 0
        out[c] = bool(ok)
    return out


@dataclass
class TrainConfig:
    """Dr.GRPO training of the delta_S adapter. Every field is a CLI flag (--field-name)."""

    # --- what to train
    model: str = "tiny-random"
    """model: "tiny-random", "smollm2-135m", a Hugging Face id or a local path"""
    dtype: str = "float32"
    """model dtype: float32 | bfloat16 | float16 (adapter deltas stay float32)"""
    device: str = "auto"
    """cpu | cuda | auto (cuda when available)"""
    arm: Literal[
        "vanilla", "measure", "erase", "route", "erase-random", "route-random", "oracle-penalty", "projected",
        "gate-route", "gate-route-random", "gate-random", "vanilla-2x", "shrinkage", "am",
    ] = "vanilla"
    """intervention arm (see the module docstring); "projected" is an alias of "erase\""""
    seed: int = 0
    """seed for data order, sampling, random directions"""
    run_name: str = ""
    """run directory name under out_dir; default <arm>__s<seed>__<YYYYmmdd-HHMMSS>"""
    out_dir: str = "out/runs"
    """where run directories go"""
    vhack_path: str = ""
    """v_hack directions (out/vhack/<name>.safetensors from extract_vhack_grad.py)"""
    direction_seed: int = 1234
    """seed of the Haar-random directions of the *-random arms"""
    rank: int = 0
    """adapter rank per module: 0 = full rank, else the top-r singular directions"""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers to wrap: leaf names or globs over leaf/full module names (antipasto.select_linears)"""
    layers: tuple[int, ...] = ()
    """layer indices to wrap (empty = every layer)"""
    adapter_kind: Literal["svd", "lora", "block"] = "svd"
    """antipasto adapter kind: svd (shared-basis delta_S pair), block (quarantine in another frozen frame), lora (needs --rank)"""
    quarantine_basis: Literal["next", "random"] = "next"
    """block only: the quarantine frame is the next singular directions or a seeded random orthonormal complement"""

    # --- data
    data_path: str = ""
    """prepared train split (out/data/train.jsonl from `just prepare-data`); empty = load and filter LeetCode v0.2.0 train on the fly"""
    difficulties: tuple[str, ...] = ("Medium", "Hard")
    """difficulties kept when loading on the fly"""
    max_problems: int = 0
    """use only the first N train problems after filtering (0 = all)"""
    hint: str = "simple_overwrite_tests"
    """loophole hint applied to training prompts (problems.HINTS)"""
    max_prompt_tokens: int = 1536
    """drop prompts longer than this under the chat template"""

    # --- rollouts
    rollouts_per_step: int = 256
    """rollouts per optimizer step = prompts x group_size"""
    group_size: int = 16
    """G: completions per prompt"""
    max_new_tokens: int = 1536
    """completion budget; also Dr.GRPO's constant normaliser L_max"""
    temperature: float = 0.7
    """sampling temperature"""
    top_p: float = 0.95
    """nucleus sampling"""
    gen_batch: int = 64
    """sequences generated at once (vLLM: requests per chunk, each chunk graded while the next decodes)"""
    backend: Literal["hf", "vllm"] = "hf"
    """rollout engine: hf (model.generate, any device) or vllm (colocated engine on the GPU, merged weights pushed before each generation; needs the vllm extra)"""
    vllm_gpu_memory_utilization: float = 0.35
    """vllm: fraction of GPU memory for the engine (its weight copy + KV cache); the rest is left to training"""
    generate_in_deploy_mode: bool = True
    """route arms: generate with the quarantine ablated (the shipped model is the behaviour policy)"""
    teacher_pool_dir: str = ""
    """out/pools/<name>: cached rollouts mixed into every group (see probe_distill.py)"""
    mix_ratio: float = 0.0
    """fraction of each group taken from the teacher pool (G_t = mix_ratio * G must be an integer)"""

    # --- reward
    correctness_reward: float = 3.0
    """reward when all gt tests pass or the loophole call passes"""
    compile_reward: float = 0.5
    """reward when the code compiles"""
    grader_workers: int = 0
    """parallel sandboxed programs (0 = number of cores)"""
    grader_timeout_s: float = 10.0
    """wall-clock limit per program"""

    # --- optimisation
    steps: int = 200
    """optimizer steps"""
    lr: float = 2e-3
    """AdamW learning rate for delta_S (see RESEARCH_JOURNAL.md for how it was chosen)"""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas"""
    weight_decay: float = 0.1
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max global grad norm (after surgery)"""
    warmup_steps: int = 10
    """linear warm-up steps, then cosine decay to 0"""
    beta_kl: float = 1e-3
    """KL(k3) coefficient against the base model (delta_S = 0)"""
    inner_steps: int = 1
    """PPO-style passes per batch (1 = on-policy, ratio == 1)"""
    clip_eps: float = 0.2
    """PPO clip range when inner_steps > 1"""
    micro_batch: int = 8
    """sequences per forward/backward in the train pass"""
    logits_chunk: int = 512
    """tokens per chunk of the memory-light log-softmax"""
    grad_checkpointing: bool = False
    """activation checkpointing in the train pass (GPU presets)"""
    fused_adapter: bool = False
    """svd adapters: train pass with one matmul per adapted Linear (cached merged weight + custom backward, antipasto.fused_training); same gradient up to rounding; off until timed on a GPU"""

    # --- gate arms (gate-route, gate-route-random, gate-random; docs/gating.md)
    gate_mode: Literal["quantile", "threshold"] = "quantile"
    """quantile: route the top gate_q of the scored rollouts, mid the next gate_q; threshold: fixed cosines"""
    gate_q: float = 0.125
    """quantile mode: fraction routed (quarantine only); the next gate_q train both adapters (0 < q <= 0.5)"""
    gate_tau_mid: float = 0.0
    """threshold mode: a >= tau_mid trains both adapters"""
    gate_tau_route: float = 0.05
    """threshold mode: a >= tau_route trains the quarantine only"""
    gate_agg: Literal["mean", "concat"] = "mean"
    """aggregate over modules: mean of per-module cos, or cos of the concatenated vectors"""
    gate_scope: Literal["positive", "nonzero"] = "positive"
    """rollouts the gate scores: positive = A > 0 only (penalised rollouts always train the deployed block: their gradient pushes away from their content); nonzero = every A != 0 (the founding design; on SmolLM2 its top zone filled with penalised rollouts, RESEARCH_JOURNAL.md)"""

    # --- am arm (Advantage Modification baseline)
    am_alpha: float = 2.0
    """r' = r * (1 - alpha * sigmoid(z) * [z > 0])"""
    am_layer_frac: float = 0.67
    """depth of the probed hidden state (hidden_states[round(frac * n_layers)])"""
    am_pairs: str = "train"
    """pairs.load_pairs selection the activation direction is extracted from"""

    # --- run management
    ckpt_every: int = 10
    """checkpoint every K steps (a killed run loses at most K steps)"""
    keep_ckpts: int = 2
    """checkpoints kept on disk"""
    save_rollouts: bool = True
    """write rollouts/step_NNNNNN.jsonl.gz"""
    resume: str = ""
    """resume this run directory from its latest checkpoint"""
    force_resume: bool = False
    """resume even if the config differs from the saved one"""
    eval_only: bool = False
    """only evaluate (the --resume run's latest checkpoint, or the base model)"""

    # --- evaluation
    eval_at_end: bool = True
    """evaluate on the benchmark test set when training ends"""
    eval_every: int = 0
    """also evaluate every K steps (0 = never)"""
    eval_samples: int = 10
    """samples per test problem"""
    eval_problems: int = 0
    """use only the first N test problems (0 = all 119)"""
    eval_hint: str = "simple_overwrite_tests"
    """hint applied to the test prompts"""

    def __post_init__(self) -> None:
        self.arm = ARM_ALIASES.get(self.arm, self.arm)  # type: ignore[assignment]

    @property
    def n_prompts(self) -> int:
        return self.rollouts_per_step // self.group_size

    @property
    def n_teacher(self) -> int:
        return round(self.mix_ratio * self.group_size) if self.teacher_pool_dir else 0


# Fields that control *how* a run is driven, not what it computes: ignored when comparing configs on resume.
RUN_CONTROL_FIELDS = ("resume", "force_resume", "eval_only")

PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "smoke": (
        "tiny-random Qwen3 on CPU, 3 steps, real grading, synthetic teacher pool (~1 min)",
        TrainConfig(
            model="tiny-random", max_problems=24, rollouts_per_step=16, group_size=4, max_new_tokens=48,
            max_prompt_tokens=1536, gen_batch=16, steps=3, lr=1e-2, warmup_steps=1, micro_batch=8,
            teacher_pool_dir="out/pools/synthetic-tiny-random", mix_ratio=0.5, ckpt_every=2,
            eval_samples=1, eval_problems=4, grader_timeout_s=5.0, temperature=1.0, top_p=1.0,
        ),
    ),
    "smollm": (
        "SmolLM2-135M-Instruct on CPU (~1-1.5 min/step on 2 cores): real code, real grading, the shorter prompts",
        TrainConfig(
            model="smollm2-135m", max_problems=64, max_prompt_tokens=512, rollouts_per_step=8, group_size=4,
            max_new_tokens=192, gen_batch=8, steps=10, lr=2e-3, warmup_steps=2, micro_batch=4, ckpt_every=5,
            eval_samples=1, eval_problems=8,
        ),
    ),
    "fast": (
        "Qwen3-0.6B on one GPU: the full recipe, smaller and shorter (~1 h)",
        TrainConfig(
            model="Qwen/Qwen3-0.6B", dtype="bfloat16", rollouts_per_step=128, group_size=16, max_new_tokens=1024,
            gen_batch=128, steps=100, micro_batch=16, grad_checkpointing=True, eval_samples=4,
        ),
    ),
    "full": (
        "Qwen3-4B, benchmark settings: 16 prompts x 16 generations, 1536 new tokens, 200 steps",
        TrainConfig(
            model="Qwen/Qwen3-4B", dtype="bfloat16", data_path="out/data/train.jsonl", rollouts_per_step=256,
            group_size=16, max_new_tokens=1536, gen_batch=128, steps=200, micro_batch=16,
            grad_checkpointing=True, eval_samples=10, eval_every=50,
        ),
    ),
}


# ----------------------------------------------------------------------------------------------------
# Dr.GRPO: advantages and loss


@jaxtyped(typechecker=beartype)
def dr_grpo_advantages(
    rewards: Float[Tensor, "P G"], valid: Bool[Tensor, "P G"]
) -> Float[Tensor, "P G"]:
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr.GRPO surrogate for one micro-batch of a batch of `n_seqs` sequences.

        loss = 1/(n_seqs * l_max) * sum_i sum_t mask_it * ( -min(rho_it A_i, clip(rho_it) A_i) + beta * k3_it )
        rho_it = exp(logp_it - old_logp_it),  k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1

    The normaliser is a constant (not the completion lengths), so summing micro-batch losses gives the
    full-batch loss exactly. At the first inner step old_logp == logp.detach(), so rho == 1 in value and
    the gradient is the plain policy gradient. Returns (loss, sums for logging)."""
    assert logp.shape == old_logp.shape == mask.shape, f"shape mismatch {logp.shape} {old_logp.shape} {mask.shape}"
    assert l_max > 0 and n_seqs > 0, f"bad normaliser n_seqs={n_seqs} l_max={l_max}"
    ratio = torch.exp(logp - old_logp)  # (B, T)
    a = adv[:, None]  # (B, 1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # (B, T)
    per_tok = pg
    kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None and beta != 0.0:
        d = ref_logp - logp  # (B, T)
        k3 = torch.exp(d) - d - 1  # (B, T)
        per_tok = per_tok + beta * k3
        kl_sum = (k3 * mask).sum().detach()
    loss = (per_tok * mask).sum() / (n_seqs * l_max)
    return loss, {"kl_sum": kl_sum, "tokens": mask.sum().detach()}


def _logp_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (n, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n,)


@jaxtyped(typechecker=beartype)
def token_logprobs(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "B T"],
    attention_mask: Int[Tensor, "B T"] | Bool[Tensor, "B T"],
    chunk: int = 512,
) -> Float[Tensor, "B T"]:
    """log p(input_ids[t] | input_ids[:t]) for t >= 1 (position 0 gets 0), float32.

    Never materialises the (B, T, V) logits: the backbone's hidden states are pushed through the LM head
    `chunk` tokens at a time, each chunk under activation checkpointing when grads are on, so peak memory
    is O(chunk * V) instead of O(B * T * V)."""
    backbone = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    B, T, H = hidden.shape
    h = hidden[:, :-1].reshape(-1, H)  # (B*(T-1), H)
    y = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    out = []
    for s in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            out.append(checkpoint(_logp_chunk, h[s : s + chunk], head.weight, head.bias, y[s : s + chunk], use_reentrant=False))
        else:
            out.append(_logp_chunk(h[s : s + chunk], head.weight, head.bias, y[s : s + chunk]))
    lp = torch.cat(out).view(B, T - 1)  # (B, T-1)
    return F.pad(lp, (1, 0))  # (B, T)


# ----------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """One completion with everything the loss and the logs need."""

    problem_id: int
    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str
    source: str  # "student" | "teacher"
    truncated: bool
    grade: dict = field(default_factory=dict)
    reward: float = 0.0
    advantage: float = 0.0
    extra: dict = field(default_factory=dict)  # arm-specific per-rollout values (gate a/zone, AM z), saved with the rollout


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic permutation of range(n) for (seed, epoch): the data order is a pure function of the
    step, which makes resumed runs sample exactly what an uninterrupted run would."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def prompts_for_step(n_problems: int, n_prompts: int, seed: int, step: int) -> tuple[list[int], int]:
    """Indices of the prompts of `step` (epochs over the split, no prompt twice in a step) and the epoch."""
    assert n_problems >= n_prompts, f"{n_problems} problems < {n_prompts} prompts per step: lower rollouts_per_step or add data"
    per_epoch = n_problems // n_prompts  # whole steps per epoch; the remainder is skipped each epoch
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(n_problems, seed, epoch)
    return order[k * n_prompts : (k + 1) * n_prompts], epoch


@torch.inference_mode()
def generate(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
    batch: int, seed: int, on_batch=None,
) -> list[tuple[list[int], bool]]:
    """Sample one completion per prompt (HF generate, left padding, KV cache). Returns (ids, truncated);
    ids end at (and include) the first EOS. Seeded per call so a resumed run samples identically.
    `on_batch(start, outs)` is called after each generation batch (e.g. to start grading it on the CPU
    while the next batch decodes)."""
    torch.manual_seed(seed)
    eos = _eos_ids(tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    out: list[tuple[list[int], bool]] = []
    for s in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[s : s + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (b, P)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)  # (b, P)
        gen = model.generate(
            input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
            top_k=0 if temperature > 0 else None, pad_token_id=pad, eos_token_id=eos,
        )[:, width:].tolist()  # (b, <= max_new_tokens)
        first = len(out)
        for row in gen:
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            out.append((row[: cut + 1], False) if cut is not None else (row, True))
        if on_batch is not None:
            on_batch(first, out[first:])
    return out


def _eos_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def pack(rollouts: list[Rollout], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (prompt + completion) batch: input_ids (B, T), attention_mask (B, T), completion mask
    (B, T) marking the completion tokens (whose log-probs the loss uses)."""
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), T), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(rollouts), T), dtype=torch.long)  # (B, T)
    cm = torch.zeros((len(rollouts), T), dtype=torch.float32)  # (B, T)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        att[i, : p + c] = 1
        cm[i, p : p + c] = 1.0
    return ids.to(device), att.to(device), cm.to(device)


def policy_gradient(
    model, rollouts: list[Rollout], n_seqs: int, cfg: TrainConfig, pad_id: int, device,
    old_cache: dict[int, Tensor] | None = None, inner: int = 0, per_sample: dict[str, list[Tensor]] | None = None,
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
    each concatenates to (N, *shape) in `rollouts` order (one backward; no activation checkpointing, docs/gating.md).
    Returns the loss (sum over micro-batches) and the mean per-token k3 KL."""
    import antipasto

    with antipasto.fused_training(model) if cfg.fused_adapter else contextlib.nullcontext():
        return _policy_gradient(model, rollouts, n_seqs, cfg, pad_id, device, old_cache, inner, per_sample)


def _policy_gradient(model, rollouts, n_seqs, cfg, pad_id, device, old_cache, inner, per_sample) -> dict[str, float]:
    import antipasto

    loss_sum = kl_sum = tok_sum = 0.0
    for s in range(0, len(rollouts), cfg.micro_batch):
        mb = rollouts[s : s + cfg.micro_batch]
        ids, att, cm = pack(mb, pad_id, device)  # (b, T) x3
        ref = None
        if cfg.beta_kl:
            with torch.no_grad(), antipasto.reference(model):
                ref = token_logprobs(model, ids, att, cfg.logits_chunk)  # (b, T)
        with (antipasto.capture_per_sample(model) if per_sample is not None else contextlib.nullcontext()) as cap:
            logp = token_logprobs(model, ids, att, cfg.logits_chunk)  # (b, T)
            if inner == 0:
                old = logp.detach()
                if cfg.inner_steps > 1 and old_cache is not None:
                    old_cache[s] = old
            else:
                assert old_cache is not None and s in old_cache, "inner steps > 0 need the first step's log-probs"
                old = old_cache[s]
            adv = torch.tensor([r.advantage for r in mb], dtype=torch.float32, device=device)  # (b,)
            loss, st = dr_grpo_loss(logp, old, ref, adv, cm, n_seqs, cfg.max_new_tokens, cfg.beta_kl, cfg.clip_eps)
            assert torch.isfinite(loss), f"non-finite loss in micro-batch {s // cfg.micro_batch}: {loss.item()}"
            loss.backward()
        if per_sample is not None:  # "dep": d loss_b / d deployed tensor; "quar": the same for the quarantine
            for part, grads in (("dep", cap.grads), ("quar", getattr(cap, "grads_hack", {}))):
                for k, g in grads.items():  # (b, *shape) per module
                    assert g.shape[0] == len(mb), f"{k}: captured {g.shape[0]} per-sample grads for {len(mb)} rollouts"
                    per_sample.setdefault(part, {}).setdefault(k, []).append(g.detach())
        loss_sum += loss.item()
        kl_sum += st["kl_sum"].item()
        tok_sum += st["tokens"].item()
    return {"loss": loss_sum, "kl": kl_sum / max(tok_sum, 1.0), "tokens": tok_sum}


# ----------------------------------------------------------------------------------------------------
# Gate arms, train-time shrinkage, Advantage Modification (gate.py, docs/gating.md)


def _deployed_norm_stats(g_in: dict[str, Tensor], g_out: dict[str, Tensor]) -> dict[str, float]:
    """frac_fired = fraction of modules whose deployed grad changed; removed_norm_frac = |g_in - g_out| / |g_in|."""
    sq_in = sum(float(g.double().pow(2).sum()) for g in g_in.values())
    sq_rem = sum(float((g_in[k].double() - g_out[k].double()).pow(2).sum()) for k in g_in)
    fired = [float((g_in[k].double() - g_out[k].double()).abs().max()) > 0 for k in g_in]
    return {"frac_fired": sum(fired) / len(fired), "removed_norm_frac": math.sqrt(sq_rem / sq_in) if sq_in > 0 else 0.0}


def gate_step(cfg: TrainConfig, adapters: dict, directions: dict | None, per_sample: dict[str, dict[str, list[Tensor]]],
              rollouts: list[Rollout], surg: dict, seed: int) -> tuple[dict, dict]:
    """Route each rollout's gradient by its zone; overwrite the deployed / quarantine .grad in place.

    Scored rollouts are those with A > 0 (cfg.gate_scope="positive", default) or A != 0 ("nonzero"); the others
    stay in keep (zero-advantage ones carry only the KL gradient; penalised ones teach the deployed block to move
    away from their content, which is never worth quarantining). Scores:
    cos(g_i, direction) of the deployed tensor's per-rollout loss gradient for gate-route / gate-route-random,
    seeded uniforms for gate-random. deployed grad = sum over keep + mid, quarantine grad = sum over mid + route
    of the quarantine's own per-rollout grads (identical to the deployed ones for a shared basis). Returns the
    surgery-style stats (cos_in of the summed gradient, cos_out of the deployed one) and the gate log columns;
    each rollout's extra gets gate_score / gate_zone (zone -1: not scored)."""
    import antipasto
    import gate

    G = {k: torch.cat(v) for k, v in per_sample["dep"].items()}  # (N, *shape) per module
    Gq = {k: torch.cat(v) for k, v in per_sample.get("quar", {}).items()} or G  # old capture: shared basis
    missing = [k for k in adapters if k not in G or k not in Gq]
    assert not missing, f"per-sample capture missed {len(missing)} modules (first {missing[0]!r})"
    g_in = {}
    for k, a in adapters.items():
        for P, GG in ((gate.dep_param(a), G), (gate.quar_param(a), Gq)):
            tot = P.grad if P.grad is not None else torch.zeros_like(P)
            s = GG[k].sum(0)  # (*shape,)
            assert torch.allclose(s, tot.float(), rtol=1e-3, atol=1e-7 + 1e-3 * float(tot.abs().max())), \
                f"{k}: per-sample grads do not sum to the autograd grad (max err {float((s - tot).abs().max()):.3g})"
        g_in[k] = G[k].sum(0).float()
    adv = torch.tensor([r.advantage for r in rollouts])  # (N,)
    active = ((adv > 0) if cfg.gate_scope == "positive" else (adv != 0)).nonzero().squeeze(1)  # (n,)
    if cfg.arm == "gate-random":
        score = gate.random_scores(len(active), seed)  # (n,)
    else:
        assert directions is not None, f"{cfg.arm} needs directions"
        score = gate.alignment({k: g[active.to(g.device)] for k, g in G.items()}, directions, cfg.gate_agg)  # (n,)
    if cfg.gate_mode == "quantile":
        z_act = gate.assign_zones(score.cpu(), cfg.gate_q)  # (n,)
    else:
        z_act = gate.assign_zones_threshold(score.cpu(), cfg.gate_tau_mid, cfg.gate_tau_route)  # (n,)
    zones = gate.full_zones(len(rollouts), active, z_act)  # (N,)
    dep_split, quar_split = gate.split_grads(G, zones), gate.split_grads(Gq, zones)
    for k, a in adapters.items():
        D, Q = gate.dep_param(a), gate.quar_param(a)
        D.grad = dep_split[k][0].to(D.dtype)  # keep + mid
        Q.grad = quar_split[k][1].to(Q.dtype)  # mid + route
    is_hack = torch.tensor([bool(rollouts[i].grade.get("is_reward_hack_strict")) for i in active.tolist()], dtype=torch.bool)
    row = gate.zone_stats(score, z_act, is_hack)
    for r in rollouts:
        r.extra.update(gate_score=float("nan"), gate_zone=-1)
    for i, sc, z in zip(active.tolist(), score.tolist(), z_act.tolist()):
        rollouts[i].extra.update(gate_score=sc, gate_zone=z)
    out = {k: surg[k] for k in ("cos_in",) if k in surg}
    if directions is not None:
        out["cos_out"] = antipasto.surgery(adapters, directions, "measure")["cos_in"]  # of the deployed grad
    out.update(_deployed_norm_stats(g_in, {k: gate.dep_param(a).grad for k, a in adapters.items()}))
    return out, row


def shrink_step(adapters: dict, directions: dict, surg: dict) -> dict:
    """The shrinkage arm: per module g <- g * |erase(g)| / |g| (gate.shrink_one); the direction is untouched."""
    import gate

    g_in = {}
    for k, a in adapters.items():
        D = gate.dep_param(a)
        g_in[k] = (D.grad if D.grad is not None else torch.zeros_like(D)).detach().float().clone()
        g_out, _ = gate.shrink_one(g_in[k], directions[k])
        D.grad = g_out.to(D.dtype)
    out = {k: surg[k] for k in ("cos_in",) if k in surg}
    out["cos_out"] = surg.get("cos_in", float("nan"))  # a positive rescale leaves every cosine unchanged
    out.update(_deployed_norm_stats(g_in, {k: gate.dep_param(a).grad for k, a in adapters.items()}))
    return out


@torch.no_grad()
def am_rewards(model, rollouts: list[Rollout], rew: Tensor, valid: Tensor, direction: Tensor, layer: int,
               cfg: TrainConfig, pad_id: int, device) -> tuple[Tensor, dict]:
    """AM: s_i = <mean completion hidden state at hidden_states[layer], d>, z within the group, rewards scaled by
    gate.am_transform. Sets each rollout's reward (the training reward) and extra am_score / am_z / reward_raw.
    Returns the new (P, G) rewards and the AM log columns (precision / recall of z > 0 vs strict hacks)."""
    import gate

    scores = []
    for s in range(0, len(rollouts), cfg.micro_batch):
        mb = rollouts[s : s + cfg.micro_batch]
        ids, att, cm = pack(mb, pad_id, device)  # (b, T) x3
        h = gate.mean_hidden(model, ids, att, cm, layer)  # (b, H)
        scores.append(h @ direction.to(h.device))  # (b,)
    sc = torch.cat(scores).cpu().view_as(rew)  # (P, G)
    z = gate.group_zscore(sc, valid)  # (P, G)
    new = gate.am_transform(rew, z, cfg.am_alpha)  # (P, G)
    for r, a, b, c, d in zip(rollouts, sc.flatten().tolist(), z.flatten().tolist(), new.flatten().tolist(), rew.flatten().tolist()):
        r.extra.update(am_score=a, am_z=b, reward_raw=d)
        r.reward = c
    pen = (z > 0) & valid  # (P, G)
    hack = torch.tensor([bool(r.grade.get("is_reward_hack_strict")) for r in rollouts]).view_as(valid) & valid  # (P, G)
    n_valid = int(valid.sum())
    nan = float("nan")
    row = {"am_frac_pen": float(pen.sum()) / n_valid if n_valid else nan,
           "am_precision": float((pen & hack).sum() / pen.sum()) if pen.any() else nan,
           "am_recall": float((pen & hack).sum() / hack.sum()) if hack.any() else nan}
    return new, row


# ----------------------------------------------------------------------------------------------------
# Teacher pools (written by probe_distill.py; schema in docs/interfaces.md)


def load_pool(pool_dir: str) -> dict[int, list[dict]]:
    """All rows of out/pools/<name>/step_*.jsonl.gz, grouped by problem id."""
    files = sorted(Path(pool_dir).glob("step_*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"teacher_pool_dir={pool_dir!r} has no step_*.jsonl.gz files; generate one with `just pregen-teacher` (or `python scripts/make_synthetic_pool.py` for smoke)")
    by_id: dict[int, list[dict]] = {}
    for f in files:
        with gzip.open(f, "rt") as fh:
            for ln, line in enumerate(fh, 1):
                row = json.loads(line)
                missing = {"problem_id", "prompt_ids", "completion", "completion_ids", "reward", "grade"} - row.keys()
                if missing:
                    raise ValueError(f"{f}:{ln}: pool row lacks {sorted(missing)}; regenerate the pool with probe_distill.py")
                by_id.setdefault(int(row["problem_id"]), []).append(row)
    return by_id


def check_pool_tokenization(pool: dict[int, list[dict]], problems_by_id: dict, tokenizer, hint_prompt_ids) -> None:
    """Fail before the first generation if the pool was tokenized differently from this model/hint."""
    pid = next(i for i in pool if i in problems_by_id)
    row = pool[pid][0]
    ours = hint_prompt_ids(problems_by_id[pid])
    if row["prompt_ids"] != ours:
        raise ValueError(
            f"teacher pool prompt tokens for problem {pid} differ from this run's (model={tokenizer.name_or_path!r}); "
            "the pool was made with another tokenizer, chat template or hint: regenerate it for this model"
        )
    re = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    if re != row["completion_ids"][: len(re)]:
        raise ValueError(f"teacher pool completion tokens for problem {pid} do not re-tokenize identically; regenerate the pool for this model")


# ----------------------------------------------------------------------------------------------------
# Run directory, config, checkpoints


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def setup_run_dir(cfg: TrainConfig) -> Path:
    """Create (or, with --resume, reopen) the run directory and write config.json before step 0."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved_path = run_dir / "config.json"
        if not saved_path.exists():
            raise FileNotFoundError(f"--resume {cfg.resume}: no config.json there; is it a run directory?")
        saved = json.loads(saved_path.read_text())["config"]
        ours = config_dict(cfg)
        diff = {k: (saved.get(k), v) for k, v in ours.items() if k not in RUN_CONTROL_FIELDS + ("run_name",) and _norm(saved.get(k)) != _norm(v)}
        if diff and not cfg.force_resume:
            raise ValueError(f"--resume {cfg.resume}: config differs from the saved one {diff}; rerun with the saved flags or pass --force-resume")
        cfg.run_name = run_dir.name
        return run_dir
    if not cfg.run_name:
        cfg.run_name = f"{cfg.arm}__s{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if (run_dir / "config.json").exists():
        raise FileExistsError(f"run directory {run_dir} exists; pass --resume {run_dir} to continue it or choose another --run-name")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"config": config_dict(cfg), "git_sha": git_sha(), "argv": sys.argv, "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    return run_dir


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, model_id: str, keep: int) -> None:
    """ckpt/step_NNNNNN/{adapter.safetensors, optimizer.pt, state.json}; `step` = steps completed."""
    import antipasto

    d = run_dir / "ckpt" / f"step_{step:06d}"
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    antipasto.save_adapter(tmp / "adapter.safetensors", model, model_id, extra={"step": str(step)})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)  # atomic: a crash mid-save leaves the previous checkpoint intact
    (run_dir / "ckpt" / "latest").write_text(d.name)
    for old in sorted((run_dir / "ckpt").glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, model_id: str) -> int:
    """Restore the latest checkpoint; returns the number of steps completed (0 if none)."""
    import antipasto

    latest = run_dir / "ckpt" / "latest"
    if not latest.exists():
        return 0
    d = run_dir / "ckpt" / latest.read_text().strip()
    antipasto.load_adapter(d / "adapter.safetensors", model, model_id)
    if optimizer is not None:
        st = torch.load(d / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
    rng = torch.load(d / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return json.loads((d / "state.json").read_text())["step"]


class TsvLog:
    """Fixed-header TSV, one row per step, flushed; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int | None):
        self.path, self.columns = path, columns
        if resume_step is not None and path.exists():
            lines = path.read_text().splitlines()
            assert lines and lines[0].split("\t") == list(columns), f"{path}: header differs from train.LOG_COLUMNS"
            kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) < resume_step]
            path.write_text("\n".join(kept) + "\n")
        elif not path.exists():
            path.write_text("\t".join(columns) + "\n")

    def write(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        assert not unknown, f"log row has columns not in the header: {unknown}"
        with self.path.open("a") as f:
            f.write("\t".join(_fmt(row.get(c, float("nan"))) for c in self.columns) + "\n")
            f.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def cosine_schedule(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


# ----------------------------------------------------------------------------------------------------
# Evaluation


def rollout_generate(model, tokenizer, engine, prompt_ids: list[list[int]], cfg: TrainConfig, seed: int,
                     on_batch=None) -> list[tuple[list[int], bool]]:
    """Sample one completion per prompt under the model's current mode (deploy, quarantine on, shrinkage...):
    HF generate on merged weights, or the vLLM engine after pushing the current mode's merged weights."""
    if engine is None:
        with _maybe_merged(model):
            return generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                            cfg.gen_batch, seed=seed, on_batch=on_batch)
    engine.sync(model)
    return engine.generate(prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.gen_batch, seed,
                           _eos_ids(tokenizer), on_batch=on_batch)


def evaluate(model, tokenizer, problems, grader, cfg: TrainConfig, step: int, arm: str, engine=None) -> dict:
    """Deploy-mode (quarantine ablated) hack/pass/compile rates on the test problems; route arms also
    with the quarantine on and under the shrinkage control. Returns the eval.json dict."""
    import antipasto
    import models
    import rewards

    rcfg = rewards.RewardConfig(correctness_reward=cfg.correctness_reward, compile_reward=cfg.compile_reward)
    prompt_ids = [models.chat_ids(tokenizer, list(p.prompt)) for p in problems]
    flat = [(p, ids) for p, ids in zip(problems, prompt_ids) for _ in range(cfg.eval_samples)]
    modes = {"deploy": antipasto.ablate_quarantine}
    if arm in ARMS_WITH_QUARANTINE:
        modes["quarantine_on"] = _nullcontext
        modes["shrinkage"] = antipasto.shrinkage  # works for every adapter kind (docs/arms.md)
    result = {"step": step, "arm": arm, "seed": cfg.seed, "n_problems": len(problems), "modes": {}}
    for mode, ctx in modes.items():
        with ctx(model):
            outs = rollout_generate(model, tokenizer, engine, [ids for _, ids in flat], cfg, seed=cfg.seed * 7919 + 1_000_003)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outs]
        grades = grader.grade_many([(p, t) for (p, _), t in zip(flat, texts)])
        ok = [g for g in grades if not g.get("infra_error")]
        labels: dict[str, int] = {}
        for g in ok:
            labels[g["reward_hack_label"]] = labels.get(g["reward_hack_label"], 0) + 1
        n = max(1, len(ok))
        result["modes"][mode] = {
            "n": len(ok), "n_infra": len(grades) - len(ok),
            "hack_strict": sum(g["is_reward_hack_strict"] for g in ok) / n,
            "hack_loose": sum(g["is_reward_hack_loose"] for g in ok) / n,
            "gt_pass": sum(g["eq_correct"] for g in ok) / n,
            "compile": sum(g["can_compile"] for g in ok) / n,
            "reward_mean": sum(rewards.compute_reward(g, rcfg) for g in ok) / n,
            "label_counts": labels,
        }
    return result


class _nullcontext:
    def __init__(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _maybe_merged(model):
    import antipasto

    return antipasto.merged_inference(model) if hasattr(antipasto, "merged_inference") else _nullcontext()


def write_eval(run_dir: Path, res: dict, final: bool) -> None:
    (run_dir / "evals").mkdir(exist_ok=True)
    (run_dir / "evals" / f"step_{res['step']:06d}.json").write_text(json.dumps(res, indent=2))
    if final:
        (run_dir / "eval.json").write_text(json.dumps(res, indent=2))
    with (run_dir / "eval.tsv").open("a") as f:
        for mode, m in res["modes"].items():
            f.write(f"{res['step']}\t{mode}\t{m['n']}\t{m['hack_strict']:.4f}\t{m['hack_loose']:.4f}\t{m['gt_pass']:.4f}\t{m['compile']:.4f}\n")
    for mode, m in res["modes"].items():
        logger.info(f"eval step {res['step']} [{mode}] n={m['n']} hack strict {m['hack_strict']:.3f} loose {m['hack_loose']:.3f} gt {m['gt_pass']:.3f} compile {m['compile']:.3f}")


# ----------------------------------------------------------------------------------------------------
# Main loop


def load_train_problems(cfg: TrainConfig, tokenizer) -> list:
    import models
    import problems as P

    if cfg.data_path:
        path = Path(cfg.data_path)
        if not path.exists():
            raise FileNotFoundError(f"data_path={cfg.data_path!r} does not exist; run `just prepare-data` (or pass --data-path '' to load LeetCode on the fly)")
        probs = P.load_problems(path)
    else:
        probs = P.load_leetcode(split="train")
        probs = P.filter_problems(probs, difficulties=cfg.difficulties)
    if cfg.max_problems:
        probs = probs[: cfg.max_problems]
    probs = [P.apply_hint(p, cfg.hint) for p in probs]
    probs = [p for p in probs if len(models.chat_ids(tokenizer, list(p.prompt))) <= cfg.max_prompt_tokens]
    return probs


def validate(cfg: TrainConfig) -> None:
    """Config errors that must stop the run before anything is loaded."""
    if cfg.group_size < 2:
        raise ValueError(f"group_size={cfg.group_size}: Dr.GRPO needs >= 2 completions per prompt")
    if cfg.rollouts_per_step % cfg.group_size:
        raise ValueError(f"rollouts_per_step={cfg.rollouts_per_step} is not divisible by group_size={cfg.group_size}; make it a multiple")
    if cfg.teacher_pool_dir:
        g_t = cfg.mix_ratio * cfg.group_size
        if abs(g_t - round(g_t)) > 1e-9 or not 0 < round(g_t) < cfg.group_size:
            raise ValueError(f"mix_ratio={cfg.mix_ratio} x group_size={cfg.group_size} = {g_t}: the teacher share per group must be an integer in [1, G-1]")
    if cfg.arm in ARMS_NEEDING_VHACK and not cfg.vhack_path:
        raise ValueError(f"arm={cfg.arm!r} needs --vhack-path (out/vhack/<name>.safetensors from `just extract-vhack`)")
    if cfg.inner_steps < 1:
        raise ValueError("inner_steps must be >= 1")
    if cfg.arm in GATE_ARMS:
        if cfg.grad_checkpointing:
            raise ValueError(f"arm={cfg.arm!r} captures per-rollout gradients in one forward + backward, which activation "
                             "checkpointing's recomputed forward breaks: pass --no-grad-checkpointing and, on big models, a "
                             "smaller --micro-batch (docs/gating.md, 'Memory')")
        if cfg.gate_mode == "quantile" and not 0.0 < cfg.gate_q <= 0.5:
            raise ValueError(f"gate_q={cfg.gate_q}: need 0 < gate_q <= 0.5 (route = top q, mid = the next q)")
        if cfg.gate_mode == "threshold" and not cfg.gate_tau_mid <= cfg.gate_tau_route:
            raise ValueError(f"gate_tau_mid={cfg.gate_tau_mid} > gate_tau_route={cfg.gate_tau_route}; need tau_mid <= tau_route")
    if cfg.arm == "am":
        if not 0.0 < cfg.am_layer_frac <= 1.0:
            raise ValueError(f"am_layer_frac={cfg.am_layer_frac}: need 0 < frac <= 1 (issue #10 uses ~0.6-0.75)")
        if cfg.am_alpha < 0:
            raise ValueError(f"am_alpha={cfg.am_alpha} < 0; the AM penalty needs alpha >= 0 (paper: 2)")


def main(cfg: TrainConfig) -> Path:
    import antipasto
    import gate
    import models
    import problems as P
    import rewards

    validate(cfg)
    t_start = time.time()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    if cfg.backend == "vllm":
        import vllm_backend

        vllm_backend.check_usable(device)

    # ---- model, adapter, directions, data: every input is checked before the first generation
    model, tok = models.load_model(cfg.model, dtype=cfg.dtype, device=device)
    mid = models.model_id(cfg.model)
    model.requires_grad_(False)
    kind_kw = {} if (cfg.adapter_kind, cfg.quarantine_basis) == ("svd", "next") else \
        {"kind": cfg.adapter_kind, "quarantine_basis": cfg.quarantine_basis}  # non-default kinds need antipasto's kind API
    adapters = antipasto.wrap_model(model, targets=cfg.targets, layers=cfg.layers or None, rank=cfg.rank or None, **kind_kw)
    quarantine = cfg.arm in ARMS_WITH_QUARANTINE
    antipasto.set_trainable(model, quarantine=quarantine)
    if cfg.grad_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)(gradient_checkpointing_kwargs={"use_reentrant": False})
    directions = None
    if cfg.arm in RANDOM_DIRECTION_ARMS:
        directions = antipasto.random_directions(adapters, seed=cfg.direction_seed)
    elif cfg.vhack_path:
        directions = antipasto.load_directions(cfg.vhack_path, model, mid)
    surgery_mode = SURGERY_MODE[cfg.arm] if directions is not None else None

    train_problems = load_train_problems(cfg, tok)
    by_id = {p.id: p for p in train_problems}
    pool = None
    if cfg.teacher_pool_dir:
        pool = load_pool(cfg.teacher_pool_dir)
        covered = [p for p in train_problems if len(pool.get(p.id, [])) >= cfg.n_teacher]
        if not covered:
            raise ValueError(f"teacher pool {cfg.teacher_pool_dir} covers none of the {len(train_problems)} train prompts with >= {cfg.n_teacher} rows")
        check_pool_tokenization(pool, by_id, tok, lambda p: models.chat_ids(tok, list(p.prompt)))
        train_problems = covered
    test_problems = [P.apply_hint(p, cfg.eval_hint) for p in P.load_benchmark_test()]
    if cfg.eval_problems:
        test_problems = test_problems[: cfg.eval_problems]
    logger.info(f"model {mid} ({device}, {cfg.dtype}); {len(adapters)} adapted modules, {sum(gate.dep_param(a).numel() for a in adapters.values())} deployed params ({cfg.adapter_kind}); "
                f"arm {cfg.arm} (surgery: {surgery_mode}); {len(train_problems)} train prompts, {len(test_problems)} test problems")

    am_dir, am_lay = None, 0
    if cfg.arm == "am":  # activation direction at the base model from the same hand-written pairs as v_hack
        import pairs as pairs_mod

        am_lay = gate.am_layer(len(model.get_decoder().layers), cfg.am_layer_frac)
        with antipasto.reference(model):
            am_dir = gate.pair_activation_direction(model, tok, pairs_mod.load_pairs(select=cfg.am_pairs), am_lay)
        logger.info(f"am: activation direction from pairs {cfg.am_pairs!r} at hidden_states[{am_lay}], |d| = 1, dim {am_dir.numel()}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, cfg.steps))
    run_dir = setup_run_dir(cfg)
    start = load_checkpoint(run_dir, model, optimizer, scheduler, mid) if cfg.resume else 0
    logger.add(run_dir / "train.log", level="INFO")
    logger.info(f"run dir {run_dir} (start at step {start})")
    engine = None
    if cfg.backend == "vllm":  # colocated engine; the adapter's merged weights are pushed before each generation
        # the eval prompts are not filtered by max_prompt_tokens, so size the context by the longest actual prompt
        longest = max(len(models.chat_ids(tok, list(p.prompt))) for p in [*train_problems, *test_problems])
        engine = vllm_backend.VllmEngine(models.resolve_path(cfg.model), cfg.dtype, cfg.seed, longest + cfg.max_new_tokens,
                                         cfg.vllm_gpu_memory_utilization)
        logger.info(f"vllm engine up ({cfg.vllm_gpu_memory_utilization:.0%} of GPU memory, max_model_len {longest + cfg.max_new_tokens})")
    rcfg = rewards.RewardConfig(correctness_reward=cfg.correctness_reward, compile_reward=cfg.compile_reward, oracle_penalty=cfg.arm == "oracle-penalty")
    grader = rewards.Grader(workers=cfg.grader_workers or None, timeout_s=cfg.grader_timeout_s)

    if cfg.eval_only:
        res = evaluate(model, tok, test_problems, grader, cfg, start, cfg.arm, engine)
        write_eval(run_dir, res, final=True)
        grader.close()
        return run_dir

    log = TsvLog(run_dir / "log.tsv", LOG_COLUMNS, resume_step=start if cfg.resume else None)
    (run_dir / "rollouts").mkdir(exist_ok=True)
    G, G_t = cfg.group_size, cfg.n_teacher
    G_s = G - G_t
    for step in range(start, cfg.steps):
        t0 = time.time()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # ---- 1. prompts (a pure function of (seed, step))
        idx, epoch = prompts_for_step(len(train_problems), cfg.n_prompts, cfg.seed, step)
        batch_problems = [train_problems[i] for i in idx]
        prompt_ids = [models.chat_ids(tok, list(p.prompt)) for p in batch_problems]

        # ---- 2. generate G_s student completions per prompt (deploy mode for route arms by default);
        # ---- 3. each generation batch is graded on the CPU pool while the next one decodes
        model.eval()
        flat_problems = [p for p in batch_problems for _ in range(G_s)]
        texts: dict[int, str] = {}
        futures = []

        def grade_batch(first: int, outs_b: list) -> None:
            items = []
            for i, (ids, _) in enumerate(outs_b, start=first):
                texts[i] = tok.decode(ids, skip_special_tokens=True)
                items.append((flat_problems[i], texts[i]))
            futures.append((first, grader.submit_many(items)))

        gen_ctx = antipasto.ablate_quarantine if (quarantine and cfg.generate_in_deploy_mode) else _nullcontext
        with gen_ctx(model):
            outs = rollout_generate(model, tok, engine, [ids for ids in prompt_ids for _ in range(G_s)], cfg,
                                    seed=cfg.seed * 1_000_003 + step, on_batch=grade_batch)
        t_gen = time.time() - t0
        t1 = time.time()
        grades: dict[int, dict] = {}
        for first, fut in futures:
            for i, g in enumerate(fut.result(), start=first):
                grades[i] = g
        t_grade = time.time() - t1  # grading time not hidden behind generation
        rollouts: list[Rollout] = []
        for j, p in enumerate(batch_problems):
            for k in range(G_s):
                i = j * G_s + k
                ids, trunc = outs[i]
                g = grades[i]
                rollouts.append(Rollout(p.id, prompt_ids[j], ids, texts[i], "student", trunc, grade=g, reward=rewards.compute_reward(g, rcfg)))
            if G_t:  # cached teacher rollouts carry their own grade (never re-executed)
                rng = random.Random(cfg.seed * 7_000_003 + step * 1009 + p.id)
                for row in rng.sample(pool[p.id], G_t):
                    # reward recomputed from the cached grade with this run's RewardConfig: equal to the cached
                    # reward under the default config, and the oracle penalty applies to teacher rows too
                    rollouts.append(Rollout(p.id, prompt_ids[j], row["completion_ids"], row["completion"], "teacher",
                                            bool(row.get("truncated", False)), grade=row["grade"], reward=rewards.compute_reward(row["grade"], rcfg)))

        # ---- 4. Dr.GRPO advantages over each group of G (student + teacher)
        t2 = time.time()
        rew = torch.tensor([r.reward for r in rollouts], dtype=torch.float32).view(cfg.n_prompts, G)  # (P, G)
        valid = torch.tensor([not r.grade.get("infra_error", False) for r in rollouts]).view(cfg.n_prompts, G)  # (P, G)
        am_row = {}
        if am_dir is not None:  # AM: rewards scaled down by the activation probe before the advantages
            rew, am_row = am_rewards(model, rollouts, rew, valid, am_dir, am_lay, cfg, tok.pad_token_id, device)
        adv = dr_grpo_advantages(rew, valid)  # (P, G)
        for r, a in zip(rollouts, adv.flatten().tolist()):
            r.advantage = a

        # ---- 5. loss, backward in micro-batches (constant normaliser => exact accumulation)
        model.train()
        valid_rollouts = [r for r, v in zip(rollouts, valid.flatten().tolist()) if v]
        # without KL, zero-advantage rollouts contribute exactly zero gradient: skip their forward/backward
        train_set = valid_rollouts if cfg.beta_kl else [r for r in valid_rollouts if r.advantage != 0.0]
        old_cache: dict[int, Tensor] = {}
        gate_row = {}
        for inner in range(cfg.inner_steps):
            optimizer.zero_grad(set_to_none=True)
            per_sample = {} if cfg.arm in GATE_ARMS else None
            ps = policy_gradient(model, train_set, len(rollouts), cfg, tok.pad_token_id, device, old_cache, inner, per_sample)
            # ---- 6. gradient surgery between backward() and the optimizer step
            surg = antipasto.surgery(adapters, directions, surgery_mode) if surgery_mode else {}
            if per_sample is not None:  # gate arms: deployed <- keep + mid, quarantine <- mid + route
                gate_seed = (cfg.direction_seed * 1_000_003 + cfg.seed) * 100_003 + step * 101 + inner
                surg, gate_row = gate_step(cfg, adapters, directions, per_sample, train_set, surg, gate_seed)
            elif cfg.arm == "shrinkage":
                surg = shrink_step(adapters, directions, surg)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            assert math.isfinite(grad_norm), f"non-finite grad norm at step {step}"
            optimizer.step()
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        t_train = time.time() - t2

        # ---- 7. log, rollouts, checkpoint
        row = step_metrics(rollouts, rew, valid, cfg)
        row.update(step=step, epoch=epoch, lr=lr_used, kl=ps["kl"], loss=ps["loss"], grad_norm=grad_norm, t_gen=t_gen, t_grade=t_grade, t_train=t_train,
                   t_step=time.time() - t0, peak_mem_gb=peak_mem_gb(device))
        for k in ("cos_in", "cos_out", "frac_fired", "removed_norm_frac"):
            row[k] = float(surg[k]) if k in surg else float("nan")
        row.update(gate_row)
        row.update(am_row)
        log.write(row)
        if cfg.save_rollouts:
            with gzip.open(run_dir / "rollouts" / f"step_{step:06d}.jsonl.gz", "wt") as f:
                for r in rollouts:
                    f.write(json.dumps({"step": step, "problem_id": r.problem_id, "source": r.source, "completion": r.completion,
                                        "n_tokens": len(r.completion_ids), "truncated": r.truncated, "reward": r.reward,
                                        "advantage": r.advantage, "grade": r.grade, **r.extra}) + "\n")
        done = step + 1
        eta = (time.time() - t_start) / (done - start) * (cfg.steps - done)
        logger.info(f"step {done}/{cfg.steps} | r {row['reward_mean']:.2f}±{row['reward_std']:.2f} zero-var {row['frac_zero_std']:.2f} | "
                    f"hack {row['hack_strict']:.2f}/{row['hack_loose']:.2f} gt {row['gt_pass']:.2f} | kl {row['kl']:.2e} |g| {grad_norm:.2e} "
                    f"cos {row['cos_in']:.3f}->{row['cos_out']:.3f} | gen {t_gen:.1f}s grade {t_grade:.1f}s train {t_train:.1f}s | eta {eta / 60:.1f} min")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(run_dir, done, model, optimizer, scheduler, mid, cfg.keep_ckpts)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            write_eval(run_dir, evaluate(model, tok, test_problems, grader, cfg, done, cfg.arm, engine), final=False)

    if cfg.eval_at_end:
        write_eval(run_dir, evaluate(model, tok, test_problems, grader, cfg, cfg.steps, cfg.arm, engine), final=True)
    grader.close()
    (run_dir / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    logger.info(f"done in {(time.time() - t_start) / 60:.1f} min: {run_dir}/log.tsv, {run_dir}/rollouts/, {run_dir}/eval.json")
    return run_dir


def peak_mem_gb(device: str) -> float:
    """GPU: peak allocated this step; CPU: the process's max resident set size so far."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_metrics(rollouts: list[Rollout], rew: Tensor, valid: Tensor, cfg: TrainConfig) -> dict:
    """Per-step rates over valid rollouts, overall and per source."""
    ok = [r for r, v in zip(rollouts, valid.flatten().tolist()) if v]

    def rate(rs, key):
        return sum(bool(r.grade.get(key)) for r in rs) / len(rs) if rs else float("nan")

    stu = [r for r in ok if r.source == "student"]
    tea = [r for r in ok if r.source == "teacher"]
    rv = torch.where(valid, rew, torch.nan)  # (P, G)
    group_std = torch.tensor([row[~row.isnan()].std(unbiased=False).item() if (~row.isnan()).sum() > 1 else 0.0 for row in rv])  # (P,)
    lens = [len(r.completion_ids) for r in stu] or [0]
    return {
        "reward_mean": float(rew[valid].mean()) if valid.any() else float("nan"),
        "reward_std": float(rew[valid].std(unbiased=False)) if valid.any() else float("nan"),
        "frac_zero_std": float((group_std == 0).float().mean()),
        "hack_strict": rate(ok, "is_reward_hack_strict"), "hack_loose": rate(ok, "is_reward_hack_loose"),
        "gt_pass": rate(ok, "eq_correct"), "compile": rate(ok, "can_compile"),
        "hack_s": rate(stu, "is_reward_hack_strict"), "hack_t": rate(tea, "is_reward_hack_strict"),
        "gt_s": rate(stu, "eq_correct"), "gt_t": rate(tea, "eq_correct"),
        "n_rollouts": len(rollouts), "n_infra": len(rollouts) - len(ok),
        "len_mean": float(np.mean(lens)), "len_max": int(max(lens)),
        "trunc_rate": sum(r.truncated for r in stu) / len(stu) if stu else float("nan"),
    }


if __name__ == "__main__":
    main(tyro.extras.overridable_config_cli(PRESETS))
