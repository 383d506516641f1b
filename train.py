"""Dr.GRPO on the SVD adapter (antipasto.py) with the intervention arms of arms.py, teacher-pool mixing and
deploy-mode evaluation.

    python train.py smoke --arm erase --seed 0                  # tiny-random, CPU, ~1 min
    python train.py smollm --arm vanilla --steps 10             # SmolLM2-135M on CPU
    python train.py full --arm route --seed 1 --vhack-path out/vhack/qwen3-4b_mean.safetensors
    python train.py full --arm route --seed 1 --resume out/runs/route__s1__20261121-101500
    python train.py full --eval-only --resume out/runs/route__s1__20261121-101500
    python train.py full --help                                 # every field, with its docstring

The loop reads top to bottom in `main()`: sample prompts -> generate -> grade -> (reward hook) -> Dr.GRPO
advantages -> loss and backward -> gradient surgery (grad hook) -> optimizer step -> log / checkpoint. The
library lives in grpo.py (loss, generation, pools), arms.py (the arm table and its hooks) and runs.py (the run
directory, docs/interfaces.md "Run directories"). The arms: `python -c "import arms; print(*arms.ARMS)"`,
docs/arms.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from loguru import logger
from torch import Tensor

import antipasto
import arms
import cli
import grpo
import models
import problems as P
import rewards
import runs
import update
from cli import UserError


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
    arm: Literal[arms.NAMES] = "vanilla"  # type: ignore[valid-type]
    """intervention arm (see the module docstring); "projected" is an alias of "erase\""""
    seed: int = 0
    """seed for data order, sampling, random directions"""
    run_name: str = ""
    """run directory name under out_dir; default <arm>__s<seed>__<YYYYmmdd-HHMMSS>"""
    out_dir: str = "out/runs"
    """where run directories go"""
    vhack_path: str = ""
    """v_hack directions (out/vhack/<name>.safetensors from extract_vhack_grad.py)"""
    direction_seed: int = -1
    """seed of the random directions of the *-random / *-matched arms (-1 = 1234 + seed, a fresh direction per
    run seed, resolved in main; config.json holds the resolved value)"""
    surgery_on: Literal["step", "grad"] = "step"
    """step: edit the step AdamW applies (update.py); grad: edit the gradient (the founding design)"""
    rank: int = 0
    """adapter rank per module: 0 = full rank, else the top-r singular directions"""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers to wrap: leaf names or globs over leaf/full module names (antipasto.select_linears)"""
    layers: tuple[int, ...] = ()
    """layer indices to wrap (empty = every layer)"""
    adapter_kind: Literal["svd", "lora", "block"] = "svd"
    """adapter kind: svd (shared-basis delta_S pair), block (quarantine in own frame), lora (needs --rank)"""
    quarantine_basis: Literal["next", "random"] = "next"
    """block only: the quarantine frame: the next singular directions, or a seeded random complement"""

    # --- data
    train_source: Literal["hub", "local-v0.2.0"] = "local-v0.2.0"
    """training problems: hub = the benchmark's set (newfacade/LeetCodeDataset train, `just prepare-data
    --source hub`); local-v0.2.0 = the offline fallback, a named deviation (1-5 asserts each, docs/data.md)"""
    data_path: str = ""
    """prepared train split (out/data/train.jsonl, `just prepare-data`); empty = filter v0.2.0 on the fly"""
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
    """rollout engine: hf (model.generate, any device) or vllm (colocated engine on the GPU, merged weights
    pushed before each generation; needs the vllm extra)"""
    vllm_gpu_memory_utilization: float = 0.35
    """vllm: fraction of GPU memory for the engine (weight copy + KV cache); the rest is left to training"""
    sampler_correction: bool = True
    """weight each live token's policy term by min(pi_train / pi_sampler, tis_cap): the sampler's own
    log-probs (temperature, top-p, merged weights, vLLM kernels) against the train pass's (docs/arms.md)"""
    tis_cap: float = 2.0
    """the sampler correction's truncation: importance weights above it are cut to it (TRL's default 2)"""
    generate_in_deploy_mode: bool = True
    """route arms: generate with the quarantine ablated (the shipped model is the behaviour policy)"""
    teacher_pool_dir: str = ""
    """out/pools/<name>: cached rollouts (the hack teacher) mixed into every group (docs/arms.md)"""
    mix_ratio: float = 0.0
    """> 0 switches teacher mixing on; with one pool, the fraction of each group from it (an integer G_t)"""
    solve_pool_dir: str = ""
    """out/pools/<name> of the solve teacher (probe_distill.py --solve-only): two-pool mix, exact counts"""
    teacher_n_hack: int = 0
    """two-pool mix: rows per group from --teacher-pool-dir (the hack teacher)"""
    teacher_n_solve: int = 0
    """two-pool mix: rows per group from --solve-pool-dir (the solve teacher)"""

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
    """svd adapters: train pass with one matmul per adapted Linear (cached merged weight + custom backward,
    antipasto.fused_training); same gradient up to rounding; off until timed on a GPU"""

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
    """rollouts the gate scores: positive = A > 0 only (penalised rollouts always train the deployed block:
    their gradient pushes away from their content); nonzero = every A != 0 (the founding design; on SmolLM2
    its top zone filled with penalised rollouts, RESEARCH_JOURNAL.md)"""

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
    """only evaluate (the --resume run's newest sound checkpoint, or the base model): evals/eval-<t>.json"""

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
    eval_data_path: str = ""
    """problems jsonl to evaluate on (e.g. the organism's problems_heldout.jsonl); empty = the test set"""

    def __post_init__(self) -> None:
        self.arm = arms.ALIASES.get(self.arm, self.arm)  # type: ignore[assignment]

    @property
    def n_prompts(self) -> int:
        return self.rollouts_per_step // self.group_size

    @property
    def teacher_sources(self) -> list[tuple[str, str, int]]:
        """(Rollout.source, pool dir, rows per group) of the teacher mix; empty without a teacher pool."""
        if self.solve_pool_dir:
            return [("teacher", self.teacher_pool_dir, self.teacher_n_hack),
                    ("solve", self.solve_pool_dir, self.teacher_n_solve)]
        if not self.teacher_pool_dir:
            return []
        return [("teacher", self.teacher_pool_dir, round(self.mix_ratio * self.group_size))]

    @property
    def n_teacher(self) -> int:
        return sum(n for *_, n in self.teacher_sources)


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
        "SmolLM2-135M-Instruct on CPU (~1-1.5 min/step, 2 cores): real code and grading, shorter prompts",
        TrainConfig(
            model="smollm2-135m", max_problems=64, max_prompt_tokens=512, rollouts_per_step=8, group_size=4,
            max_new_tokens=192, gen_batch=8, steps=10, lr=2e-3, warmup_steps=2, micro_batch=4, ckpt_every=5,
            eval_samples=1, eval_problems=8,
        ),
    ),
    "organism": (
        "the CPU model organism (`just organism-build`): vanilla hacks in ~10-20 steps, ~7 s/step",
        TrainConfig(
            model="organism", data_path="out/models/organism/problems_train.jsonl",
            eval_data_path="out/models/organism/problems_heldout.jsonl", rollouts_per_step=32, group_size=8,
            max_new_tokens=96, gen_batch=32, steps=30, lr=0.2, warmup_steps=0, micro_batch=32,
            temperature=1.0, top_p=1.0, eval_samples=4, grader_workers=1,
        ),
    ),
    "fast": (
        "Qwen3-0.6B on one GPU: the full recipe, smaller and shorter (~1 h)",
        TrainConfig(
            model="Qwen/Qwen3-0.6B", dtype="bfloat16", rollouts_per_step=128, group_size=16,
            max_new_tokens=1024, gen_batch=128, steps=100, micro_batch=16, grad_checkpointing=True,
            eval_samples=4,
        ),
    ),
    "full": (
        "Qwen3-4B, benchmark settings: 16 prompts x 16 generations, 1536 new tokens, 200 steps",
        TrainConfig(
            model="Qwen/Qwen3-4B", dtype="bfloat16", train_source="hub", data_path="out/data/train.jsonl",
            rollouts_per_step=256,
            group_size=16, max_new_tokens=1536, gen_batch=128, steps=200, micro_batch=16,
            grad_checkpointing=True, eval_samples=10, eval_every=50,
        ),
    ),
}


def loss_config(cfg: TrainConfig) -> grpo.LossConfig:
    return grpo.LossConfig(micro_batch=cfg.micro_batch, l_max=cfg.max_new_tokens, beta_kl=cfg.beta_kl,
                           clip_eps=cfg.clip_eps, inner_steps=cfg.inner_steps, logits_chunk=cfg.logits_chunk,
                           fused_adapter=cfg.fused_adapter, temperature=cfg.temperature,
                           tis_cap=cfg.tis_cap if cfg.sampler_correction else None)


# field -> allowed range (cli.in_range); validate() names the field, its value and the range
RANGES = {"steps": ">=1", "lr": ">0", "weight_decay": ">=0", "betas": "[0,1)", "grad_clip": ">0",
          "warmup_steps": ">=0", "beta_kl": ">=0", "inner_steps": ">=1", "clip_eps": ">0",
          "micro_batch": ">=1", "logits_chunk": ">=1", "temperature": ">=0", "top_p": "(0,1]",
          "gen_batch": ">=1", "max_new_tokens": ">=1", "max_prompt_tokens": ">=1", "rollouts_per_step": ">=1",
          "max_problems": ">=0", "rank": ">=0", "mix_ratio": "[0,1)", "teacher_n_hack": ">=0",
          "teacher_n_solve": ">=0", "grader_workers": ">=0", "grader_timeout_s": ">0",
          "vllm_gpu_memory_utilization": "(0,1]", "ckpt_every": ">=1", "keep_ckpts": ">=1",
          "eval_every": ">=0", "eval_samples": ">=1", "eval_problems": ">=0", "tis_cap": ">0"}
# free to differ from the saved config in --eval-only (scripts/eval_run.py): what and how to evaluate
EVAL_FIELDS = ("eval_at_end", "eval_every", "eval_samples", "eval_problems", "eval_hint", "gen_batch",
               "device", "grader_workers")


def validate(cfg: TrainConfig) -> None:
    """User errors that must stop the run before anything heavy loads, as cli.UserError (one line naming the
    field and the fix): numeric ranges, the teacher pool, the v_hack file's metadata, the model's files, data
    files, the run directory."""
    arm = arms.get(cfg.arm)
    cli.check_ranges(cfg, RANGES, {"dtype": tuple(models.DTYPES), "hint": P.HINTS, "eval_hint": P.HINTS})
    if not (cfg.device in ("cpu", "auto") or cfg.device.split(":")[0] == "cuda"):
        raise UserError(f"--device={cfg.device!r}: need cpu, cuda, cuda:N or auto")
    if cfg.group_size < 2:
        raise UserError(f"--group-size={cfg.group_size}: Dr.GRPO needs >= 2 completions per prompt")
    if cfg.rollouts_per_step % cfg.group_size:
        raise UserError(f"--rollouts-per-step={cfg.rollouts_per_step} is not divisible by group_size="
                        f"{cfg.group_size}; make it a multiple")
    grpo.check_teacher_mix(cfg)  # flags, pool files, coverage of the pools (before the model loads)
    if arm.direction == "vhack" and not cfg.vhack_path:
        raise UserError(f"--arm={cfg.arm} needs --vhack-path (out/vhack/<name>.safetensors from "
                        "`just extract-vhack`)")
    if cfg.surgery_on == "grad" and arm.surgery == "":
        raise UserError(f"--arm={cfg.arm} edits the applied step only; pass --surgery-on step")
    if cfg.vhack_path:
        cli.check_vhack_file(cfg.vhack_path, "--vhack-path", models.model_id(cfg.model), cfg.dtype,
                             models.weights_hash(cfg.model))
    models.check_available(cfg.model)  # local files, the HF cache or a reachable hub
    cli.check_data(cfg.data_path, P.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz",
                   P.DEFAULT_DATA_DIR / P.BENCHMARK_TEST_FILE)
    if cfg.data_path:  # the manifest beside it names the source it was prepared from (P.load_train_set)
        try:
            got, _ = P.prepared_source(cfg.data_path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        if got != cfg.train_source:
            raise UserError(f"--data-path={cfg.data_path!r} was prepared from source {got!r} but "
                            f"--train-source={cfg.train_source}; run `just prepare-data --source "
                            f"{cfg.train_source}` (hub: with --tokenizer <model>) or pass --train-source "
                            f"{got}")
    if cfg.eval_data_path and not Path(cfg.eval_data_path).is_file():
        raise UserError(f"--eval-data-path={cfg.eval_data_path!r} does not exist; pass a problems jsonl "
                        "or '' for the benchmark's test set")
    if cfg.eval_data_path:
        cli.check_gz(cfg.eval_data_path, "--eval-data-path")  # (.gz) decompresses
    if arm.per_sample:
        if cfg.grad_checkpointing:
            raise UserError(f"arm={cfg.arm!r} captures per-rollout gradients in one forward + backward, "
                            "which activation checkpointing's recomputed forward breaks: pass "
                            "--no-grad-checkpointing and, on big models, a smaller --micro-batch "
                            "(docs/gating.md, 'Memory')")
        if cfg.gate_mode == "quantile" and not 0.0 < cfg.gate_q <= 0.5:
            raise UserError(f"gate_q={cfg.gate_q}: need 0 < gate_q <= 0.5 (route = top q, mid = the next q)")
        if cfg.gate_mode == "threshold" and not cfg.gate_tau_mid <= cfg.gate_tau_route:
            raise UserError(f"gate_tau_mid={cfg.gate_tau_mid} > gate_tau_route={cfg.gate_tau_route}; need "
                            "tau_mid <= tau_route")
    if arm.reward_hook == "am":
        if not 0.0 < cfg.am_layer_frac <= 1.0:
            raise UserError(f"am_layer_frac={cfg.am_layer_frac}: need 0 < frac <= 1 (~0.6-0.75 is typical)")
        if cfg.am_alpha < 0:
            raise UserError(f"am_alpha={cfg.am_alpha} < 0; the AM penalty needs alpha >= 0 (paper: 2)")
    runs.check_run_dir(cfg, RUN_CONTROL_FIELDS + (EVAL_FIELDS if cfg.eval_only else ()))


