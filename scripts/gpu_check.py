"""gpu_check.py: the one prepared GPU check (issue 15): the full preset's step at typical lengths, fused vs
unfused adapter, peak memory, and the real-vLLM test; sized to finish within 8 minutes on one H100/H200.

    python scripts/gpu_check.py                      # CUDA: the `full` preset's shape; CPU: the `smoke` one
    python scripts/gpu_check.py --preset smoke --device cpu --json /tmp/gpu-check.json   # the CPU test's path
    just gpu-check

In order (each part is skipped, and says so, when less than its share of --time-limit-s is left):
  1. build the preset's model shape once with random weights (scripts/bench_step.py's build_model;
     no download)
  2. warm-up: one small step per adapter variant (one group, short completions): kernels chosen,
     allocator warm
  3. one timed generation at the preset's rollouts / group size / max_new_tokens with `typical` completion
     lengths (bench_step's forced-length generation, merged inference as in train.py)
  4. the train pass on those completions (ref + policy log-probs, backward, surgery, clip + AdamW) once with
     the unfused adapter and once with antipasto.fused_training; each variant's step time = merge + generate
     + its train pass (generation does not depend on the variant, so it is timed once); peak memory per phase
  5. when vllm is importable and CUDA is there: tests/test_vllm_backend.py's real-engine test
     (pass/fail, seconds)
Writes --json (default out/bench/gpu-check.json):
{"kind": "gpu-check", "results": {"unfused": ..., "fused": ...}, "vllm": ...}; each result carries
bench_step's "config" and "t_step" fields, so scripts/sweep.py's GPU-hour estimate uses it when its config
matches the preset's. Prints a ready docs/performance.md row per variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import antipasto  # noqa: E402
import bench_step as B  # noqa: E402
import grpo  # noqa: E402
import runs  # noqa: E402
import sweep  # noqa: E402  (preset_fields, MODEL_SHAPES: the same preset -> shape mapping the budget uses)

VARIANTS = ("unfused", "fused")


@dataclass
class GpuCheckConfig:
    """One prepared check of the step time, memory and the vLLM path at a preset's shape."""

    preset: str = ""
    """train.py preset whose shape and batch are timed ('' = full on CUDA, smoke on CPU)"""
    device: str = "auto"
    """cuda | cpu | auto"""
    gen_len: str = "typical"
    """completion lengths of the timed step (bench_step's --gen-len)"""
    time_limit_s: float = 420.0
    """skip the parts that would not fit (the check must end inside an 8-minute device call)"""
    json: Path = ROOT / "out" / "bench" / "gpu-check.json"
    """where the results go"""
    vllm: bool = True
    """run the real-vLLM test when vllm is importable and CUDA is there"""
    prompt_len_mean: float = 0.0
    """mean synthetic prompt length (0 = bench_step's 600; the CPU test uses a short one)"""
    seed: int = 0


def bench_config(p: dict, shape: str, cfg: GpuCheckConfig, fused: bool, device: str) -> B.BenchConfig:
    """The bench_step config matching preset fields p (the fields scripts/sweep.py matches on)."""
    rollouts = int(p["rollouts_per_step"])
    return B.BenchConfig(shape=shape, gen_len=cfg.gen_len, max_new_tokens=int(p["max_new_tokens"]),
                         rollouts=rollouts, group_size=int(p["group_size"]),
                         gen_batch=min(int(p.get("gen_batch") or rollouts), rollouts),
                         micro_batch=int(p["micro_batch"]), grad_checkpointing=bool(p["grad_checkpointing"]),
                         fused_adapter=fused, prompt_len_max=int(p.get("max_prompt_tokens", 1536)),
                         temperature=float(p.get("temperature", 0.7)), top_p=float(p.get("top_p", 0.95)),
                         beta_kl=float(p.get("beta_kl", 1e-3)), device=device, seed=cfg.seed,
                         dtype="bfloat16" if device == "cuda" else "float32",
                         threads=1 if device == "cpu" else 2)


