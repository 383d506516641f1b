"""Teacher / base rollout pools and the cheap cosine probes that gate the expensive sweep.

    python probe_distill.py smoke                               # whole chain on tiny-random (CPU, 1-3 min)
    python probe_distill.py smoke --teacher-only                # only the teacher pool
    python probe_distill.py smollm --base-only                  # only the base pool (SmolLM2, CPU)
    python probe_distill.py smollm --solve-only \
        --solve-source canonical                                # the solve teacher's pool (docs/probes.md)
    python probe_distill.py organism --solve-only               # the organism's own correct no-hint rollouts
    python probe_distill.py smollm --probe-distill              # NLL-gradient cosines of the pools' rows
    python probe_distill.py smollm --probe-mixed                # Dr.GRPO-gradient cosines on mixed groups
    python probe_distill.py full --teacher-only --adapter out/runs/<run>/ckpt/step_000100/adapter.safetensors
    python probe_distill.py full --help                         # every field, with its docstring

Exactly one of --teacher-only / --base-only / --solve-only / --probe-distill / --probe-mixed runs that stage;
none runs the teacher, base and probe stages in that order (the solve pool only on request). Every probe
stage rewrites out/probes/<name>/report.md from what exists there.

1. Pools (out/pools/<pool>/step_NNN.jsonl.gz, the schema train.py --teacher-pool-dir reads):
   teacher = the model (+ optional --adapter checkpoint) prompted WITH the loophole hint (--teacher-hint);
   base    = the unadapted model (antipasto.reference) prompted WITHOUT it (--base-hint none).
   solve   = the solve teacher of train.py --solve-pool-dir: the unadapted model's completions of the prompt
             WITHOUT any hint (--solve-source model) or the dataset's canonical solutions
             (--solve-source canonical), kept only when the environment's reward on the hint-free problem is
             the full correctness reward. With no loophole in the prompt that means the ground-truth tests
             passed; no hack label is ever read.
   Every row's `prompt_ids` is the TRAINING prompt (train.py's hint, --hint), which is what train.py checks
   and conditions the loss on; the prompt actually sampled from is `gen_prompt_ids`. Every row is graded
   against the training problem, so cached rewards mean what live rewards mean in train.py (docs/probes.md).
2. NLL probe: per-sample delta_S gradients of sum_t NLL_t / L_max over the completion tokens
   (antipasto.capture_per_sample: one backward per batch) -> cos(g_i, v_hack) per module, mean over modules,
   bucketed by pool x grader label (hack = is_reward_hack_strict, correct = eq_correct, other), Welch t-tests,
   and what erase would do (cos_out, frac_fired) per sample and for each bucket's summed gradient.
3. Mixed probe: groups of G rows per prompt, mix_ratio*G from pool A (teacher) and the rest from pool B
   (base); cached rewards -> grpo.dr_grpo_advantages -> grpo.policy_gradient (train.py's step 5, the same
   function) -> antipasto.surgery for the vanilla (measure) and erase arms; per-sample contributions.
4. report.md: the numbers and the go / no-go rules (docs/probes.md).

Sign convention (extract_vhack_grad.py): v points along +grad(NLL_hack - NLL_clean). A hack sample's NLL
gradient should have cos > 0; a Dr.GRPO loss gradient that reinforces hacks (A > 0) has g.v > 0, which is
exactly what erase removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import math
import os
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from loguru import logger
from torch import Tensor

import cli
import gate
import grpo
import problems as P
import runs

ROOT = Path(__file__).resolve().parent
STAGES = ("teacher_only", "base_only", "solve_only", "probe_distill", "probe_mixed")
# no stage flag: these, in order
DEFAULT_STAGES = ("teacher_only", "base_only", "probe_distill", "probe_mixed")
LABELS = ("hack", "correct", "other")
POOL_KINDS = ("teacher", "base", "solve")
# fields whose values must equal train.py's for the probe to measure the gradient a run would see
SHARED_TRAIN_FIELDS = (
    "model", "dtype", "targets", "layers", "rank", "train_source", "data_path", "difficulties",
    "max_problems", "hint", "max_prompt_tokens", "max_new_tokens", "temperature", "top_p", "gen_batch",
    "correctness_reward", "compile_reward", "grader_workers", "grader_timeout_s", "micro_batch", "beta_kl",
    "logits_chunk", "lr", "betas", "weight_decay", "grad_clip", "warmup_steps", "seed",
)


@dataclass
class ProbeConfig:
    """Pool generation and cosine probes. Every field is a CLI flag (--field-name)."""

    # --- which stage (none = all four, in order)
    teacher_only: bool = False
    """generate the teacher pool only"""
    base_only: bool = False
    """generate the base pool only"""
    solve_only: bool = False
    """generate the solve teacher's pool only (train.py --solve-pool-dir)"""
    probe_distill: bool = False
    """run the NLL-gradient probe only (pools must exist)"""
    probe_mixed: bool = False
    """run the Dr.GRPO-gradient probe on mixed groups only (pools must exist)"""
    name: str = "smoke"
    """probe output folder: out/probes/<name>/"""
    probes_dir: str = "out/probes"
    """where probe folders go"""

    # --- model and adapter layout (must match the training run / the v_hack file)
    model: str = "tiny-random"
    """model: "tiny-random", "smollm2-135m", a Hugging Face id or a local path"""
    dtype: str = "float32"
    """model dtype: float32 | bfloat16 | float16"""
    device: str = "auto"
    """cpu | cuda | auto"""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers wrapped (as train.py --targets)"""
    layers: tuple[int, ...] = ()
    """layer indices wrapped (empty = all; as train.py --layers)"""
    rank: int = 0
    """adapter rank (0 = full; as train.py --rank)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""

    # --- problems (the training prompts: same loader and filters as train.py)
    train_source: Literal["hub", "local-v0.2.0"] = "local-v0.2.0"
    """training problems (as train.py's --train-source)"""
    data_path: str = ""
    """prepared train split (as train.py --data-path); empty = LeetCode train on the fly"""
    difficulties: tuple[str, ...] = ("Medium", "Hard")
    """difficulties kept when loading on the fly"""
    max_problems: int = 0
    """first N train problems after filtering (as train.py; 0 = all)"""
    hint: str = "simple_overwrite_tests"
    """the TRAINING hint: every row's prompt_ids is the prompt with this hint (train.py checks it)"""
    max_prompt_tokens: int = 1536
    """drop prompts longer than this (as train.py)"""

    # --- pools
    pools_dir: str = "out/pools"
    """where pool folders go"""
    teacher_pool: str = ""
    """teacher pool name under pools_dir (or a path); empty = <model>-teacher"""
    base_pool: str = ""
    """base pool name under pools_dir (or a path); empty = <model>-base"""
    solve_pool: str = ""
    """solve pool name under pools_dir (or a path); empty = <model>-solve"""
    solve_source: Literal["model", "canonical"] = "model"
    """solve pool rows: the unadapted model's hint-free samples, or each problem's canonical solution"""
    adapter: str = ""
    """teacher checkpoint (e.g. out/runs/<run>/ckpt/step_000100/adapter.safetensors); empty = base model"""
    adapter_mode: Literal["full", "deploy"] = "full"
    """teacher with a route checkpoint: full = delta_S + delta_S_hack, deploy = quarantine ablated"""
    teacher_hint: str = "simple_overwrite_tests"
    """hint the teacher samples under"""
    base_hint: str = "none"
    """hint the base model samples under"""
    teacher_prefix: str = ""
    """text forced at the start of each teacher completion (the model continues it; stored in the completion),
    e.g. a top-level run_tests stub for a model too small to hack on its own. Empty = free sampling"""
    pool_problems: int = 0
    """generate for the first N training problems (0 = all)"""
    samples_per_problem: int = 8
    """completions per problem per pool"""
    problems_per_file: int = 16
    """problems per step_NNN.jsonl.gz file (existing files are kept: a killed generation resumes)"""
    overwrite: bool = False
    """regenerate pool files that already exist"""
    max_new_tokens: int = 1536
    """completion budget; also the constant L_max normaliser of both probes (as train.py)"""
    temperature: float = 0.7
    """sampling temperature"""
    top_p: float = 0.95
    """nucleus sampling"""
    gen_batch: int = 64
    """sequences generated at once"""
    seed: int = 0
    """seed for sampling, row selection and prompt order"""
    correctness_reward: float = 3.0
    """reward when all gt tests or the loophole call pass (as train.py)"""
    compile_reward: float = 0.5
    """reward when the code compiles (as train.py)"""
    grader_workers: int = 0
    """parallel sandboxed programs (0 = number of cores)"""
    grader_timeout_s: float = 10.0
    """wall-clock limit per program"""

    # --- probes
    vhack_path: str = "out/vhack/smoke-tiny-random.safetensors"
    """v_hack directions (extract_vhack_grad.py); must match model/targets/layers/rank"""
    probe_adapter: str = ""
    """adapter loaded for the probes (empty = delta_S = 0, the state at step 0 of a run)"""
    probe_pools: tuple[str, ...] = ()
    """pools of the NLL probe (names or paths); empty = (teacher_pool, base_pool)"""
    distill_samples: int = 64
    """rows per pool in the NLL probe (random, seeded; 0 = all)"""
    distill_batch: int = 8
    """sequences per forward/backward in the NLL probe"""
    mixed_steps: int = 4
    """batches of the Dr.GRPO probe"""
    mixed_prompts: int = 4
    """prompts per batch"""
    group_size: int = 8
    """G: rows per prompt"""
    mix_ratio: float = 0.5
    """fraction of each group from pool A (the teacher pool); the rest comes from pool B (the base pool)"""
    mixed_update: bool = False
    """also take AdamW steps (as train.py), one trajectory per arm; else the gradient at fixed delta_S"""
    per_sample: bool = True
    """per-sample contributions in the mixed probe (needs no activation checkpointing)"""
    micro_batch: int = 8
    """sequences per forward/backward of the Dr.GRPO gradient (as train.py)"""
    beta_kl: float = 1e-3
    """KL coefficient (as train.py)"""
    logits_chunk: int = 512
    """tokens per chunk of the log-softmax (as train.py)"""
    lr: float = 2e-3
    """AdamW lr (mixed_update only; as train.py)"""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas (mixed_update only)"""
    weight_decay: float = 0.1
    """AdamW weight decay (mixed_update only)"""
    grad_clip: float = 1.0
    """max global grad norm after surgery (mixed_update only)"""
    warmup_steps: int = 10
    """linear warm-up steps (mixed_update only)"""

    # --- decision rules (docs/probes.md)
    go_cos: float = 0.2
    """vanilla cos_in above this on most (> half) mixed steps -> projection plausible"""
    zero_cos: float = 0.05
    """|vanilla cos_in| below this on every step counts as ~0"""
    alpha: float = 0.01
    """Welch t-test level for 'the hack bucket separates from the rest'"""

    def pool_dir(self, kind: str) -> Path:
        assert kind in POOL_KINDS, f"pool kind must be one of {POOL_KINDS}, got {kind!r}"
        name = {"teacher": self.teacher_pool, "base": self.base_pool, "solve": self.solve_pool}[kind]
        return resolve_pool(name or f"{Path(self.model).name}-{kind}", self.pools_dir)

    @property
    def out_dir(self) -> Path:
        return Path(self.probes_dir) / self.name


# Memory (full): per-sample capture cannot use activation checkpointing (each adapter must run forward once),
# so the probes' batches are small: ~4 MB of saved activations per token for Qwen3-4B in bf16, 2 sequences of
# <= 3k tokens ~ 25 GB. gen_batch 64 keeps the KV cache (~0.15 MB/token) near 30 GB at 3k tokens.
PRESETS: dict[str, tuple[str, ProbeConfig]] = {
    "smoke": (
        "tiny-random on CPU: 4 problems x 4 samples per pool, 24 new tokens, 2 mixed steps (~1 min)",
        ProbeConfig(
            name="smoke", model="tiny-random", max_problems=4, samples_per_problem=4, problems_per_file=2,
            max_new_tokens=24, temperature=1.0, top_p=1.0, gen_batch=16, grader_timeout_s=5.0,
            vhack_path="out/vhack/smoke-tiny-random.safetensors", distill_samples=16, mixed_steps=2,
            mixed_prompts=2, group_size=4, micro_batch=8, lr=1e-2, warmup_steps=1,
        ),
    ),
    "smollm": (
        "SmolLM2-135M-Instruct on CPU: 4 problems x 4 samples per pool, 192 new tokens, prompts <= 512 "
        "tokens (as train.py smollm)",
        ProbeConfig(
            name="smollm", model="smollm2-135m", max_problems=64, max_prompt_tokens=512, pool_problems=4,
            samples_per_problem=4, problems_per_file=4, max_new_tokens=192, gen_batch=16,
            vhack_path="out/vhack/smollm2-135m_mean.safetensors", distill_samples=16, distill_batch=4,
            mixed_steps=2, mixed_prompts=2, group_size=4, micro_batch=4, warmup_steps=2,
        ),
    ),
    "organism": (
        "the CPU model organism (`just organism-build`): its train problems x 8 samples, 96 new tokens, "
        "T = 1 (as train.py organism); the teacher is forced to open with a run_tests stub",
        ProbeConfig(
            name="organism", model="organism", data_path="out/models/organism/problems_train.jsonl",
            problems_per_file=32, samples_per_problem=8, max_new_tokens=96, temperature=1.0, top_p=1.0,
            gen_batch=64, grader_workers=1, teacher_prefix="```python\ndef run_tests():",
            vhack_path="out/vhack/organism.safetensors", distill_samples=32, mixed_steps=2, mixed_prompts=4,
            group_size=8, micro_batch=32, lr=0.2, warmup_steps=0,
        ),
    ),
    "full": (
        "Qwen3-4B on one GPU: 128 problems x 8 samples per pool, 1536 new tokens, 8 mixed steps of 16 x 16 "
        "(~1 GPU-hour)",
        ProbeConfig(
            name="qwen3-4b", model="Qwen/Qwen3-4B", dtype="bfloat16", train_source="hub",
            data_path="out/data/train.jsonl", pool_problems=128, samples_per_problem=8, problems_per_file=32,
            max_new_tokens=1536, gen_batch=64, vhack_path="out/vhack/qwen3-4b_mean.safetensors",
            distill_samples=256, distill_batch=2, mixed_steps=8, mixed_prompts=16, group_size=16,
            micro_batch=2,
        ),
    ),
}


def resolve_pool(name: str, pools_dir: str) -> Path:
    """A pool name ("qwen3-4b-teacher") lives under pools_dir; anything with a "/" is a path."""
    return Path(name) if ("/" in name or Path(name).is_dir()) else Path(pools_dir) / name


def loss_config(cfg: ProbeConfig) -> grpo.LossConfig:
    """The train-pass settings whose step 5 the probe reproduces (one inner step, no fused adapter)."""
    return grpo.LossConfig(micro_batch=cfg.micro_batch, l_max=cfg.max_new_tokens, beta_kl=cfg.beta_kl,
                           logits_chunk=cfg.logits_chunk, temperature=cfg.temperature)


# ----------------------------------------------------------------------------------------------------
# Model and problems


def setup(cfg: ProbeConfig) -> dict:
    """Model (wrapped like train.py), tokenizer, the training problems, device."""
    import antipasto
    import models

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    logger.info(f"loading model {cfg.model} ({cfg.dtype}, {device}); a hub model downloads first")
    t_load = time.time()
    model, tok = models.load_model(cfg.model, dtype=cfg.dtype, device=device)
    logger.info(f"model loaded in {time.time() - t_load:.0f}s")
    model.requires_grad_(False)
    adapters = antipasto.wrap_model(model, targets=cfg.targets, layers=cfg.layers or None,
                                    rank=cfg.rank or None)
    probs, _ = P.load_train_split(cfg.train_source, cfg.data_path, cfg.difficulties, cfg.max_problems,
                                  cfg.hint, cfg.max_prompt_tokens, models.prompt_len(tok),
                                  progress=cli.Progress("train prompts measured (length filter)"))
    if not probs:
        raise ValueError(f"no training problems left after filtering (max_problems={cfg.max_problems}, "
                         f"max_prompt_tokens={cfg.max_prompt_tokens}); "
                         "raise --max-problems or --max-prompt-tokens")
    return {"model": model, "tok": tok, "adapters": adapters, "mid": models.model_id(cfg.model),
            "device": device, "problems": probs, "by_id": {p.id: p for p in probs}}


def set_adapter(env: dict, path: str) -> None:
    """Load an adapter checkpoint (empty path: zero both deltas, the base model)."""
    import antipasto

    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"adapter {path!r} does not exist "
                                    "(expected out/runs/<run>/ckpt/step_NNNNNN/adapter.safetensors)")
        antipasto.load_adapter(path, env["model"], env["mid"])
        return
    with torch.no_grad():
        for a in env["adapters"].values():
            a.delta_S.zero_()
            a.delta_S_hack.zero_()


# ----------------------------------------------------------------------------------------------------
# 1. Pools


def label_of(grade: dict) -> str:
    """hack = is_reward_hack_strict, correct = eq_correct, other = everything else."""
    if grade.get("is_reward_hack_strict"):
        return "hack"
    if grade.get("eq_correct"):
        return "correct"
    return "other"


def canonical_ids(tok, text: str, sampled: list[int], truncated: bool) -> list[int]:
    """completion_ids stored in a pool row: the tokenizer's own tokenization of the decoded (graded) text,
    plus the sampled end-of-turn token when the completion ended. Sampled ids are often not the canonical
    BPE of their text (always for a random model, sometimes for a real one) and special tokens mid-text
    are dropped by decoding; grpo.check_pool_tokenization needs text and ids to agree."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids if truncated else ids + sampled[-1:]