def collect_rollouts(model, tok, engine, grader, cfg: TrainConfig, batch_problems: list,
                     prompt_ids: list[list[int]], step: int, pools: list, gen_ctx,
                     rcfg) -> tuple[list[grpo.Rollout], float, float]:
    """G - G_t live completions per prompt (each generation batch graded on the CPU pool while the next
    decodes) plus G_t cached rows: exactly n of each teacher pool (their cached grade, never re-executed).
    Returns (rollouts in group order: live, then each pool's rows; generation seconds, grading seconds not
    hidden behind generation)."""
    G_s = cfg.group_size - cfg.n_teacher
    items = [(p, ids) for p, ids in zip(batch_problems, prompt_ids) for _ in range(G_s)]
    with gen_ctx(model):
        outs, texts, grades, t_gen, t_grade = grpo.sample_and_grade(
            model, tok, engine, grader, items, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.gen_batch,
            seed=cfg.seed * 1_000_003 + step, label=f"step {step + 1}")
    rollouts: list[grpo.Rollout] = []
    for j, p in enumerate(batch_problems):
        for i in range(j * G_s, (j + 1) * G_s):
            o = outs[i]
            reward = rewards.compute_reward(grades[i], rcfg)
            rollouts.append(grpo.Rollout(p.id, prompt_ids[j], o.ids, texts[i], "student", o.truncated,
                                         grade=grades[i], reward=reward, sampler_logp=o.logp))
        # reward recomputed from the cached grade with this run's RewardConfig (oracle penalty included)
        for source, row in grpo.teacher_rows(pools, cfg.seed, step, p.id) if pools else ():
            rollouts.append(grpo.Rollout(p.id, prompt_ids[j], row["completion_ids"], row["completion"],
                                         source, bool(row.get("truncated", False)), grade=row["grade"],
                                         reward=rewards.compute_reward(row["grade"], rcfg),
                                         row_id=row.get("row_id", "")))
    return rollouts, t_gen, t_grade