def loss_config(b: B.BenchConfig) -> grpo.LossConfig:
    return grpo.LossConfig(micro_batch=b.micro_batch, logits_chunk=b.logits_chunk, beta_kl=b.beta_kl,
                           l_max=b.max_new_tokens, inner_steps=1, fused_adapter=b.fused_adapter)


def generate(b: B.BenchConfig, model, prompt_ids, lens, gen_batch: int, device: str) -> tuple[list, dict]:
    """Forced-length generation under merged inference (as bench_step.one_step): completions and timings."""
    tok = B._FakeTokenizer(model.config.vocab_size)
    r: dict = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    completions, batches = [], []
    with contextlib.ExitStack() as stack:
        B.sync(device)
        t = time.perf_counter()
        stack.enter_context(antipasto.merged_inference(model))
        B.sync(device)
        r["t_merge"] = time.perf_counter() - t
        t = time.perf_counter()
        for s in range(0, len(prompt_ids), gen_batch):
            chunk, L = prompt_ids[s : s + gen_batch], lens[s : s + gen_batch]
            outs = grpo.generate(model, tok, chunk, max(L), b.temperature, b.top_p, gen_batch,
                                 seed=b.seed + s)
            completions += [ids[:n] for (ids, _), n in zip(outs, L)]
            batches.append((len(chunk), max(map(len, chunk)), max(L)))
        B.sync(device)
        r["t_generate"] = time.perf_counter() - t
    r["peak_mem_gen_gb"] = B.peak_mem_gb(device)
    r["gen_batches"] = batches
    return completions, r


def train_pass(b: B.BenchConfig, model, adapters, directions, optimizer, params, prompt_ids, completions,
               lens, device: str) -> dict:
    """grpo.policy_gradient + surgery + clip + AdamW on the given completions, timed per stage."""
    r: dict = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    g = torch.Generator().manual_seed(b.seed)
    adv = torch.randn(len(completions), generator=g).tolist()
    rollouts = [grpo.Rollout(0, p, c, "", "student", n == b.max_new_tokens, advantage=a)
                for p, c, n, a in zip(prompt_ids, completions, lens, adv)]
    optimizer.zero_grad(set_to_none=True)
    acc = {"t_ref": 0.0, "t_policy": 0.0}
    B.sync(device)
    t = time.perf_counter()
    with B.timed_logprobs(device, acc):
        grpo.policy_gradient(model, rollouts, len(rollouts), loss_config(b), 0, device)
    B.sync(device)
    r["t_ref"], r["t_policy"] = acc["t_ref"], acc["t_policy"]
    r["t_backward"] = time.perf_counter() - t - acc["t_ref"] - acc["t_policy"]
    t = time.perf_counter()
    antipasto.surgery(adapters, directions, b.surgery_mode)
    B.sync(device)
    r["t_surgery"] = time.perf_counter() - t
    t = time.perf_counter()
    gn = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    optimizer.step()
    B.sync(device)
    r["t_optimizer"] = time.perf_counter() - t
    r["t_train"] = r["t_ref"] + r["t_policy"] + r["t_backward"]
    r["peak_mem_train_gb"] = B.peak_mem_gb(device)
    assert gn == gn and gn > 0, f"grad norm {gn}: the train pass produced no gradient"
    r["train_tokens"] = sum(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    return r


def vllm_test(limit_s: float) -> dict:
    """The real-engine test of tests/test_vllm_backend.py, as a subprocess: passed, seconds, output tail."""
    t = time.perf_counter()
    test = "tests/test_vllm_backend.py::test_real_vllm_engine_follows_the_adapter"
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", test], cwd=ROOT, capture_output=True,
                           text=True, timeout=max(10.0, limit_s))
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"timed out after {limit_s:.0f} s: {e}", -1
    passed = rc == 0 and " passed" in out and "skipped" not in out
    return {"ran": True, "test": test, "passed": passed, "rc": rc, "seconds": time.perf_counter() - t,
            "tail": out[-1500:]}