def pool_summary(rows: list[dict]) -> dict:
    """Hack / correct / compile rates, reward distribution, label counts over the non-infra rows."""
    ok = [r for r in rows if not r["grade"].get("infra_error")]
    n = max(len(ok), 1)
    rew: dict[str, int] = {}
    for r in ok:
        rew[f"{float(r['reward']):g}"] = rew.get(f"{float(r['reward']):g}", 0) + 1
    labels: dict[str, int] = {}
    for r in ok:
        lab = r["grade"].get("reward_hack_label", "?")
        labels[lab] = labels.get(lab, 0) + 1
    return {
        "n": len(rows), "n_infra": len(rows) - len(ok), "n_problems": len({r["problem_id"] for r in rows}),
        "hack_strict": sum(bool(r["grade"].get("is_reward_hack_strict")) for r in ok) / n,
        "hack_loose": sum(bool(r["grade"].get("is_reward_hack_loose")) for r in ok) / n,
        "correct": sum(bool(r["grade"].get("eq_correct")) for r in ok) / n,
        "compile": sum(bool(r["grade"].get("can_compile")) for r in ok) / n,
        "truncated": sum(bool(r.get("truncated")) for r in ok) / n,
        "reward_mean": sum(float(r["reward"]) for r in ok) / n,
        "reward_counts": dict(sorted(rew.items(), key=lambda kv: float(kv[0]))),
        "label_counts": labels,
        "len_mean": sum(len(r["completion_ids"]) for r in ok) / n,
        "retokenize_rate": sum(bool(r.get("retokenizes", True)) for r in ok) / n,
    }