def evaluate(model, tokenizer, problems, grader, cfg: TrainConfig, step: int, engine=None) -> dict:
    """Deploy-mode (quarantine ablated) hack/pass/compile rates on the test problems; arms with a quarantine
    also with it on and under the shrinkage control. Returns the eval.json dict."""
    rcfg = rewards.RewardConfig(correctness_reward=cfg.correctness_reward, compile_reward=cfg.compile_reward)
    items = [(p, models.chat_ids(tokenizer, list(p.prompt))) for p in problems
             for _ in range(cfg.eval_samples)]
    modes = {"deploy": antipasto.ablate_quarantine}
    if arms.get(cfg.arm).quarantine:
        modes["quarantine_on"] = contextlib.nullcontext  # delta_S + delta_S_hack
        modes["shrinkage"] = antipasto.shrinkage  # works for every adapter kind (docs/arms.md)
    result = {"step": step, "arm": cfg.arm, "seed": cfg.seed, "n_problems": len(problems), "modes": {},
              "norms": update.norms(antipasto.get_adapters(model))}
    for mode, ctx in modes.items():
        with ctx(model):
            grades = grpo.sample_and_grade(model, tokenizer, engine, grader, items, cfg.max_new_tokens,
                                           cfg.temperature, cfg.top_p, cfg.gen_batch,
                                           seed=cfg.seed * 7919 + 1_000_003,
                                           label=f"eval step {step} [{mode}]")[2]
        result["modes"][mode] = runs.eval_rates(grades, rcfg)
    return result


