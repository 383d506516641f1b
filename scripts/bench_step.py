"""Time one (or more) GRPO steps of the REAL train.py code paths at a real model shape, random weights.

    python scripts/bench_step.py --shape tiny     # CPU, seconds (what CI runs)
    python scripts/bench_step.py --shape qwen3-4b --gen-len fixed:1536 --steps 2 --warmup-steps 1 \
        --json out/bench/qwen3-4b_fixed1536.json  # GPU: the worst case (every completion at the budget)
    python scripts/bench_step.py --shape qwen3-4b --gen-len typical --gen-batch 128 \
        --json out/bench/qwen3-4b_typical.json
    python scripts/bench_step.py --help           # every field

What is timed, per step (in train.main's order):
  merge      entering antipasto.merged_inference (fold U diag(delta_S) Vh into a weight copy)
  generate   grpo.generate (HF generate, KV cache, temperature/top-p sampling) in batches of --gen-batch
  ref        reference log-probs: grpo.token_logprobs under antipasto.reference, no grad
             (inside policy_gradient)
  policy     policy log-probs with grad (inside policy_gradient; chunked log-softmax, checkpointing)
  backward   the rest of grpo.policy_gradient: loss.backward() (+ pack / loss, negligible)
  surgery    antipasto.surgery on delta_S.grad (random unit directions; --surgery-mode)
  optimizer  clip_grad_norm_ + AdamW.step
ref and policy are split out by wrapping grpo.token_logprobs with a timer (with a CUDA sync), so
backward = policy_gradient total - ref - policy.

Synthetic data: prompts are random token ids, one prompt per group of --group-size, lengths
~ N(--prompt-len-mean, --prompt-len-std) clipped to [--prompt-len-min, --prompt-len-max]. Completion
lengths come from --gen-len: `fixed:N` (every completion N tokens) or `typical[:MEAN,STD,TRUNC]` (a
clipped normal, plus a TRUNC fraction at the max_new_tokens limit; the defaults 450,250,0.03 are an
ASSUMPTION, not measured: replace them with a real run's len_mean / trunc_rate). Generation is forced
to those lengths by giving grpo.generate a tokenizer whose EOS id is outside the vocabulary (EOS can
never be sampled) and max_new_tokens = the longest assigned length in each generation batch: HF
generate keeps computing finished rows until the whole batch stops, so this is exactly the compute of
a real batch with those lengths. The returned rows are then cut to their assigned lengths for training.

Random weights: the model is built from the published config (no download). On the big shapes the
adapter's SVD is replaced by random factors by default (--svd random; timing does not depend on the
values, and an exact full-rank SVD of 252 matrices takes minutes); the tiny shape uses the exact SVD.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import antipasto  # noqa: E402
import grpo  # noqa: E402
import runs  # noqa: E402

# Published Qwen3 configs (hidden, layers, q heads, kv heads, head_dim, intermediate); vocab 151936,
# tied embeddings, rope_theta 1e6, rms_norm_eps 1e-6 for all three. "tiny" is models.py's tiny-random shape.
SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=3000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144),
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728),
}

# Dense (no sparsity) peak tensor FLOP/s for bf16/fp16 and HBM bandwidth, from the vendor datasheets.
# Matched against torch.cuda.get_device_name() in this order (first substring hit wins).
GPU_SPECS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4e12, 4.8e12),
    ("H100 PCIe", 756.0e12, 2.0e12),
    ("H100 NVL", 835.0e12, 3.9e12),
    ("H100", 989.4e12, 3.35e12),  # SXM5 80 GB
    ("A100", 312.0e12, 2.0e12),   # 80 GB SXM (40 GB: 1.56e12)
)

STAGES = ("t_merge", "t_generate", "t_ref", "t_policy", "t_backward", "t_surgery", "t_optimizer")


@dataclass
class BenchConfig:
    """One or more timed GRPO steps at a real shape with random weights."""

    shape: Literal["tiny", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"] = "tiny"
    """model shape (published config, random weights)"""
    gen_len: str = "fixed:16"
    """completion lengths: fixed:N | typical | typical:MEAN,STD,TRUNC (see the module docstring)"""
    max_new_tokens: int = 1536
    """generation limit and Dr.GRPO's constant normaliser L_max (typical's TRUNC fraction lands here)"""
    rollouts: int = 8
    """rollouts per step (prompts x group size)"""
    group_size: int = 4
    """completions per prompt (they share the prompt, as in training)"""
    prompt_len_mean: float = 600.0
    """mean synthetic prompt length (tokens)"""
    prompt_len_std: float = 150.0
    """std of the synthetic prompt length"""
    prompt_len_min: int = 64
    """clip synthetic prompt lengths below"""
    prompt_len_max: int = 1536
    """clip synthetic prompt lengths above (train.py's max_prompt_tokens)"""
    gen_batch: int = 0
    """sequences generated at once (0 = all on CPU; on CUDA sized to the free memory, see auto_gen_batch)"""
    micro_batch: int = 4
    """sequences per forward/backward in the train pass (TrainConfig.micro_batch)"""
    logits_chunk: int = 512
    """tokens per chunk of the chunked log-softmax (TrainConfig.logits_chunk)"""
    grad_checkpointing: bool = False
    """HF activation checkpointing in the train pass (the GPU presets turn it on)"""
    fused_adapter: bool = False
    """time the fused svd train pass (TrainConfig.fused_adapter, antipasto.fused_training)"""
    beta_kl: float = 1e-3
    """KL coefficient; 0 skips the reference pass, as in train.py"""
    temperature: float = 0.7
    """sampling temperature (the full preset's)"""
    top_p: float = 0.95
    """nucleus sampling (the full preset's)"""
    surgery_mode: Literal["measure", "erase", "route"] = "erase"
    """gradient surgery timed after backward (random unit directions)"""
    rank: int = 0
    """adapter rank (0 = full rank, like the presets)"""
    svd: Literal["auto", "exact", "random"] = "auto"
    """adapter factors: exact SVD, or random factors (same shapes, same timing); auto = exact on tiny only"""
    device: str = "auto"
    """cpu | cuda | auto"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """model dtype (adapter deltas stay float32); auto = bfloat16 on CUDA, float32 on CPU"""
    attn: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """attention implementation set on the config"""
    steps: int = 1
    """timed steps (after the warm-up steps)"""
    warmup_steps: int = 0
    """untimed steps first (CUDA kernel selection, allocator warm-up)"""
    seed: int = 0
    """seed for weights, prompts, lengths, sampling"""
    threads: int = 2
    """torch CPU threads (CPU runs share the machine)"""
    json: str = ""
    """write the results here as JSON (e.g. out/bench/qwen3-4b_typical.json)"""
    analytic: bool = False
    ("print the analytic FLOP / HBM-byte lower bounds for this config on H100 and H200 "
     "(meta device, no run)")


# ----------------------------------------------------------------------------------------------------
# small pure helpers


def parse_gen_len(spec: str, max_new_tokens: int) -> tuple[str, tuple[float, ...]]:
    """'fixed:N' -> ('fixed', (N,)); 'typical[:MEAN,STD,TRUNC]' -> ('typical', (MEAN, STD, TRUNC))."""
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        if not arg.isdigit() or not 1 <= int(arg) <= max_new_tokens:
            raise ValueError(f"--gen-len {spec!r}: fixed needs an integer N in [1, "
                             f"max_new_tokens={max_new_tokens}], e.g. fixed:1536")
        return "fixed", (float(arg),)
    if kind == "typical":
        vals = (450.0, 250.0, 0.03) if not arg else tuple(float(x) for x in arg.split(","))
        if len(vals) != 3 or vals[0] <= 0 or vals[1] < 0 or not 0 <= vals[2] <= 1:
            raise ValueError(f"--gen-len {spec!r}: typical takes MEAN,STD,TRUNC with MEAN > 0, STD >= 0, "
                             "0 <= TRUNC <= 1, e.g. typical:450,250,0.03")
        return "typical", vals
    raise ValueError(f"--gen-len {spec!r}: use fixed:N or typical[:MEAN,STD,TRUNC]")


def completion_lengths(spec: str, n: int, max_new_tokens: int, rng: random.Random) -> list[int]:
    """n completion lengths in [1, max_new_tokens] drawn per `spec` (see parse_gen_len)."""
    kind, vals = parse_gen_len(spec, max_new_tokens)
    if kind == "fixed":
        return [int(vals[0])] * n
    mean, std, trunc = vals
    return [max_new_tokens if rng.random() < trunc
            else min(max_new_tokens, max(1, round(rng.gauss(mean, std)))) for _ in range(n)]


def prompt_lengths(n: int, mean: float, std: float, lo: int, hi: int, rng: random.Random) -> list[int]:
    assert 1 <= lo <= hi, (
        f"prompt length clip [{lo}, {hi}] is empty; need 1 <= prompt_len_min <= prompt_len_max")
    return [min(hi, max(lo, round(rng.gauss(mean, std)))) for _ in range(n)]


def kv_bytes_per_token(hf_config, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * bytes."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * dtype_bytes


def auto_gen_batch(free_bytes: float, kv_per_token: int, seq_tokens: int, n: int,
                   headroom: float = 0.8) -> int:
    """Largest generation batch (<= n) whose final KV cache fits in headroom * free_bytes. (Sampling
    buffers of b x vocab floats are small next to the cache at these lengths.)"""
    b = int(headroom * free_bytes // (kv_per_token * seq_tokens))
    return max(1, min(n, b))


def decode_lower_bound(weight_bytes: float, kv_per_token: int, batches: list[tuple[int, int, int]],
                       hbm_bw: float) -> float:
    """Seconds to read, at every decode step, all weights once plus every row's KV cache so far (what a
    memory-bound decoder must move from HBM). batches: (rows, padded prompt width, decode steps)."""
    total = 0.0
    for b, width, steps in batches:
        kv = kv_per_token * b * (steps * width + steps * (steps + 1) / 2)  # rows x sum over steps of context
        total += steps * weight_bytes + kv
    return total / hbm_bw


class _FakeTokenizer:
    """What grpo.generate needs from a tokenizer: pad id 0 and an EOS id outside the vocabulary."""

    unk_token_id = None

    def __init__(self, vocab_size: int):
        self.pad_token_id = 0
        self.eos_token_id = vocab_size  # never sampled: every row runs to max_new_tokens

    def convert_tokens_to_ids(self, token: str):
        return None


@contextlib.contextmanager
def random_svd(seed: int):
    """torch.linalg.svd -> random factors of the right shapes (for wrap_model at the big shapes)."""
    real = torch.linalg.svd

    def fake(A, full_matrices=True, **kw):
        m, n = A.shape[-2:]
        k = min(m, n)
        g = torch.Generator(device=A.device).manual_seed(seed)
        U = torch.randn(m, k, device=A.device, dtype=A.dtype, generator=g) / math.sqrt(m)  # (m, k)
        Vh = torch.randn(k, n, device=A.device, dtype=A.dtype, generator=g) / math.sqrt(n)  # (k, n)
        S = torch.linspace(1.0, 0.01, k, device=A.device, dtype=A.dtype)  # (k,)
        return U, S, Vh

    torch.linalg.svd = fake
    try:
        yield
    finally:
        torch.linalg.svd = real


@contextlib.contextmanager
def timed_logprobs(device: str, acc: dict[str, float]):
    """Wrap grpo.token_logprobs so policy_gradient's calls are timed: no-grad calls -> acc['t_ref'],
    grad calls -> acc['t_policy']."""
    real = grpo.token_logprobs

    def wrapper(*a, **kw):
        sync(device)
        t = time.perf_counter()
        out = real(*a, **kw)
        sync(device)
        acc["t_policy" if torch.is_grad_enabled() else "t_ref"] += time.perf_counter() - t
        return out

    grpo.token_logprobs = wrapper
    try:
        yield
    finally:
        grpo.token_logprobs = real


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mem_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def gpu_specs(device: str, dtype: torch.dtype) -> tuple[str, float | None, float | None]:
    """(device name, peak dense bf16/fp16 FLOP/s or None, HBM bytes/s or None)."""
    if device != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name()
    for key, flops, bw in GPU_SPECS:
        if key in name:
            return name, (flops if dtype in (torch.bfloat16, torch.float16) else None), bw
    return name, None, None


# ----------------------------------------------------------------------------------------------------
# model and data


def build_model(cfg: BenchConfig, device: str, dtype: torch.dtype):
    """Qwen3ForCausalLM at the shape's config with seeded random weights, wrapped with the adapter."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3Config(**SHAPES[cfg.shape], max_position_embeddings=40960, tie_word_embeddings=True,
                     rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf._attn_implementation = cfg.attn
    torch.manual_seed(cfg.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(hf)
    finally:
        torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())  # tied head counted once
    quarantine = cfg.surgery_mode == "route"
    exact = cfg.svd == "exact" or (cfg.svd == "auto" and cfg.shape == "tiny")
    t = time.perf_counter()
    with contextlib.nullcontext() if exact else random_svd(cfg.seed):
        adapters = antipasto.wrap_model(model, rank=cfg.rank or None, quarantine=quarantine)
    sync(device)
    t_wrap = time.perf_counter() - t
    with torch.no_grad():  # a non-zero adapter, as after a few steps
        g = torch.Generator().manual_seed(cfg.seed + 1)
        for a in adapters.values():
            a.delta_S.copy_(1e-3 * torch.randn(a.r, generator=g))
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, adapters, n_params, t_wrap, exact