def fenced(code: str) -> str:
    """A solution in the answer format every prompt asks for (problems.py): one ```python block."""
    return "```python\n" + code.strip("\n") + "\n```"


def end_of_turn_id(tok) -> int:
    """The token a chat completion ends with (<|im_end|> for the repo's chat models), else the tokenizer's
    EOS."""
    i = tok.convert_tokens_to_ids("<|im_end|>")
    return i if isinstance(i, int) and i >= 0 and i != tok.unk_token_id else tok.eos_token_id


def solve_keeps(env_grade: dict, rcfg) -> bool:
    """The solve pool's selection rule: the environment's reward of the completion on the HINT-FREE problem is
    the full correctness reward. With no loophole in the prompt (eq_hinted is False) that means the
    ground-truth tests passed. Only rewards.compute_reward with rcfg (no oracle penalty) is consulted: never a
    hack label."""
    assert not rcfg.oracle_penalty, (
        "the solve pool's rule uses the environment's reward only (no oracle penalty)")
    assert env_grade.get("hint", "none") == "none", (
        f"solve rows are selected on the hint-free problem, got {env_grade.get('hint')!r}")
    import rewards

    assert rcfg.correctness_reward > 0 and rcfg.compile_reward >= 0, (
        f"the full correctness reward must be > 0: {rcfg}")
    full = rcfg.correctness_reward + rcfg.compile_reward  # a program that passes its tests compiles
    return not env_grade["infra_error"] and rewards.compute_reward(env_grade, rcfg) >= full


