"""gpu_check.py: the one prepared GPU check (issue 15): the full preset's step at typical lengths, fused vs
unfused adapter, peak memory, and the real-vLLM test; sized to finish within 8 minutes on one H100/H200.

    python scripts/gpu_check.py                      # CUDA: the `full` preset's shape; CPU: the `smoke` one
    python scripts/gpu_check.py --preset smoke --device cpu --json /tmp/gpu-check.json   # the CPU test's path
    just gpu-check                                   # a box with this repo's .venv (CUDA torch)
    bash scripts/gpu_check_device.sh                 # the lent device machine (docs/performance.md)

In order, cheapest and most important first; --json is rewritten after every part, so a kill keeps what ran;
a part that raises is recorded under "errors" and the later parts still run (each part is skipped, and says
so, when less than its share of --time-limit-s is left):
  1. build the preset's model shape once with random weights (scripts/bench_step.py's build_model;
     no download)
  2. warm-up: a short generation, then one train pass per adapter variant on the micro-batch of the
     longest rows (kernels chosen, allocator grown to the timed shapes)
  3. the train pass (ref + policy log-probs, backward, surgery, clip + AdamW) once with the unfused adapter
     and once with antipasto.fused_training, on completions of the assigned `typical` lengths (random token
     ids: a train pass costs the same for any ids of those lengths); peak memory per phase
  4. one timed generation at the preset's rollouts / group size / max_new_tokens with those lengths
     (bench_step's forced-length generation, merged inference as in train.py); when the time left does not
     cover the next batch, the rest is extrapolated from the batches timed (marked in the record); each
     variant's step time = merge + generate + its train pass
  5. when vllm is importable, CUDA is there and SmolLM2 is fetched: tests/test_vllm_backend.py's
     real-engine test in its own process group (pass/fail, seconds)
Writes --json (default out/bench/gpu-check.json):
{"kind": "gpu-check", "env": ..., "results": {"unfused": ..., "fused": ...}, "vllm": ...}; a result carries
bench_step's "config", and "t_step" once its generation is timed, so scripts/sweep.py's GPU-hour estimate
uses it when its config matches the preset's. Prints a ready docs/performance.md row per variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
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
    """seeds the random weights, the synthetic prompts and lengths, and the sampling"""
    git_sha: str = ""
    """recorded commit ('' = `git rev-parse HEAD`; pass it where the tree has no .git, as on the device)"""


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
                           l_max=b.max_new_tokens, inner_steps=1, fused_adapter=b.fused_adapter,
                           temperature=b.temperature)


def generate(b: B.BenchConfig, model, prompt_ids, lens, gen_batch: int, device: str,
             time_left=None) -> tuple[list, dict]:
    """Forced-length generation under merged inference (as bench_step.one_step): completions and timings.

    time_left() (seconds) is asked before each batch after the first: when it is below 1.2 x that batch's
    estimate (the first batch's time per decode step x the batch's decode steps), the rest is not run and
    t_generate adds the estimate (t_generate_extrapolated = True, the batches timed listed)."""
    tok = B._FakeTokenizer(model.config.vocab_size)
    r: dict = {}
    if device == "cuda":
        torch.cuda.empty_cache()  # so the reserved peak is this phase's, not the earlier phases' cache
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    completions, batches, timed = [], [], []
    with contextlib.ExitStack() as stack:
        B.sync(device)
        t = time.perf_counter()
        stack.enter_context(antipasto.merged_inference(model))
        B.sync(device)
        r["t_merge"] = time.perf_counter() - t
        per_step, estimated = 0.0, 0.0
        for s in range(0, len(prompt_ids), gen_batch):
            chunk, L = prompt_ids[s : s + gen_batch], lens[s : s + gen_batch]
            batches.append((len(chunk), max(map(len, chunk)), max(L)))
            if timed and time_left is not None and (estimated or time_left() < 1.2 * per_step * max(L)):
                estimated += per_step * max(L)  # (one full batch's decode steps; the last may be smaller)
                continue
            t = time.perf_counter()
            outs = grpo.generate(model, tok, chunk, max(L), b.temperature, b.top_p, gen_batch,
                                 seed=b.seed + s)
            B.sync(device)
            timed.append(time.perf_counter() - t)
            for (ids, trunc, _), n in zip(outs, L):
                assert trunc and len(ids) == max(L), (
                    f"forced-length generation returned {len(ids)} tokens (truncated={trunc}), "
                    f"expected {max(L)}")
                completions.append(ids[:n])
            per_step = timed[0] / batches[0][2]
    r["t_generate"] = sum(timed) + estimated
    r["t_generate_extrapolated"] = bool(estimated)
    r["gen_batches_timed"] = len(timed)
    r["gen_batch_seconds"] = timed
    r["peak_mem_gen_gb"] = B.peak_mem_gb(device)
    r["peak_mem_gen_reserved_gb"] = reserved_gb(device)
    r["gen_batches"] = batches
    return completions, r


def reserved_gb(device: str) -> float | None:
    """The caching allocator's peak reservation (GiB; what nvidia-smi roughly sees), None off CUDA."""
    return torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None