def make_rollouts(cfg: BenchConfig, vocab: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Prompt ids per rollout (shared within a group) and the assigned completion length of each."""
    if cfg.rollouts % cfg.group_size or cfg.group_size < 1:
        raise ValueError(f"rollouts={cfg.rollouts} must be a positive multiple of "
                         f"group_size={cfg.group_size}")
    n_prompts = cfg.rollouts // cfg.group_size
    plens = prompt_lengths(n_prompts, cfg.prompt_len_mean, cfg.prompt_len_std, cfg.prompt_len_min,
                           cfg.prompt_len_max, rng)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in plens]
    lens = completion_lengths(cfg.gen_len, cfg.rollouts, cfg.max_new_tokens, rng)
    return [p for p in prompts for _ in range(cfg.group_size)], lens


# ----------------------------------------------------------------------------------------------------
# one step


def one_step(cfg, model, adapters, directions, optimizer, params, tcfg, prompt_ids, lens, gen_batch,
             device, seed) -> dict:
    vocab = model.config.vocab_size
    tok = _FakeTokenizer(vocab)
    r: dict = {k: 0.0 for k in STAGES}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t_step = time.perf_counter()

    # ---- generate (as train.main: eval mode, merged inference), batches forced to their assigned lengths
    model.eval()
    completions: list[list[int]] = []
    generated = 0
    batches = []
    with contextlib.ExitStack() as stack:
        t = time.perf_counter()
        stack.enter_context(antipasto.merged_inference(model))
        sync(device)
        r["t_merge"] = time.perf_counter() - t
        t = time.perf_counter()
        for s in range(0, len(prompt_ids), gen_batch):
            chunk, L = prompt_ids[s : s + gen_batch], lens[s : s + gen_batch]
            outs = grpo.generate(model, tok, chunk, max(L), cfg.temperature, cfg.top_p, gen_batch,
                                 seed=seed * 1_000_003 + s)
            for (ids, trunc, _), n in zip(outs, L):
                assert trunc and len(ids) == max(L), (
                    f"forced generation returned {len(ids)} tokens (truncated={trunc}), expected {max(L)}")
                generated += len(ids)
                completions.append(ids[:n])
            batches.append((len(chunk), max(map(len, chunk)), max(L)))
        sync(device)
        r["t_generate"] = time.perf_counter() - t
    r["peak_mem_gen_gb"] = peak_mem_gb(device)

    # ---- train pass: the real grpo.policy_gradient (ref + policy log-probs + backward per micro-batch)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(len(completions), generator=g).tolist()  # non-zero: every rollout is trained on
    rollouts = [grpo.Rollout(0, p, c, "", "student", n == cfg.max_new_tokens, advantage=a)
                for p, c, n, a in zip(prompt_ids, completions, lens, adv)]
    optimizer.zero_grad(set_to_none=True)
    acc = {"t_ref": 0.0, "t_policy": 0.0}
    sync(device)
    t = time.perf_counter()
    with timed_logprobs(device, acc):
        ps = grpo.policy_gradient(model, rollouts, len(rollouts), tcfg, 0, device)
    sync(device)
    t_pg = time.perf_counter() - t
    r["t_ref"], r["t_policy"] = acc["t_ref"], acc["t_policy"]
    r["t_backward"] = t_pg - acc["t_ref"] - acc["t_policy"]

    t = time.perf_counter()
    surg = antipasto.surgery(adapters, directions, cfg.surgery_mode)
    sync(device)
    r["t_surgery"] = time.perf_counter() - t
    t = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    optimizer.step()
    sync(device)
    r["t_optimizer"] = time.perf_counter() - t
    r["t_step"] = time.perf_counter() - t_step
    r["peak_mem_train_gb"] = peak_mem_gb(device)
    assert math.isfinite(grad_norm) and grad_norm > 0, (
        f"grad norm {grad_norm}: the train pass produced no gradient")

    r["completion_tokens"] = sum(len(c) for c in completions)
    r["completion_tokens_computed"] = generated
    r["prompt_tokens"] = sum(map(len, prompt_ids))
    r["train_tokens"] = sum(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    r["train_tokens_padded"] = sum(len(mb) * max(len(x.prompt_ids) + len(x.completion_ids) for x in mb)
                                   for mb in (rollouts[s : s + cfg.micro_batch]
                                              for s in range(0, len(rollouts), cfg.micro_batch)))
    r["loss_tokens"] = ps["tokens"]
    r["gen_batches"] = batches
    r["loss"], r["kl"], r["grad_norm"], r["cos_in"] = ps["loss"], ps["kl"], grad_norm, surg.get("cos_in")
    return r


def run(cfg: BenchConfig) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if device == "cpu" and cfg.shape != "tiny":
        print(f"warning: --shape {cfg.shape} on CPU will be very slow; "
              "the CPU path is meant for --shape tiny", file=sys.stderr)
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    parse_gen_len(cfg.gen_len, cfg.max_new_tokens)  # fail before building anything
    if cfg.steps < 1 or cfg.warmup_steps < 0:
        raise ValueError(f"steps={cfg.steps} must be >= 1 and warmup_steps={cfg.warmup_steps} >= 0")
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)

    t = time.perf_counter()
    model, adapters, n_params, t_wrap, exact = build_model(cfg, device, dtype)
    t_build = time.perf_counter() - t - t_wrap
    hf = model.config
    directions = (None if cfg.surgery_mode == "measure"
                  else antipasto.random_directions(adapters, seed=cfg.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    tcfg = grpo.LossConfig(micro_batch=cfg.micro_batch, logits_chunk=cfg.logits_chunk, beta_kl=cfg.beta_kl,
                           l_max=cfg.max_new_tokens, inner_steps=1, fused_adapter=cfg.fused_adapter,
                           temperature=cfg.temperature)
    prompt_ids, lens = make_rollouts(cfg, hf.vocab_size, rng)
    dbytes = torch.finfo(dtype).bits // 8
    kvb = kv_bytes_per_token(hf, dbytes)
    if cfg.gen_batch:
        gen_batch = cfg.gen_batch
    elif device == "cuda":
        # size to the memory left after the weights, the merged copy and the train pass's share
        free, _ = torch.cuda.mem_get_info()
        merged_bytes = sum(a.base.weight.numel() for a in adapters.values()) * dbytes
        gen_batch = auto_gen_batch(free - merged_bytes, kvb,
                                   max(map(len, prompt_ids)) + max(lens), cfg.rollouts)
    else:
        gen_batch = cfg.rollouts

    steps = []
    for i in range(cfg.warmup_steps + cfg.steps):
        r = one_step(cfg, model, adapters, directions, optimizer, params, tcfg, prompt_ids, lens, gen_batch,
                     device, cfg.seed + i)
        r["warmup"] = i < cfg.warmup_steps
        steps.append(r)
        print(f"step {i} ({'warm-up' if r['warmup'] else 'timed'}): {r['t_step']:.2f}s", file=sys.stderr)
    timed = [s for s in steps if not s["warmup"]]
    mean = {k: sum(s[k] for s in timed) / len(timed) for k in (*STAGES, "t_step")}
    mean["t_train"] = mean["t_ref"] + mean["t_policy"] + mean["t_backward"]
    last = timed[-1]

    name, peak_flops, hbm_bw = gpu_specs(device, dtype)
    # merged inference reads the folded copy, the same size as the base linears
    weight_bytes = n_params * dbytes
    lb_decode = decode_lower_bound(weight_bytes, kvb, last["gen_batches"], hbm_bw) if hbm_bw else None
    train_flops_6n = 6 * n_params * last["train_tokens"]
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_sha": runs.git_sha(),
        "config": dataclasses.asdict(cfg), "device": device, "device_name": name, "dtype": dtype_name,
        "attn": hf._attn_implementation, "svd": "exact" if exact else "random", "params": n_params,
        "adapter_params": sum(a.r for a in adapters.values()), "n_adapters": len(adapters),
        "adapter_buffer_elems": sum(a.U.numel() + a.Vh.numel() for a in adapters.values()),
        "kv_bytes_per_token": kvb, "gen_batch": gen_batch,
        "rollouts": cfg.rollouts, "group_size": cfg.group_size, "gen_len": cfg.gen_len,
        "max_new_tokens": cfg.max_new_tokens, "completion_lengths": lens,
        "completion_tokens_requested": sum(lens),
        "completion_tokens": last["completion_tokens"],
        "completion_tokens_computed": last["completion_tokens_computed"],
        "prompt_tokens": last["prompt_tokens"], "train_tokens": last["train_tokens"],
        "train_tokens_padded": last["train_tokens_padded"], "loss_tokens": last["loss_tokens"],
        "t_build": t_build, "t_wrap": t_wrap,
        **{k: mean[k] for k in (*STAGES, "t_train", "t_step")},
        "gen_tokens_per_s": last["completion_tokens_computed"] / mean["t_generate"],
        "train_tokens_per_s": last["train_tokens"] / mean["t_train"],
        "peak_flops": peak_flops, "hbm_bytes_per_s": hbm_bw,
        "mfu_6n": train_flops_6n / mean["t_train"] / peak_flops if peak_flops else None,
        "decode_lower_bound_s": lb_decode,
        "peak_mem_gen_gb": max(s["peak_mem_gen_gb"] for s in steps),
        "peak_mem_train_gb": max(s["peak_mem_train_gb"] for s in steps),
        "mem_kind": "cuda max_memory_allocated" if device == "cuda" else "cpu process max RSS",
        "loss": last["loss"], "kl": last["kl"], "grad_norm": last["grad_norm"],
        "steps": [{k: v for k, v in s.items() if k != "gen_batches"} for s in steps],
    }
    res["peak_mem_gb"] = max(res["peak_mem_gen_gb"], res["peak_mem_train_gb"])
    return res


def analytic(cfg: BenchConfig, gen_batch: int, mean_prompt: float | None = None) -> dict:
    """FLOP and HBM-byte lower bounds for one step (no measurement; see docs/performance.md).

    N: model params (tied head once); N_lin: params of the wrapped linears; A: adapter branch size
    sum_r r * (d_in + d_out) (the U and Vh elements). Per token, with T the sequence length and a the
    attention score+value FLOPs of a forward (4 * layers * q_heads * head_dim * T / 2, causal):
      ref forward (adapter off)                     2N + a
      policy forward (unmerged adapter)             2N + 2A + a
      recompute (HF activation checkpointing)       2N + 2A + a
      backward (dx only; base frozen) + d(delta_S)  2N + 2A + 2a
    Decode: every step reads all weights (merged copy, N params) + every row's KV cache so far."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        m = Qwen3ForCausalLM(Qwen3Config(**SHAPES[cfg.shape], tie_word_embeddings=True))
    hf = m.config
    N = sum(p.numel() for p in m.parameters())
    lins = antipasto.select_linears(m)
    N_lin = sum(l.weight.numel() for l in lins.values())
    A = sum(min(l.weight.shape) * (l.weight.shape[0] + l.weight.shape[1]) for l in lins.values())
    dbytes = 2
    kvb = kv_bytes_per_token(hf, dbytes)
    rng = random.Random(cfg.seed)
    prompt_ids, lens = make_rollouts(
        dataclasses.replace(cfg, prompt_len_mean=mean_prompt or cfg.prompt_len_mean), 10, rng)
    plens = [len(p) for p in prompt_ids]
    T_mean = sum(p + n for p, n in zip(plens, lens)) / len(lens)
    tokens = sum(plens) + sum(lens)
    a = 4 * hf.num_hidden_layers * hf.num_attention_heads * hf.head_dim * T_mean / 2
    per_tok = {"ref": 2 * N + a, "policy": 2 * N + 2 * A + a,
               "recompute": (2 * N + 2 * A + a) if cfg.grad_checkpointing else 0.0,
               "backward": 2 * N + 2 * A + 2 * a}
    # merged weight forward; delta_S grad needs (Vh x) and (U^T dy) once
    fused = {"ref": 2 * N + a, "policy": 2 * N + a,
             "recompute": (2 * N + a) if cfg.grad_checkpointing else 0.0,
             "backward": 2 * N + 2 * A + 2 * a}
    batches = [(len(prompt_ids[s : s + gen_batch]), max(map(len, prompt_ids[s : s + gen_batch])),
                max(lens[s : s + gen_batch]))
               for s in range(0, len(prompt_ids), gen_batch)]
    kv_peak = max(b * (w + n) for b, w, n in batches) * kvb
    resident = (N + A + N_lin) * dbytes  # weights + U/Vh buffers + merged copy (all bf16)
    out = {"N": N, "N_lin": N_lin, "A": A, "kv_bytes_per_token": kvb, "train_tokens": tokens,
           "completion_tokens": sum(lens), "mean_seq_len": T_mean, "attn_flops_per_token": a,
           "train_flops_per_token": sum(per_tok.values()), "train_flops_per_token_fused": sum(fused.values()),
           "train_flops": tokens * sum(per_tok.values()), "train_flops_fused": tokens * sum(fused.values()),
           "six_n_flops": 6 * N * tokens, "gen_batches": batches, "resident_gb": resident / 1e9,
           "kv_peak_gb": kv_peak / 1e9, "gpus": {}}
    for name, flops, bw in (GPU_SPECS[3], GPU_SPECS[0]):  # H100 SXM, H200
        out["gpus"][name] = {"decode_lb_s": decode_lower_bound(N * dbytes, kvb, batches, bw),
                             "train_s_at_100pct": out["train_flops"] / flops,
                             "train_s_at_50pct": out["train_flops"] / flops / 0.5,
                             "train_fused_s_at_50pct": out["train_flops_fused"] / flops / 0.5}
    return out


def table(res: dict) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"bench_step {res['config']['shape']} | {res['device_name']} {res['dtype']} attn={res['attn']} | "
        f"{res['rollouts']} rollouts (G={res['group_size']}), gen-len {res['gen_len']}, "
        f"gen_batch {res['gen_batch']}, micro_batch {res['config']['micro_batch']}, "
        f"ckpt={res['config']['grad_checkpointing']} | params {res['params'] / 1e6:.1f}M, "
        f"{res['n_adapters']} adapters",
        f"{'stage':<12}{'seconds':>10}",
    ]
    for k in STAGES:
        lines.append(f"{k[2:]:<12}{res[k]:>10.3f}")
    lines += [
        f"{'train':<12}{res['t_train']:>10.3f}   (ref + policy + backward)",
        f"{'step':<12}{res['t_step']:>10.3f}",
        f"tokens: prompt {res['prompt_tokens']}, completion {res['completion_tokens']} "
        f"(computed {res['completion_tokens_computed']}), train {res['train_tokens']} "
        f"(padded {res['train_tokens_padded']})",
        f"gen {res['gen_tokens_per_s']:.1f} tok/s | train {res['train_tokens_per_s']:.1f} tok/s | MFU(6N) "
        f"{f(res['mfu_6n'], '.3f')} | decode HBM lower bound {f(res['decode_lower_bound_s'], '.2f')} s",
        f"peak memory ({res['mem_kind']}): gen {res['peak_mem_gen_gb']:.2f} GB, train "
        f"{res['peak_mem_train_gb']:.2f} GB",
    ]
    return "\n".join(lines)


def main(cfg: BenchConfig) -> dict:
    if cfg.analytic:
        res = analytic(cfg, cfg.gen_batch or cfg.rollouts)
        print(json.dumps(res, indent=2))
        return res
    res = run(cfg)
    print(table(res))
    if cfg.json:
        p = Path(cfg.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {p}")
    return res


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