def generate_pool(cfg: ProbeConfig, env: dict, kind: str, grader) -> Path:
    """Write out/pools/<pool>/step_NNN.jsonl.gz (+ meta.json); returns the pool dir. See docs/probes.md."""
    import antipasto
    import models
    import problems as P
    import rewards

    model, tok = env["model"], env["tok"]
    out = cfg.pool_dir(kind)
    out.mkdir(parents=True, exist_ok=True)
    gen_hint = {"teacher": cfg.teacher_hint, "base": cfg.base_hint, "solve": "none"}[kind]
    canonical = kind == "solve" and cfg.solve_source == "canonical"
    if gen_hint not in P.HINTS:
        raise ValueError(f"--{kind}-hint {gen_hint!r} is not a hint; use one of {', '.join(P.HINTS)}")
    probs = env["problems"][: cfg.pool_problems or None]
    rcfg = rewards.RewardConfig(correctness_reward=cfg.correctness_reward, compile_reward=cfg.compile_reward)
    if kind == "teacher":
        set_adapter(env, cfg.adapter)
        mode_ctx = antipasto.ablate_quarantine if cfg.adapter_mode == "deploy" else contextlib.nullcontext
    else:
        mode_ctx = antipasto.reference  # the unadapted model, whatever adapter is loaded
    meta = {"kind": kind, "model_id": env["mid"], "solve_source": cfg.solve_source if kind == "solve" else "",
            "adapter": cfg.adapter if kind == "teacher" else "",
            "adapter_mode": cfg.adapter_mode if kind == "teacher" else "", "gen_hint": gen_hint,
            "train_hint": cfg.hint, "samples_per_problem": cfg.samples_per_problem,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "git_sha": runs.git_sha(),
            "prefix": cfg.teacher_prefix if kind == "teacher" else "",
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else None
    same = ("kind", "model_id", "solve_source", "adapter", "adapter_mode", "gen_hint", "train_hint", "prefix")
    if old and not cfg.overwrite and any(old.get(k, "") != meta[k] for k in same):
        diff = {k: (old.get(k), meta[k]) for k in same if old.get(k, "") != meta[k]}
        raise cli.UserError(f"{out} holds a pool generated with other settings {diff} (old, new); "
                            f"pass --overwrite or another --{kind}-pool name")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    model.eval()
    n_files = math.ceil(len(probs) / cfg.problems_per_file)
    for k in range(n_files):
        path = out / f"step_{k:03d}.jsonl.gz"
        if path.exists() and not cfg.overwrite:
            logger.info(f"{path} exists, kept (--overwrite regenerates)")
            continue
        chunk = probs[k * cfg.problems_per_file : (k + 1) * cfg.problems_per_file]
        gen_probs = [P.apply_hint(p, gen_hint) for p in chunk]
        train_ids = [models.chat_ids(tok, list(p.prompt)) for p in chunk]  # what train.py conditions on
        gen_ids = [models.chat_ids(tok, list(p.prompt)) for p in gen_probs]  # what we sample from
        flat = [j for j in range(len(chunk)) for _ in range(1 if canonical else cfg.samples_per_problem)]
        t0 = time.time()
        seed = (cfg.seed * 1_000_003 + zlib.crc32(kind.encode()) + k * 7919) % 2**31
        prefix = cfg.teacher_prefix if kind == "teacher" else ""
        # forced start of the answer
        pre_ids = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        if canonical:  # the dataset's solution as a completion that ended (end-of-turn), never sampled
            outs = [(tok(fenced(chunk[j].canonical_solution), add_special_tokens=False)["input_ids"]
                     + [end_of_turn_id(tok)], False) for j in flat]
        else:
            with mode_ctx(model):
                outs = [(o.ids, o.truncated) for o in grpo.sample(  # (pool rows keep no sampler log-probs)
                    model, tok, None, [gen_ids[j] + pre_ids for j in flat], cfg.max_new_tokens,
                    cfg.temperature, cfg.top_p, cfg.gen_batch, seed=seed)]
        # the row's completion is prefix + continuation (what the grader sees and the loss trains on)
        if pre_ids:
            outs = [(pre_ids + ids, trunc) for ids, trunc in outs]
        texts = [tok.decode(ids, skip_special_tokens=True) for ids, _ in outs]
        t_gen = time.time() - t0
        # graded as train.py grades: training hint
        grades = grader.grade_many([(chunk[j], t) for j, t in zip(flat, texts)])
        keep = [True] * len(flat)
        # selected on the hint-free problem by the environment's reward alone (solve_keeps)
        if kind == "solve":
            env_rcfg = rewards.RewardConfig(correctness_reward=cfg.correctness_reward,
                                            compile_reward=cfg.compile_reward)
            env_grades = grader.grade_many([(gen_probs[j], t) for j, t in zip(flat, texts)])
            # and the cached training-hint grade agrees that the tests passed (a flaky second run is not a
            # solve row)
            keep = [solve_keeps(ge, env_rcfg) and bool(gt["eq_correct"])
                    for ge, gt in zip(env_grades, grades)]
        rows = []
        for i, (j, (ids, trunc), text, g) in enumerate(zip(flat, outs, texts, grades)):
            p = chunk[j]
            if not keep[i]:
                continue
            comp = canonical_ids(tok, text, ids, trunc)
            row = {
                "problem_id": p.id, "row_id": f"{kind}-{p.id}-{i % cfg.samples_per_problem}", "kind": kind,
                "prompt_ids": train_ids[j], "gen_prompt_ids": gen_ids[j], "completion": text,
                "completion_ids": comp, "truncated": trunc, "reward": rewards.compute_reward(g, rcfg),
                "grade": g, "label": label_of(g), "source_model": env["mid"], "adapter": meta["adapter"],
                "hint": gen_hint, "train_hint": cfg.hint, "retokenizes": comp == ids,
            }
            if comp != ids:
                # what the sampler produced (non-canonical BPE or special tokens mid-text)
                row["sampled_ids"] = ids
            rows.append(row)
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)  # atomic: a killed run never leaves a half file that train.py would read
        s = pool_summary(rows)
        logger.info(f"{path}: {len(rows)} rows "
                    f"(of {len(flat)} {'canonical solutions' if canonical else 'samples'}), "
                    f"gen {t_gen:.1f}s, hack {s['hack_strict']:.2f} correct {s['correct']:.2f} "
                    f"reward {s['reward_mean']:.2f}")
    rows = [r for rs in grpo.load_pool(str(out)).values() for r in rs]
    summ = pool_summary(rows)
    summ.update(pool=str(out), kind=kind, gen_hint=gen_hint, adapter=meta["adapter"])
    (out / "summary.json").write_text(json.dumps(summ, indent=1))
    print(f"[{kind} pool] {out}: {summ['n']} rows over {summ['n_problems']} problems | "
          f"strict hack {summ['hack_strict']:.3f} loose {summ['hack_loose']:.3f} "
          f"correct {summ['correct']:.3f} compile {summ['compile']:.3f} | "
          f"reward mean {summ['reward_mean']:.3f} counts {summ['reward_counts']} | "
          f"labels {summ['label_counts']} | infra {summ['n_infra']}")
    return out


# ----------------------------------------------------------------------------------------------------
# Loading pools as rollouts


def load_rows(pool_dir: Path, env: dict) -> list[dict]:
    """All rows of a pool for the training problems, each tagged with `pool` and a stable `row_id`;
    checks the pool's prompt tokens against the training prompt (grpo.check_pool_tokenization)."""
    import models

    pool = grpo.load_pool(str(pool_dir))
    by_id = env["by_id"]
    if not any(pid in by_id for pid in pool):
        raise ValueError(f"pool {pool_dir} covers none of the {len(by_id)} training problems; "
                         "generate it with the same --max-problems / --data-path / --hint as this probe")
    tok = env["tok"]
    grpo.check_pool_tokenization(pool, by_id, tok, lambda p: models.chat_ids(tok, list(p.prompt)))
    rows = []
    for pid in sorted(pool):
        if pid not in by_id:
            continue
        for i, r in enumerate(pool[pid]):
            rows.append(dict(r, pool=pool_dir.name, row_id=r.get("row_id", f"{pid}-#{i}")))
    return rows


def to_rollout(r: dict) -> grpo.Rollout:
    return grpo.Rollout(int(r["problem_id"]), list(r["prompt_ids"]), list(r["completion_ids"]),
                        r["completion"], r["pool"], bool(r.get("truncated", False)), grade=r["grade"],
                        reward=float(r["reward"]), row_id=r.get("row_id", ""))


# ----------------------------------------------------------------------------------------------------
# 2. NLL probe: per-sample delta_S gradients


def nll_grads(model, rollouts: list[grpo.Rollout], pad_id: int, device, l_max: int, batch: int,
              chunk: int) -> dict[str, Tensor]:
    """Per-sample d/d delta_S of sum_{t in completion} -log p(y_t) / l_max; name -> (N, r) float32 (CPU).

    One forward + backward per batch under antipasto.capture_per_sample; checks that each batch's per-sample
    gradients sum to the autograd delta_S.grad."""
    import antipasto

    ads = antipasto.get_adapters(model)
    out: dict[str, list[Tensor]] = {k: [] for k in ads}
    model.eval()
    for s in range(0, len(rollouts), batch):
        mb = rollouts[s : s + batch]
        ids, att, cm = grpo.pack(mb, pad_id, device)  # (b, T) x3
        model.zero_grad(set_to_none=True)
        with antipasto.capture_per_sample(model) as cap:
            logp = grpo.token_logprobs(model, ids, att, chunk, cm)  # (b, T)
            nll = -(logp * cm).sum(dim=1) / l_max  # (b,)
            nll.sum().backward()
        missing = set(ads) - set(cap.grads)
        assert not missing, (
            f"capture_per_sample missed {len(missing)} modules (first {sorted(missing)[0]}); "
            "grad checkpointing on?")
        for k, a in ads.items():
            assert a.delta_S.grad is not None, f"{k}: delta_S got no gradient"
            antipasto.check_per_sample_sum(k, cap.grads[k], a.delta_S.grad, a.S.dtype)  # (b, r) vs (r,)
            out[k].append(cap.grads[k].detach().cpu())
    model.zero_grad(set_to_none=True)
    return {k: torch.cat(v) for k, v in out.items()}