def train_pass(b: B.BenchConfig, model, adapters, directions, optimizer, params, prompt_ids, completions,
               lens, device: str) -> dict:
    """grpo.policy_gradient + surgery + clip + AdamW on the given completions, timed per stage."""
    r: dict = {}
    if device == "cuda":
        torch.cuda.empty_cache()
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
    r["peak_mem_train_reserved_gb"] = reserved_gb(device)
    assert gn == gn and gn > 0, f"grad norm {gn}: the train pass produced no gradient"
    r["train_tokens"] = sum(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    return r


def run_group(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    """Run cmd in its own process group with its output to a file (a pipe would keep waiting for any
    grandchild that inherited it); on timeout kill the whole group. (returncode, output)."""
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        try:
            rc, why = p.wait(timeout=timeout_s), ""
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc, why = p.wait(), f"timed out after {timeout_s:.0f} s (process group killed)\n"
        log.seek(0)
        return rc, why + log.read()


def vllm_test(limit_s: float) -> dict:
    """The real-engine test of tests/test_vllm_backend.py in its own process group: passed, seconds, tail."""
    t = time.perf_counter()
    test = "tests/test_vllm_backend.py::test_real_vllm_engine_follows_the_adapter"
    rc, out = run_group([sys.executable, "-m", "pytest", "-q", "-rs", test], max(10.0, limit_s))
    passed = rc == 0 and " passed" in out and "skipped" not in out
    return {"ran": True, "test": test, "passed": passed, "rc": rc, "seconds": time.perf_counter() - t,
            "tail": out[-1500:]}


def vllm_skip_reason(cfg: GpuCheckConfig, device: str, left: float) -> str:
    """Why the real-vLLM test cannot run here ('' when it can)."""
    if not cfg.vllm:
        return "--no-vllm"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (EXTRAS=dev,vllm bash scripts/setup.sh; the lent device image has none)"
    if device != "cuda":
        return "no CUDA device"
    try:
        import models  # the real test loads SmolLM2

        models.check_available("smollm2-135m")
    except Exception as e:  # noqa: BLE001  (cli.UserError: the GGUF is not fetched)
        return f"the test's model is missing: {e}"
    if left < 60:
        return f"skipped: {left:.0f} s of the time limit left"
    return ""


def env_info(device: str) -> dict:
    """What the figures were measured with."""
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "host": platform.node(),
            "device_name": (torch.cuda.get_device_name() if device == "cuda"
                            else platform.processor() or "cpu")}


def row(res: dict, name: str) -> str:
    """A docs/performance.md 'Measured' row (generate includes the merge, so the stages add up to step)."""
    c = res["config"]
    peak = max(res["peak_mem_gen_gb"], res["peak_mem_train_gb"])
    est = ", generate partly extrapolated" if res.get("t_generate_extrapolated") else ""
    conf = (f"{c['rollouts']} rollouts, G={c['group_size']}, {c['gen_len']} (static batches decode to their "
            f"longest), max {c['max_new_tokens']}, gen_batch {res['gen_batch']}, mb {c['micro_batch']}, "
            f"ckpt={c['grad_checkpointing']}, {name} adapter, {res['dtype']}{est}")
    cells = [res["t_merge"] + res["t_generate"]] + [res[k] for k in ("t_ref", "t_policy", "t_backward",
                                                                     "t_surgery", "t_optimizer", "t_step")]
    stages = " | ".join(f"{x:.2f} s" for x in cells)
    if res["device"] == "cuda":
        rsv = max(res.get("peak_mem_gen_reserved_gb") or 0, res.get("peak_mem_train_reserved_gb") or 0)
        mem = f"{peak:.1f} GiB allocated, {rsv:.1f} GiB reserved"
    else:
        mem = f"{peak:.1f} GiB RSS"
    return (f"| {res['date'][:10]} | {res['device_name']} (gpu_check.py) | {c['shape']} | {conf} | {stages} "
            f"| {mem} |")


def write(path: Path, out: dict) -> None:
    """Atomic rewrite, so a kill mid-write leaves the previous record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)


def main(cfg: GpuCheckConfig) -> dict:
    t0 = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda but torch.cuda.is_available() is False (torch {torch.__version__}); "
                         "use --device cpu")
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
    env = env_info(device)
    sha = cfg.git_sha or runs.git_sha()
    print(f"[gpu-check] {preset} preset ({shape}) on {env['device_name']}: python {env['python']}, torch "
          f"{env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, commit {sha[:12]}",
          file=sys.stderr)
    results: dict = {}
    name, peak_flops, hbm = B.gpu_specs(device, dtype)
    out = {"kind": "gpu-check", "preset": preset, "shape": shape, "device": device, "device_name": name,
           "git_sha": sha, "env": env, "results": results, "vllm": {"ran": False, "why": "not reached"},
           "notes": notes, "complete": False}

    def left() -> float:
        return cfg.time_limit_s - (time.perf_counter() - t0)

    def save(phase: str) -> None:
        out["wall_s"], out["last_phase"] = time.perf_counter() - t0, phase
        write(cfg.json, out)

    def guarded(phase: str, fn):
        """fn() or, when it raises, None with the error in the record (the later phases still run)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (a CUDA OOM or a kernel error in one phase)
            msg = f"{type(e).__name__}: {e}"
            out.setdefault("errors", {})[phase] = msg + "\n" + traceback.format_exc()[-2000:]
            print(f"[gpu-check] {phase} failed: {msg[:500]}", file=sys.stderr)
            if device == "cuda":
                torch.cuda.empty_cache()
            save(f"{phase} (failed)")
            return None

    save("start")
    t = time.perf_counter()
    try:
        model, adapters, n_params, _, exact = B.build_model(base, device, dtype)
    except Exception as e:
        out["errors"] = {"build": f"{type(e).__name__}: {e}"}
        save("build (failed)")
        raise
    t_build = time.perf_counter() - t
    print(f"[gpu-check] built {shape} ({n_params / 1e6:.1f}M params, {len(adapters)} adapters) "
          f"on {device} in {t_build:.1f} s", file=sys.stderr)
    directions = antipasto.random_directions(adapters, seed=cfg.seed)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    rng = random.Random(cfg.seed)
    prompt_ids, lens = B.make_rollouts(base, model.config.vocab_size, rng)
    # the train pass's completions: random ids of the assigned lengths (its cost depends on lengths only)
    completions = [[rng.randrange(3, model.config.vocab_size) for _ in range(n)] for n in lens]
    gen_batch = base.gen_batch
    if device == "cuda":
        # as bench_step: fit the generation batch to the memory left (never above the preset's)
        free, _ = torch.cuda.mem_get_info()
        merged = sum(a.base.weight.numel() for a in adapters.values()) * (torch.finfo(dtype).bits // 8)
        kvb = B.kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8)
        gen_batch = min(gen_batch, B.auto_gen_batch(free - merged, kvb, max(map(len, prompt_ids)) + max(lens),
                                                    len(prompt_ids)))
    out["t_build"], out["gen_batch"] = t_build, gen_batch
    save("build")

    # warm-up: a short generation (one group, 16 tokens), then each train variant on the micro-batch of the
    # longest rows (the timed passes then find their kernels chosen and the allocator grown)
    warm = dataclasses.replace(base, rollouts=base.group_size,
                               gen_len=f"fixed:{min(16, base.max_new_tokens)}")
    w_ids, w_lens = B.make_rollouts(warm, model.config.vocab_size, random.Random(cfg.seed + 1))
    t = time.perf_counter()
    guarded("warm-up generate", lambda: generate(warm, model, w_ids, w_lens, len(w_ids), device))
    mb = base.micro_batch
    longest = sorted(range(len(lens)), key=lambda i: -(len(prompt_ids[i]) + lens[i]))[:mb]
    warmed = {v: guarded(f"warm-up {v}", lambda v=v: train_pass(
        dataclasses.replace(base, fused_adapter=v == "fused", rollouts=mb), model, adapters, directions,
        optimizer, params, [prompt_ids[i] for i in longest], [completions[i] for i in longest],
        [lens[i] for i in longest], device)) is not None for v in VARIANTS}
    t_warm = time.perf_counter() - t
    out["t_warmup"] = t_warm
    save("warm-up")
    print(f"[gpu-check] warm-up {t_warm:.1f} s; {left():.0f} s of the time limit left", file=sys.stderr)

    for v in VARIANTS:
        b = dataclasses.replace(base, fused_adapter=v == "fused")
        last = results.get("unfused")
        need = 1.2 * last["t_train"] if last else 0.0
        if not warmed[v]:
            notes.append(f"{v}: skipped, its warm-up failed (errors)")
            continue
        if left() < need:
            notes.append(f"{v}: skipped, {left():.0f} s left < {need:.0f} s needed")
            continue
        tr = guarded(f"train {v}", lambda b=b: train_pass(b, model, adapters, directions, optimizer, params,
                                                          prompt_ids, completions, lens, device))
        if tr is None:
            continue
        res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_sha": sha,
               "config": dataclasses.asdict(b), "preset": preset, "device": device, "device_name": name,
               "dtype": base.dtype, "svd": "exact" if exact else "random", "params": n_params,
               "gen_batch": gen_batch, "rollouts": b.rollouts,
               "completion_lengths_mean": sum(lens) / len(lens), "t_build": t_build, "t_warmup": t_warm, **tr,
               "mem_kind": "cuda max_memory_allocated / max_memory_reserved (GiB)" if device == "cuda"
               else "cpu process max RSS (GiB)"}
        res["train_tokens_per_s"] = tr["train_tokens"] / tr["t_train"]
        res["mfu_6n"] = 6 * n_params * tr["train_tokens"] / tr["t_train"] / peak_flops if peak_flops else None
        results[v] = res
        save(f"train {v}")
        print(f"[gpu-check] {v}: train {tr['t_train']:.1f} s (peak {tr['peak_mem_train_gb']:.1f} GiB); "
              f"{left():.0f} s left", file=sys.stderr)
    if len(results) == 2:
        u, f = results["unfused"]["t_train"], results["fused"]["t_train"]
        out["fused_over_unfused_train"] = f / u

    # generation: batches after the first stop at the time limit (the rest is extrapolated); the first
    # batch always runs once 30 s are left
    gen = None
    if left() < 30:
        notes.append(f"generation: skipped, {left():.0f} s left (no t_step recorded)")
    else:
        gen = guarded("generate", lambda: generate(base, model, prompt_ids, lens, gen_batch, device,
                                                   time_left=left)[1])
    if gen is not None:
        for res in results.values():
            res.update(gen)
            res["t_step"] = (res["t_merge"] + res["t_generate"] + res["t_train"] + res["t_surgery"]
                             + res["t_optimizer"])
        if gen["t_generate_extrapolated"]:
            n_b = len(gen["gen_batches"])
            notes.append(f"generation: {gen['gen_batches_timed']} of {n_b} batches timed, the rest "
                         "extrapolated from their decode steps")
        save("generate")
        print(f"[gpu-check] generation {gen['t_generate']:.1f} s (batches {gen['gen_batches']}, timed "
              f"{gen['gen_batches_timed']}); {left():.0f} s left", file=sys.stderr)

    why = vllm_skip_reason(cfg, device, left())
    if why:
        out["vllm"] = {"ran": False, "why": why}
    else:
        del model, adapters, optimizer, params  # free the GPU for the engine
        gc.collect()
        torch.cuda.empty_cache()
        out["vllm"] = vllm_test(left())
    # complete: both variants have a step time and no phase failed
    out["complete"] = (set(results) == set(VARIANTS) and all("t_step" in r for r in results.values())
                       and not out.get("errors"))
    save("done")
    vllm = out["vllm"]
    print(f"[gpu-check] wrote {cfg.json} in {out['wall_s']:.0f} s")
    print("docs/performance.md rows (| date | machine | shape | config | generate | ref | policy | backward "
          "| surgery | optimizer | step | peak mem |):")
    for v, res in results.items():
        if "t_step" in res:
            print(row(res, v))
    if "fused_over_unfused_train" in out:
        print(f"fused / unfused train pass: {results['fused']['t_train']:.2f} / "
              f"{results['unfused']['t_train']:.2f} s = {out['fused_over_unfused_train']:.2f}x")
    print(f"vLLM: {json.dumps({k: v for k, v in vllm.items() if k != 'tail'})}")
    for n in notes:
        print(f"note: {n}")
    for phase, err in (out.get("errors") or {}).items():
        print(f"error in {phase}: {err.splitlines()[0][:300]}")
    return out


if __name__ == "__main__":
    try:
        main(tyro.cli(GpuCheckConfig))
    except ValueError as e:
        sys.exit(f"gpu_check.py: {e}")