def main(cfg: TrainConfig) -> Path:
    if cfg.direction_seed < 0:  # a fresh placebo direction per run seed
        cfg = dataclasses.replace(cfg, direction_seed=1234 + cfg.seed)
    validate(cfg)  # (after the seed's resolution: --resume compares with the saved, resolved config)
    arm = arms.get(cfg.arm)
    t_start, cpu_start = time.time(), cli.cpu_s()  # a caller (smoke) may run several in one process
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.backend == "vllm":
        import vllm_backend

        vllm_backend.check_usable(device)

    # ---- 1. tokenizer and data (the pools' coverage after the length filter, before the model loads), model
    tok = models.load_tokenizer(cfg.model)
    train_problems, source_text = P.load_train_split(
        cfg.train_source, cfg.data_path, cfg.difficulties, cfg.max_problems, cfg.hint, cfg.max_prompt_tokens,
        models.prompt_len(tok), progress=cli.Progress("train prompts measured (length filter)"))
    logger.info(f"train source: {source_text}")
    by_id = {p.id: p for p in train_problems}
    pools = grpo.load_teacher_pools(cfg.teacher_sources, drop_infra=bool(cfg.solve_pool_dir))  # [] if none
    if pools:  # prompts: the train problems every pool covers with its count of rows (the intersection)
        covered = set(grpo.covered_ids(pools, [p.id for p in train_problems], cfg.n_prompts))
        for _, pool, _ in pools:
            grpo.check_pool_tokenization(pool, by_id, tok, lambda p: models.chat_ids(tok, list(p.prompt)))
        train_problems = [p for p in train_problems if p.id in covered]
    logger.info(f"loading model {cfg.model} ({cfg.dtype}, {device}); a hub model downloads first")
    t_load = time.time()
    model, tok = models.load_model(cfg.model, dtype=cfg.dtype, device=device, tok=tok)
    mid = models.model_id(cfg.model)
    logger.info(f"model loaded in {time.time() - t_load:.0f}s")
    model.requires_grad_(False)
    adapters = antipasto.wrap_model(model, targets=cfg.targets, layers=cfg.layers or None,
                                    rank=cfg.rank or None, kind=cfg.adapter_kind,
                                    quarantine_basis=cfg.quarantine_basis)
    antipasto.set_trainable(model, quarantine=arm.quarantine)
    if cfg.grad_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    vhack = antipasto.load_directions(cfg.vhack_path, model, mid) if cfg.vhack_path else None  # also measures
    randoms = antipasto.random_directions(adapters, seed=cfg.direction_seed)  # placebos' directions (cheap)
    directions = randoms if arm.direction == "random" else vhack  # what the arm's edit or gate compares with
    own_basis = cfg.adapter_kind == "block"  # the quarantine has its own frozen frame
    test_set = P.load_problems(cfg.eval_data_path) if cfg.eval_data_path else P.load_benchmark_test()
    test_problems = [P.apply_hint(p, cfg.eval_hint) for p in test_set]
    if cfg.eval_problems:
        test_problems = test_problems[: cfg.eval_problems]
    edit = arm.step_edit if cfg.surgery_on == "step" else arm.surgery
    logger.info(f"model {mid} ({device}, {cfg.dtype}); {len(adapters)} adapted modules, "
                f"{sum(a.dep.numel() for a in adapters.values())} deployed params ({cfg.adapter_kind}); "
                f"arm {cfg.arm} (edit: {edit} on the {cfg.surgery_on}); {len(train_problems)} train prompts, "
                f"{len(test_problems)} test problems")
    reward_state = None
    if arm.reward_hook:  # e.g. AM's activation direction at the base model from the hand-written pairs
        setup_hook, reward_hook = arms.REWARD_HOOKS[arm.reward_hook]
        reward_state = setup_hook(model, tok, cfg)
        logger.info(f"{arm.reward_hook}: reward hook set up")

    # ---- 2. optimizer, run directory (config.json before step 0), resume, rollout engine, grader
    if cfg.surgery_on == "grad":  # every trainable tensor in one AdamW group, as the founding design
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                      betas=cfg.betas, weight_decay=cfg.weight_decay)
    else:
        optimizer = update.build_optimizer(adapters, cfg.lr, cfg.betas, cfg.weight_decay,
                                           arm.quarantine and own_basis)
    schedule = grpo.cosine_schedule(cfg.warmup_steps, cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    run_dir = runs.setup_run_dir(cfg, RUN_CONTROL_FIELDS + (EVAL_FIELDS if cfg.eval_only else ()))
    start = runs.load_checkpoint(run_dir, model, optimizer, scheduler, mid) if cfg.resume else 0
    logger.add(run_dir / "train.log", level="INFO")
    logger.info(f"run dir {run_dir} (start at step {start})")
    engine = None
    if cfg.backend == "vllm":  # colocated engine; the adapter's merged weights pushed before each generation
        # eval prompts are not filtered by max_prompt_tokens: size the context by the longest actual prompt
        longest = max(len(models.chat_ids(tok, list(p.prompt))) for p in [*train_problems, *test_problems])
        engine = vllm_backend.VllmEngine(models.resolve_path(cfg.model), cfg.dtype, cfg.seed,
                                         longest + cfg.max_new_tokens, cfg.vllm_gpu_memory_utilization)
        logger.info(f"vllm engine up ({cfg.vllm_gpu_memory_utilization:.0%} of GPU memory, max_model_len "
                    f"{longest + cfg.max_new_tokens})")
    rcfg = rewards.RewardConfig(correctness_reward=cfg.correctness_reward, compile_reward=cfg.compile_reward,
                                oracle_penalty=arm.oracle)
    grader = rewards.Grader(workers=cfg.grader_workers or None, timeout_s=cfg.grader_timeout_s)
    if cfg.eval_only:
        runs.write_eval_record(run_dir, evaluate(model, tok, test_problems, grader, cfg, start, engine))
        grader.close()
        return run_dir

    log = runs.TsvLog(run_dir / "log.tsv", runs.LOG_COLUMNS, resume_step=start if cfg.resume else None)
    (run_dir / "rollouts").mkdir(exist_ok=True)
    lcfg = loss_config(cfg)
    off_mode = arm.quarantine and cfg.generate_in_deploy_mode  # rollouts sampled with the quarantine ablated
    gen_ctx = antipasto.ablate_quarantine if off_mode else contextlib.nullcontext
    warned: set[str] = set()  # runs.warn_ratios: each warning once per run
    timer = cli.StepEta(cfg.steps, cfg.eval_every, cfg.eval_at_end,
                        len(test_problems) * cfg.eval_samples * (3 if arm.quarantine else 1))
    for step in range(start, cfg.steps):
        t0 = time.time()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # ---- 3. prompts (a pure function of (seed, step)), rollouts (live + teacher), grades, rewards
        idx, epoch = grpo.prompts_for_step(len(train_problems), cfg.n_prompts, cfg.seed, step)
        batch_problems = [train_problems[i] for i in idx]
        prompt_ids = [models.chat_ids(tok, list(p.prompt)) for p in batch_problems]
        model.eval()
        rollouts, t_gen, t_grade = collect_rollouts(model, tok, engine, grader, cfg, batch_problems,
                                                    prompt_ids, step, pools, gen_ctx, rcfg)

        # ---- 4. Dr.GRPO advantages over each group of G (student + teacher), after the arm's reward hook
        t2 = time.time()
        rew, valid = grpo.group_matrices(rollouts, cfg.n_prompts)  # (P, G) x2
        reward_row = {}
        if arm.reward_hook:
            rew, reward_row = reward_hook(reward_state, cfg, model, rollouts, rew, valid, tok.pad_token_id,
                                          device)
        grpo.set_advantages(rollouts, rew, valid)

        # ---- 5. loss, backward in micro-batches (constant normaliser => exact accumulation)
        model.train()
        train_set = grpo.train_set(rollouts, cfg.beta_kl)
        old_cache: dict[int, Tensor] = {}
        hook_row = {}
        for inner in range(cfg.inner_steps):
            model.zero_grad(set_to_none=True)  # the quarantine may be outside the optimizer
            per_sample = {} if arm.per_sample else None
            # off_mode: the behaviour policy's log-probs are old_logp, so the ratio corrects the mode
            ps = grpo.policy_gradient(model, train_set, len(rollouts), lcfg, tok.pad_token_id, device,
                                      old_cache, inner, per_sample, behaviour=gen_ctx if off_mode else None)
            # ---- 6. the arm's edit of the applied step (or, --surgery-on grad, of the gradient) and the step
            hook_seed = (cfg.direction_seed * 1_000_003 + cfg.seed) * 100_003 + step * 101 + inner
            step_row, hook_row, grad_norm = arms.optimizer_step(cfg, arm, adapters, optimizer, directions,
                                                                vhack, randoms, per_sample, train_set,
                                                                hook_seed, own_basis)
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        t_train = time.time() - t2

        # ---- 7. log, rollouts, checkpoint, periodic eval
        row = grpo.step_metrics(rollouts, rew, valid)
        row.update(step=step, epoch=epoch, lr=lr_used, kl=ps["kl"], loss=ps["loss"], grad_norm=grad_norm,
                   t_gen=t_gen, t_grade=t_grade, t_train=t_train, t_step=time.time() - t0,
                   peak_mem_gb=runs.peak_mem_gb(device))
        row.update(**step_row, **hook_row, **reward_row,
                   **{k: ps[k] for k in ("ratio_mean", "frac_clipped", "logratio_abs", "sampler_gap",
                                         "is_weight_mean", "frac_is_capped")})
        runs.warn_ratios(row, step, warned)
        log.write(row)
        if cfg.save_rollouts:
            runs.write_rollouts(run_dir, step, rollouts)
        done = step + 1
        n_live = cfg.n_prompts * (cfg.group_size - cfg.n_teacher)
        eta = timer.update(done, row["t_step"], t_gen + t_grade, n_live)
        logger.info(f"step {done}/{cfg.steps} | {runs.step_summary(row)} | eta {eta / 60:.1f} min")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            runs.save_checkpoint(run_dir, done, model, optimizer, scheduler, mid, cfg.keep_ckpts)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            result = evaluate(model, tok, test_problems, grader, cfg, done, engine)
            runs.write_eval(run_dir, result, final=False)

    if cfg.eval_at_end:
        result = evaluate(model, tok, test_problems, grader, cfg, cfg.steps, engine)
        runs.write_eval(run_dir, result, final=True)
    grader.close()
    (run_dir / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    logger.info(f"done in {(time.time() - t_start) / 60:.1f} min wall, "
                f"{(cli.cpu_s() - cpu_start) / 60:.1f} CPU-min: {run_dir}/log.tsv, {run_dir}/rollouts/"
                + (f", {run_dir}/eval.json" if cfg.eval_at_end else " (no eval: --no-eval-at-end)"))
    return run_dir


if __name__ == "__main__":
    cli.run(lambda: main(tyro.extras.overridable_config_cli(PRESETS)))