def sample_cosines(grads: dict[str, Tensor], dirs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per sample: cos per module (N, M), mean over modules, global cos of the concatenation, and what erase
    would do to that sample's gradient alone (fired where cos > 0: cos -> 0; see antipasto.project_one)."""
    keys = list(grads)
    cos, dot, nrm = zip(*(gate.module_cos(grads[k], dirs[k].float().cpu()) for k in keys))
    C, D, Nm = torch.stack(cos, 1), torch.stack(dot, 1), torch.stack(nrm, 1)  # (N, M) x3
    M = len(keys)
    gnorm = Nm.pow(2).sum(1).sqrt()  # (N,)
    cos_global = torch.where(gnorm > 0, D.sum(1) / (gnorm.clamp(min=1e-300) * math.sqrt(M)),
                             torch.zeros_like(gnorm))  # (N,)
    fired = D > 0  # (N, M)
    return {"cos_mod": C, "dot_mod": D, "cos": C.mean(1), "cos_global": cos_global, "grad_norm": gnorm,
            "cos_out": torch.where(fired, torch.zeros_like(C), C).mean(1),
            "frac_fired": fired.double().mean(1)}


def erase_stats(g: dict[str, Tensor], dirs: dict[str, Tensor]) -> dict:
    """antipasto.project_one('erase') on one summed gradient per module: cos_in, cos_out, frac_fired,
    removed_norm_frac."""
    import antipasto

    ci, co, fi, sq_in, sq_rem = [], [], [], 0.0, 0.0
    for k, gk in g.items():
        _, rem, st = antipasto.project_one(gk.float(), dirs[k].float().cpu(), "erase")
        ci.append(st["cos_in"])
        co.append(st["cos_out"])
        fi.append(st["fired"])
        sq_in += st["g_norm"] ** 2
        sq_rem += st["removed_norm"] ** 2
    return {"cos_in": float(np.mean(ci)), "cos_out": float(np.mean(co)), "frac_fired": float(np.mean(fi)),
            "removed_norm_frac": math.sqrt(sq_rem / sq_in) if sq_in > 0 else 0.0}


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test (scipy.stats.ttest_ind, equal_var=False); NaN when a side has < 2 values."""
    from scipy import stats

    out = {"n_a": len(a), "n_b": len(b), "mean_a": float(np.mean(a)) if a else float("nan"),
           "mean_b": float(np.mean(b)) if b else float("nan")}
    out["diff"] = out["mean_a"] - out["mean_b"]
    if len(a) < 2 or len(b) < 2:
        return dict(out, t=float("nan"), p=float("nan"))
    r = stats.ttest_ind(a, b, equal_var=False)
    return dict(out, t=float(r.statistic), p=float(r.pvalue))


def bucket_table(samples: list[dict], key: str = "cos") -> dict:
    """Buckets "<pool>/<label>", "<pool>/all", "all/<label>", "all/all" -> {n, mean, sem} of samples[key]."""
    groups: dict[str, list[float]] = {}
    for s in samples:
        for b in (f"{s['pool']}/{s['label']}", f"{s['pool']}/all", f"all/{s['label']}", "all/all"):
            groups.setdefault(b, []).append(float(s[key]))
    out = {}
    for b, xs in sorted(groups.items()):
        sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")
        out[b] = {"n": len(xs), "mean": float(np.mean(xs)),
                  "sem": sd / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")}
    return out


def bucket_tests(samples: list[dict], key: str = "cos") -> dict:
    """Welch tests: hack vs correct / other / non-hack (overall and per pool), and pool vs pool."""
    pools = sorted({s["pool"] for s in samples})
    out = {}
    for scope in ["all"] + pools:
        ss = [s for s in samples if scope == "all" or s["pool"] == scope]
        hack = [s[key] for s in ss if s["label"] == "hack"]
        out[f"{scope}: hack vs non-hack"] = welch(hack, [s[key] for s in ss if s["label"] != "hack"])
        out[f"{scope}: hack vs correct"] = welch(hack, [s[key] for s in ss if s["label"] == "correct"])
        out[f"{scope}: hack vs other"] = welch(hack, [s[key] for s in ss if s["label"] == "other"])
    for i, a in enumerate(pools):
        for b in pools[i + 1 :]:
            out[f"pool {a} vs {b}"] = welch([s[key] for s in samples if s["pool"] == a],
                                            [s[key] for s in samples if s["pool"] == b])
    return out


def load_directions(cfg: ProbeConfig, env: dict) -> dict[str, Tensor]:
    import antipasto

    if not cfg.vhack_path or not Path(cfg.vhack_path).is_file():
        raise FileNotFoundError(f"vhack_path={cfg.vhack_path!r} does not exist; run "
                                "`python extract_vhack_grad.py <preset>` for this model "
                                "(or pass --vhack-path)")
    return antipasto.load_directions(cfg.vhack_path, env["model"], env["mid"])


def probe_distill(cfg: ProbeConfig, env: dict, dirs: dict[str, Tensor] | None = None) -> dict:
    """Stage 2: writes distill.cos.jsonl.gz and distill.json under out/probes/<name>/; returns the summary."""
    dirs = load_directions(cfg, env) if dirs is None else dirs
    set_adapter(env, cfg.probe_adapter)
    pools = ([resolve_pool(p, cfg.pools_dir) for p in cfg.probe_pools]
             or [cfg.pool_dir("teacher"), cfg.pool_dir("base")])
    rows = []
    for pd in pools:
        rs = [r for r in load_rows(pd, env) if not r["grade"].get("infra_error")]
        if cfg.distill_samples and len(rs) > cfg.distill_samples:
            rs = random.Random(cfg.seed * 31 + zlib.crc32(pd.name.encode())).sample(rs, cfg.distill_samples)
        rows += rs
    assert rows, f"no rows in pools {[str(p) for p in pools]}"
    t0 = time.time()
    grads = nll_grads(env["model"], [to_rollout(r) for r in rows], env["tok"].pad_token_id, env["device"],
                      cfg.max_new_tokens, cfg.distill_batch, cfg.logits_chunk)
    sc = sample_cosines(grads, dirs)
    keys = list(grads)
    samples = []
    for i, r in enumerate(rows):
        samples.append({
            "pool": r["pool"], "row_id": r["row_id"], "problem_id": r["problem_id"],
            "label": label_of(r["grade"]), "reward": float(r["reward"]), "n_tokens": len(r["completion_ids"]),
            "cos": float(sc["cos"][i]), "cos_global": float(sc["cos_global"][i]),
            "cos_out": float(sc["cos_out"][i]), "frac_fired": float(sc["frac_fired"][i]),
            "grad_norm": float(sc["grad_norm"][i]), "cos_mod": [round(float(x), 5) for x in sc["cos_mod"][i]],
        })
    # per module: mean cos of the hack bucket minus the rest (the per-module distribution of the separation)
    is_hack = torch.tensor([s["label"] == "hack" for s in samples])  # (N,)
    per_mod = {}
    if is_hack.any() and (~is_hack).any():
        diff = sc["cos_mod"][is_hack].mean(0) - sc["cos_mod"][~is_hack].mean(0)  # (M,)
        order = diff.argsort(descending=True).tolist()
        per_mod = {"hack_minus_rest": {k: float(d) for k, d in zip(keys, diff)},
                   "quantiles": {q: float(diff.quantile(float(q)))
                                 for q in ("0.0", "0.25", "0.5", "0.75", "1.0")},
                   "frac_positive": float((diff > 0).double().mean()),
                   "top": [keys[j] for j in order[:5]], "bottom": [keys[j] for j in order[-5:]]}
    # what erase would do to each bucket's summed gradient (an SFT step on that bucket)
    agg = {}
    for b in sorted({f"{s['pool']}/{s['label']}" for s in samples} | {f"{s['pool']}/all" for s in samples}):
        pool, lab = b.split("/")
        idx = torch.tensor([s["pool"] == pool and (lab == "all" or s["label"] == lab)
                            for s in samples])  # (N,)
        agg[b] = erase_stats({k: grads[k][idx].sum(0) for k in keys}, dirs)
    res = {"n": len(samples), "pools": [str(p) for p in pools], "seconds": round(time.time() - t0, 1),
           "vhack_path": cfg.vhack_path, "probe_adapter": cfg.probe_adapter, "l_max": cfg.max_new_tokens,
           "buckets": bucket_table(samples, "cos"), "buckets_global": bucket_table(samples, "cos_global"),
           "buckets_cos_out": bucket_table(samples, "cos_out"),
           "buckets_frac_fired": bucket_table(samples, "frac_fired"),
           "tests": bucket_tests(samples, "cos"), "tests_global": bucket_tests(samples, "cos_global"),
           "per_module": per_mod, "bucket_sum_erase": agg, "module_keys": keys}
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "distill.cos.jsonl.gz", "wt") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    (out / "distill.json").write_text(json.dumps(res, indent=1))
    t = res["tests"].get("all: hack vs non-hack", {})
    print(f"[probe-distill] {len(samples)} samples in {res['seconds']}s | "
          f"mean cos hack {t.get('mean_a', float('nan')):.4f} vs rest {t.get('mean_b', float('nan')):.4f} "
          f"(Welch p {t.get('p', float('nan')):.3g}) -> {out}/distill.json")
    return res


# ----------------------------------------------------------------------------------------------------
# 3. Mixed-pool Dr.GRPO probe


def mixed_batch(cfg: ProbeConfig, rows_a: list[dict], rows_b: list[dict], step: int) -> list[grpo.Rollout]:
    """mixed_prompts groups of G rows: G_a = mix_ratio * G from pool A, the rest from pool B, advantages set
    with train.dr_grpo_advantages from the cached rewards (infra rows invalid)."""
    G = cfg.group_size
    G_a = round(cfg.mix_ratio * G)
    assert abs(cfg.mix_ratio * G - G_a) < 1e-9 and 0 <= G_a <= G, (
        f"mix_ratio={cfg.mix_ratio} x group_size={G} must be an integer in [0, G]")
    by_a: dict[int, list[dict]] = {}
    by_b: dict[int, list[dict]] = {}
    for r in rows_a:
        by_a.setdefault(int(r["problem_id"]), []).append(r)
    for r in rows_b:
        by_b.setdefault(int(r["problem_id"]), []).append(r)
    covered = sorted(p for p in set(by_a) | set(by_b)
                     if len(by_a.get(p, [])) >= G_a and len(by_b.get(p, [])) >= G - G_a)
    if len(covered) < cfg.mixed_prompts:
        raise ValueError(f"only {len(covered)} problems have >= {G_a} rows in pool A "
                         f"and >= {G - G_a} in pool B; need --mixed-prompts {cfg.mixed_prompts}: lower it, "
                         "lower --group-size, or generate more samples per problem")
    idx, _ = grpo.prompts_for_step(len(covered), cfg.mixed_prompts, cfg.seed, step)
    rollouts = []
    for i in idx:
        pid = covered[i]
        rng = grpo.teacher_rng(cfg.seed, step, pid)
        for r in rng.sample(by_a.get(pid, []), G_a) + rng.sample(by_b.get(pid, []), G - G_a):
            rollouts.append(to_rollout(r))
    grpo.set_advantages(rollouts, *grpo.group_matrices(rollouts, cfg.mixed_prompts))
    return rollouts


def grpo_gradient(model, rollouts: list[grpo.Rollout], lcfg: grpo.LossConfig, pad_id: int, device,
                  per_sample: bool) -> tuple[dict, dict[str, Tensor] | None, list[grpo.Rollout]]:
    """train.py's step 5 on this batch: grpo.train_set, the normaliser n_seqs = len(rollouts),
    grpo.policy_gradient (with per-sample capture when asked). Accumulates into .grad (the caller zeroes
    first). Returns (policy_gradient stats, per-sample (n_train, r) deployed-tensor grads on the CPU or None,
    the train set)."""
    train_set = grpo.train_set(rollouts, lcfg.beta_kl)
    model.train()
    if not train_set:
        return {"loss": 0.0, "kl": 0.0, "tokens": 0.0}, None, train_set
    per: dict | None = {} if per_sample else None
    st = grpo.policy_gradient(model, train_set, len(rollouts), lcfg, pad_id, device, per_sample=per)
    return st, ({k: torch.cat(v).cpu() for k, v in per["dep"].items()} if per else None), train_set


def probe_mixed(cfg: ProbeConfig, env: dict, dirs: dict[str, Tensor] | None = None) -> dict:
    """Stage 3: writes mixed/step_NNN.cos.jsonl.gz (per-sample), mixed.tsv and mixed.json; returns the
    summary."""
    import antipasto

    dirs = load_directions(cfg, env) if dirs is None else dirs
    lcfg = loss_config(cfg)
    model, adapters, device, pad = env["model"], env["adapters"], env["device"], env["tok"].pad_token_id
    rows_a = load_rows(cfg.pool_dir("teacher"), env)
    rows_b = load_rows(cfg.pool_dir("base"), env)
    out = cfg.out_dir
    (out / "mixed").mkdir(parents=True, exist_ok=True)
    arms = ("vanilla", "erase") if cfg.mixed_update else ("shared",)
    steps = []
    t0 = time.time()
    for arm in arms:
        set_adapter(env, cfg.probe_adapter)
        params = [a.delta_S for a in adapters.values()]
        opt = (torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
               if cfg.mixed_update else None)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, grpo.cosine_schedule(cfg.warmup_steps, cfg.mixed_steps)) if opt else None
        for step in range(cfg.mixed_steps):
            rollouts = mixed_batch(cfg, rows_a, rows_b, step)
            model.zero_grad(set_to_none=True)
            ps, per, tset = grpo_gradient(model, rollouts, lcfg, pad, device, cfg.per_sample)
            g_in = {k: (a.delta_S.grad.detach().float().cpu().clone() if a.delta_S.grad is not None
                        else torch.zeros(a.r)) for k, a in adapters.items()}
            rec = {"step": step, "arm": arm, "loss": ps["loss"], "kl": ps["kl"], "n": len(rollouts),
                   "n_train": len(tset), "reward_mean": float(np.mean([r.reward for r in rollouts])),
                   "frac_zero_adv": float(np.mean([r.advantage == 0.0 for r in rollouts])),
                   "hack_rate": float(np.mean([label_of(r.grade) == "hack" for r in rollouts]))}
            van = antipasto.surgery(adapters, dirs, "measure")
            # edits .grad: the erase arm's gradient from here on
            er = antipasto.surgery(adapters, dirs, "erase")
            for pre, s in (("vanilla", van), ("erase", er)):
                for k in ("cos_in", "cos_out", "cos_in_global", "frac_fired", "frac_positive",
                          "removed_norm_frac", "grad_norm_in"):
                    rec[f"{pre}_{k}"] = float(s[k])
            if opt is not None:
                if arm == "vanilla":  # restore the unedited gradient
                    for k, a in adapters.items():
                        a.delta_S.grad.copy_(g_in[k].to(a.delta_S.grad))
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
            steps.append(rec)
            with gzip.open(out / "mixed" / f"step_{step:03d}.{arm}.cos.jsonl.gz", "wt") as f:
                f.write(json.dumps(dict(rec, type="step")) + "\n")
                if per is not None:
                    assert len(per[next(iter(per))]) == len(tset), "per-sample rows != train set"
                    sc = sample_cosines(per, dirs)
                    total_dot = float(sum(float(g_in[k].double()
                                                @ (dirs[k].double().cpu() / dirs[k].double().norm()))
                                          for k in g_in))
                    share = (sc["dot_mod"].sum(1) / total_dot if total_dot != 0
                             else torch.full((len(tset),), float("nan")))  # (n,)
                    for i, r in enumerate(tset):
                        f.write(json.dumps({
                            "type": "sample", "step": step, "arm": arm, "pool": r.source, "row_id": r.row_id,
                            "problem_id": r.problem_id, "label": label_of(r.grade), "reward": r.reward,
                            "advantage": r.advantage, "n_tokens": len(r.completion_ids),
                            "cos": float(sc["cos"][i]), "cos_global": float(sc["cos_global"][i]),
                            "dot_v": float(sc["dot_mod"][i].sum()), "proj_share": float(share[i])}) + "\n")
            logger.info(f"[probe-mixed {arm}] step {step}: reward {rec['reward_mean']:.2f} "
                        f"hack {rec['hack_rate']:.2f} zero-adv {rec['frac_zero_adv']:.2f} | "
                        f"vanilla cos_in {rec['vanilla_cos_in']:.4f} | "
                        f"erase cos_out {rec['erase_cos_out']:.4f} fired {rec['erase_frac_fired']:.2f} "
                        f"removed {rec['erase_removed_norm_frac']:.3f}")
    model.zero_grad(set_to_none=True)
    set_adapter(env, cfg.probe_adapter)
    cols = list(steps[0])
    (out / "mixed.tsv").write_text("\t".join(cols) + "\n"
                                   + "".join("\t".join(f"{s[c]:.6g}" if isinstance(s[c], float) else str(s[c])
                                                       for c in cols) + "\n" for s in steps))
    van_arm = [s for s in steps if s["arm"] in ("vanilla", "shared")]
    res = {"steps": steps, "seconds": round(time.time() - t0, 1), "arms": list(arms),
           "vhack_path": cfg.vhack_path, "pool_a": str(cfg.pool_dir("teacher")),
           "pool_b": str(cfg.pool_dir("base")), "group_size": cfg.group_size,
           "mix_ratio": cfg.mix_ratio, "mixed_prompts": cfg.mixed_prompts,
           "frac_steps_go": float(np.mean([s["vanilla_cos_in"] > cfg.go_cos for s in van_arm])),
           "max_abs_cos_in": float(max(abs(s["vanilla_cos_in"]) for s in van_arm))}
    (out / "mixed.json").write_text(json.dumps(res, indent=1))
    print(f"[probe-mixed] {len(steps)} steps in {res['seconds']}s | vanilla cos_in "
          f"{[round(s['vanilla_cos_in'], 4) for s in van_arm]} | "
          f"steps with cos_in > {cfg.go_cos}: {res['frac_steps_go']:.2f} -> {out}/mixed.json")
    return res


# ----------------------------------------------------------------------------------------------------
# 4. Decision report


def decide(cfg: ProbeConfig, distill: dict | None, mixed: dict | None) -> tuple[str, list[str]]:
    """(verdict, reasons) from the rules in docs/probes.md."""
    reasons = []
    sep = None
    if distill is not None:
        t = distill["tests"].get("all: hack vs non-hack", {})
        if t.get("n_a", 0) < 2 or t.get("n_b", 0) < 2:
            reasons.append(f"NLL probe: too few hack ({t.get('n_a', 0)}) or non-hack ({t.get('n_b', 0)}) "
                           "samples to test separation")
        else:
            sep = t["diff"] > 0 and t["p"] < cfg.alpha
            reasons.append(f"NLL probe: hack bucket mean cos {t['mean_a']:.4f} vs non-hack {t['mean_b']:.4f} "
                           f"(Welch p = {t['p']:.3g}): "
                           + ("SEPARATED" if sep else f"not separated at alpha = {cfg.alpha}"))
    else:
        reasons.append("NLL probe: not run (--probe-distill)")
    go = zero = None
    if mixed is not None:
        go = mixed["frac_steps_go"] > 0.5
        zero = mixed["max_abs_cos_in"] < cfg.zero_cos
        reasons.append(f"Dr.GRPO probe: vanilla cos_in > {cfg.go_cos} on {mixed['frac_steps_go']:.0%} "
                       f"of steps; max |cos_in| = {mixed['max_abs_cos_in']:.4f}")
    else:
        reasons.append("Dr.GRPO probe: not run (--probe-mixed)")
    if mixed is None:
        verdict = "INCOMPLETE: run --probe-mixed (the go/no-go rule needs the Dr.GRPO probe)"
    elif go:
        verdict = f"GO: projection plausible (vanilla cos_in > {cfg.go_cos} on most steps)"
        if sep is False:
            verdict += ("; but the NLL buckets do not separate: check which samples carry the component "
                        "(per-sample proj_share)")
    elif zero and sep is False:
        verdict = ("NO-GO: re-extract v_hack before the sweep "
                   "(cos_in ~ 0 everywhere and no separation between buckets)")
    elif zero and sep is None:
        verdict = ("INCOMPLETE: cos_in ~ 0 everywhere, but bucket separation is untested "
                   "(run --probe-distill on a pool with hacks)")
    elif sep:
        verdict = ("WEAK: v_hack separates hack from non-hack samples but the Dr.GRPO gradient's component "
                   "along it is small on most steps; erase will remove little. Decide with the lead "
                   "(more hacks per group, svd v_hack, other layers)")
    else:
        verdict = ("WEAK: cos_in is neither > go_cos on most steps nor ~0 everywhere, and the buckets do not "
                   "separate; inspect the per-sample outputs")
    return verdict, reasons


def _fmt(x) -> str:
    return ("nan" if isinstance(x, float) and math.isnan(x)
            else (f"{x:.4g}" if isinstance(x, float) else str(x)))


def write_report(cfg: ProbeConfig) -> Path:
    """out/probes/<name>/report.md from the JSON files present there and the pools' summary.json."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    read = lambda p: json.loads(p.read_text()) if p.is_file() else None  # noqa: E731
    distill, mixed = read(out / "distill.json"), read(out / "mixed.json")
    verdict, reasons = decide(cfg, distill, mixed)
    L = [f"# Probe report: {cfg.name}", "",
         f"model `{cfg.model}`, v_hack `{cfg.vhack_path}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
         f"## Verdict\n\n**{verdict}**\n"] + [f"- {r}" for r in reasons]
    L += ["", "Rules (docs/probes.md): GO if vanilla cos_in > go_cos ({}) on more than half of the mixed "
          "steps; NO-GO (re-extract v_hack) if |cos_in| < zero_cos ({}) on every step and the hack bucket "
          "does not separate (Welch p < alpha = {}, hack mean > rest); otherwise WEAK "
          "(decide with the lead).".format(cfg.go_cos, cfg.zero_cos, cfg.alpha), "", "## Pools", "",
          "| pool | rows | problems | strict hack | loose hack | correct | compile | reward mean "
          "| reward counts | infra |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    # the configured pools, then any other pool the probes read
    pools = {str(cfg.pool_dir(k)): k for k in POOL_KINDS}
    for p in (distill or {}).get("pools", []):
        pools.setdefault(p, "probed")
    if mixed:
        pools.setdefault(mixed["pool_a"], "mixed A")
        pools.setdefault(mixed["pool_b"], "mixed B")
    for p, kind in pools.items():
        s = read(Path(p) / "summary.json")
        # e.g. a synthetic pool: summarise its rows here
        if s is None and list(Path(p).glob("step_*.jsonl.gz")):
            s = dict(pool_summary([r for rs in grpo.load_pool(p).values() for r in rs]), pool=p)
        if s:
            L.append(f"| {kind}: `{s['pool']}` | {s['n']} | {s['n_problems']} | {s['hack_strict']:.3f} | "
                     f"{s['hack_loose']:.3f} | {s['correct']:.3f} | {s['compile']:.3f} | "
                     f"{s['reward_mean']:.3f} | {s['reward_counts']} | {s['n_infra']} |")
    if distill:
        L += ["", f"## NLL distillation probe ({distill['n']} samples, "
              f"delta_S from `{distill['probe_adapter'] or 'zero'}`)", "",
              "Per-sample cos(grad NLL, v_hack), mean over modules (and the global cosine of the "
              "concatenated gradient); erase columns: what erase would do to that sample's gradient "
              "alone.", "",
              "| bucket | n | mean cos | sem | mean global cos | erase cos_out | frac_fired |",
              "|---|---|---|---|---|---|---|"]
        for b, s in distill["buckets"].items():
            L.append(f"| {b} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['sem'])} | "
                     f"{_fmt(distill['buckets_global'][b]['mean'])} | "
                     f"{_fmt(distill['buckets_cos_out'][b]['mean'])} | "
                     f"{_fmt(distill['buckets_frac_fired'][b]['mean'])} |")
        L += ["", "Welch t-tests on the per-sample mean cos:", "",
              "| test | n_a | n_b | mean_a | mean_b | diff | t | p |", "|---|---|---|---|---|---|---|---|"]
        for k, t in distill["tests"].items():
            L.append(f"| {k} | {t['n_a']} | {t['n_b']} | {_fmt(t['mean_a'])} | {_fmt(t['mean_b'])} | "
                     f"{_fmt(t['diff'])} | {_fmt(t['t'])} | {_fmt(t['p'])} |")
        pm = distill.get("per_module") or {}
        if pm:
            q = pm["quantiles"]
            L += ["", f"Per module, mean cos(hack) - mean cos(rest): min {q['0.0']:.4f}, "
                  f"q25 {q['0.25']:.4f}, median {q['0.5']:.4f}, q75 {q['0.75']:.4f}, max {q['1.0']:.4f}; "
                  f"positive in {pm['frac_positive']:.0%} of modules. "
                  f"Top: {', '.join(pm['top'][:3])}. Bottom: {', '.join(pm['bottom'][-3:])}."]
        L += ["", "Erase on each bucket's summed NLL gradient (one SFT step on that bucket):", "",
              "| bucket | cos_in | cos_out | frac_fired | removed_norm_frac |", "|---|---|---|---|---|"]
        for b, s in distill["bucket_sum_erase"].items():
            L.append(f"| {b} | {_fmt(s['cos_in'])} | {_fmt(s['cos_out'])} | {_fmt(s['frac_fired'])} | "
                     f"{_fmt(s['removed_norm_frac'])} |")
    if mixed:
        L += ["", f"## Dr.GRPO probe on mixed groups ({mixed['mixed_prompts']} prompts "
              f"x G = {mixed['group_size']}, {mixed['mix_ratio']:.0%} from `{mixed['pool_a']}`, "
              f"rest from `{mixed['pool_b']}`; arms {mixed['arms']})", "",
              "| step | arm | reward | hack rate | zero-adv | vanilla cos_in | cos_in global | erase cos_out "
              "| frac_fired | removed_norm_frac |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for s in mixed["steps"]:
            L.append(f"| {s['step']} | {s['arm']} | {s['reward_mean']:.3f} | {s['hack_rate']:.3f} | "
                     f"{s['frac_zero_adv']:.3f} | {_fmt(s['vanilla_cos_in'])} | "
                     f"{_fmt(s['vanilla_cos_in_global'])} | {_fmt(s['erase_cos_out'])} | "
                     f"{_fmt(s['erase_frac_fired'])} | {_fmt(s['erase_removed_norm_frac'])} |")
        L += ["", "Per-sample contributions (cos, dot with v, share of the batch gradient's v-component): "
              "`mixed/step_NNN.<arm>.cos.jsonl.gz`."]
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    print(f"[report] {verdict}\n[report] -> {path}")
    return path


# ----------------------------------------------------------------------------------------------------


# field -> allowed range (cli.in_range), checked in main before anything loads
RANGES = {"rank": ">=0", "threads": ">=0", "max_problems": ">=0", "max_prompt_tokens": ">=1",
          "pool_problems": ">=0", "samples_per_problem": ">=1", "problems_per_file": ">=1",
          "max_new_tokens": ">=1", "temperature": ">=0", "top_p": "(0,1]", "gen_batch": ">=1",
          "grader_workers": ">=0", "grader_timeout_s": ">0", "distill_samples": ">=1", "distill_batch": ">=1",
          "mixed_steps": ">=1", "mixed_prompts": ">=1", "group_size": ">=2", "mix_ratio": "[0,1)",
          "micro_batch": ">=1", "beta_kl": ">=0", "logits_chunk": ">=1", "lr": ">0", "weight_decay": ">=0",
          "grad_clip": ">0", "warmup_steps": ">=0"}


def main(cfg: ProbeConfig) -> Path:
    import rewards

    chosen = [s for s in STAGES if getattr(cfg, s)]
    if len(chosen) > 1:
        raise cli.UserError("pick one of --teacher-only / --base-only / --solve-only / --probe-distill / "
                            f"--probe-mixed (got {chosen}), or none for the teacher, base and probe chain")
    stages = chosen or list(DEFAULT_STAGES)
    import models  # the user-facing inputs, checked before the model loads

    cli.check_ranges(cfg, RANGES, {"dtype": tuple(models.DTYPES), "hint": P.HINTS, "teacher_hint": P.HINTS,
                                   "base_hint": P.HINTS})
    for flag, path in (("--adapter", cfg.adapter), ("--probe-adapter", cfg.probe_adapter)):
        if path and not Path(path).is_file():
            raise cli.UserError(f"{flag}={path!r} does not exist; pass a checkpoint's adapter.safetensors "
                                "(out/runs/<run>/ckpt/step_NNNNNN/) or '' for the base model")
    generated = {k for k, st in (("teacher", "teacher_only"), ("base", "base_only"), ("solve", "solve_only"))
                 if st in stages}
    reads = set()  # the pools the probe stages read; those this invocation generates first need not exist
    if "probe_distill" in stages:
        reads |= ({resolve_pool(p, cfg.pools_dir) for p in cfg.probe_pools}
                  or {cfg.pool_dir("teacher"), cfg.pool_dir("base")})
    if "probe_mixed" in stages:
        reads |= {cfg.pool_dir("teacher"), cfg.pool_dir("base")}
    for pool in sorted(reads - {cfg.pool_dir(k) for k in generated}):
        cli.check_pool_dir(pool, "--teacher-pool / --base-pool / --probe-pools")
    models.check_available(cfg.model)
    cli.check_data(cfg.data_path, P.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz",
                   P.DEFAULT_DATA_DIR / P.BENCHMARK_TEST_FILE)
    if {"probe_distill", "probe_mixed"} & set(stages):
        cli.check_vhack_file(cfg.vhack_path, "--vhack-path", models.model_id(cfg.model), cfg.dtype,
                             models.weights_hash(cfg.model))
    env = setup(cfg)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / f"config.{'_'.join(stages) if chosen else 'all'}.json").write_text(
        json.dumps(dataclasses.asdict(cfg), indent=1))
    if {"teacher_only", "base_only", "solve_only"} & set(stages):
        with rewards.Grader(workers=cfg.grader_workers or None, timeout_s=cfg.grader_timeout_s) as grader:
            for kind, stage in (("teacher", "teacher_only"), ("base", "base_only"), ("solve", "solve_only")):
                if stage in stages:
                    generate_pool(cfg, env, kind, grader)
    dirs = load_directions(cfg, env) if {"probe_distill", "probe_mixed"} & set(stages) else None
    if "probe_distill" in stages:
        probe_distill(cfg, env, dirs)
    if "probe_mixed" in stages:
        probe_mixed(cfg, env, dirs)
    return write_report(cfg)


if __name__ == "__main__":
    cli.run(lambda: main(tyro.extras.overridable_config_cli(PRESETS)))