def row(res: dict, name: str) -> str:
    """A docs/performance.md 'Measured' row."""
    c = res["config"]
    peak = max(res["peak_mem_gen_gb"], res["peak_mem_train_gb"])
    conf = (f"{c['rollouts']} rollouts, G={c['group_size']}, {c['gen_len']}, max {c['max_new_tokens']}, "
            f"gen_batch {res['gen_batch']}, mb {c['micro_batch']}, ckpt={c['grad_checkpointing']}, "
            f"{name} adapter, {res['dtype']}")
    stages = " | ".join(f"{res[k]:.2f} s" for k in ("t_generate", "t_ref", "t_policy", "t_backward",
                                                    "t_surgery", "t_optimizer", "t_step"))
    return (f"| {res['date'][:10]} | {res['device_name']} (gpu_check.py) | {c['shape']} | {conf} | {stages} "
            f"| {peak:.1f} GB {'CUDA max allocated' if res['device'] == 'cuda' else 'RSS'} |")


def main(cfg: GpuCheckConfig) -> dict:
    t0 = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    preset = cfg.preset or ("full" if device == "cuda" else "smoke")
    p = sweep.preset_fields(preset)
    shape = sweep.MODEL_SHAPES.get(p["model"])
    if shape is None:
        raise ValueError(f"--preset {preset}: model {p['model']} has no bench_step shape; "
                         "use full, fast or smoke")
    base = bench_config(p, shape, cfg, False, device)
    if cfg.prompt_len_mean > 0:
        base = dataclasses.replace(base, prompt_len_mean=cfg.prompt_len_mean,
                                   prompt_len_std=cfg.prompt_len_mean / 4,
                                   prompt_len_min=min(base.prompt_len_min, int(cfg.prompt_len_mean)))
    B.parse_gen_len(base.gen_len, base.max_new_tokens)
    torch.set_num_threads(base.threads)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[base.dtype]
    notes: list[str] = []

    def left() -> float:
        return cfg.time_limit_s - (time.perf_counter() - t0)

    t = time.perf_counter()
    model, adapters, n_params, t_wrap, exact = B.build_model(base, device, dtype)
    t_build = time.perf_counter() - t
    print(f"[gpu-check] built {shape} ({n_params / 1e6:.1f}M params, {len(adapters)} adapters) "
          f"on {device} in {t_build:.1f} s", file=sys.stderr)
    directions = antipasto.random_directions(adapters, seed=cfg.seed)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    rng = random.Random(cfg.seed)
    prompt_ids, lens = B.make_rollouts(base, model.config.vocab_size, rng)
    gen_batch = base.gen_batch
    if device == "cuda":
        # as bench_step: fit the generation batch to the memory left (never above the preset's)
        free, _ = torch.cuda.mem_get_info()
        merged = sum(a.base.weight.numel() for a in adapters.values()) * (torch.finfo(dtype).bits // 8)
        kvb = B.kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8)
        gen_batch = min(gen_batch, B.auto_gen_batch(free - merged, kvb, max(map(len, prompt_ids)) + max(lens),
                                                    len(prompt_ids)))

    # warm-up: one group, 16-token completions, through both train variants
    warm = dataclasses.replace(base, rollouts=base.group_size,
                               gen_len=f"fixed:{min(16, base.max_new_tokens)}")
    w_ids, w_lens = B.make_rollouts(warm, model.config.vocab_size, random.Random(cfg.seed + 1))
    t = time.perf_counter()
    w_comp, _ = generate(warm, model, w_ids, w_lens, len(w_ids), device)
    for v in VARIANTS:
        train_pass(dataclasses.replace(warm, fused_adapter=v == "fused"), model, adapters, directions,
                   optimizer, params, w_ids, w_comp, w_lens, device)
    t_warm = time.perf_counter() - t
    print(f"[gpu-check] warm-up {t_warm:.1f} s; {left():.0f} s of the time limit left", file=sys.stderr)

    results: dict = {}
    completions, gen = generate(base, model, prompt_ids, lens, gen_batch, device)
    print(f"[gpu-check] generation {gen['t_generate']:.1f} s ({sum(map(len, completions))} tokens, batches "
          f"{gen['gen_batches']}); {left():.0f} s left", file=sys.stderr)
    name, peak_flops, hbm = B.gpu_specs(device, dtype)
    for v in VARIANTS:
        b = dataclasses.replace(base, fused_adapter=v == "fused")
        last = results.get("unfused")
        need = 1.2 * last["t_train"] if last else 0.0
        if left() < need:
            notes.append(f"{v}: skipped, {left():.0f} s left < {need:.0f} s needed")
            continue
        tr = train_pass(b, model, adapters, directions, optimizer, params, prompt_ids,
                        completions, lens, device)
        res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_sha": runs.git_sha(),
               "config": dataclasses.asdict(b), "preset": preset, "device": device, "device_name": name,
               "dtype": base.dtype, "svd": "exact" if exact else "random", "params": n_params,
               "gen_batch": gen_batch, "rollouts": b.rollouts,
               "completion_lengths_mean": sum(lens) / len(lens), "t_build": t_build, "t_warmup": t_warm,
               "t_merge": gen["t_merge"], "t_generate": gen["t_generate"], **tr,
               "peak_mem_gen_gb": gen["peak_mem_gen_gb"], "gen_batches": gen["gen_batches"],
               "mem_kind": "cuda max_memory_allocated" if device == "cuda" else "cpu process max RSS"}
        res["t_step"] = (res["t_merge"] + res["t_generate"] + tr["t_train"] + tr["t_surgery"]
                         + tr["t_optimizer"])
        res["train_tokens_per_s"] = tr["train_tokens"] / tr["t_train"]
        res["mfu_6n"] = 6 * n_params * tr["train_tokens"] / tr["t_train"] / peak_flops if peak_flops else None
        results[v] = res
        print(f"[gpu-check] {v}: train {tr['t_train']:.1f} s, step {res['t_step']:.1f} s; "
              f"{left():.0f} s left",
              file=sys.stderr)
    vllm: dict = {"ran": False}
    if not cfg.vllm:
        vllm["why"] = "--no-vllm"
    elif importlib.util.find_spec("vllm") is None:
        vllm["why"] = "vllm is not installed (EXTRAS=dev,vllm bash scripts/setup.sh)"
    elif device != "cuda":
        vllm["why"] = "no CUDA device"
    elif left() < 60:
        vllm["why"] = f"skipped: {left():.0f} s of the time limit left"
    else:
        del model, adapters, optimizer, params  # free the GPU for the engine
        torch.cuda.empty_cache()
        vllm = vllm_test(left())
    out = {"kind": "gpu-check", "preset": preset, "shape": shape, "device": device, "device_name": name,
           "results": results, "vllm": vllm, "notes": notes, "wall_s": time.perf_counter() - t0}
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    cfg.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"[gpu-check] wrote {cfg.json} in {out['wall_s']:.0f} s")
    print("docs/performance.md rows (| date | machine | shape | config | generate | ref | policy | backward "
          "| surgery | optimizer | step | peak mem |):")
    for v, res in results.items():
        print(row(res, v))
    if len(results) == 2:
        u, f = results["unfused"]["t_train"], results["fused"]["t_train"]
        print(f"fused / unfused train pass: {f:.2f} / {u:.2f} s = {f / u:.2f}x")
    print(f"vLLM: {json.dumps({k: v for k, v in vllm.items() if k != 'tail'})}")
    for n in notes:
        print(f"note: {n}")
    return out


if __name__ == "__main__":
    try:
        main(tyro.cli(GpuCheckConfig))
    except ValueError as e:
        sys.exit(f"gpu_check.py: {e}")
