"""The train pass's log-probs with the LM head on every position vs only on the completion positions
(grpo.token_logprobs(where=completion mask)): forward + backward time of one micro-batch. Prints one line per
shape; the head's share of the FLOPs is what the saving follows.

    .venv/bin/python scripts/bench_lm_head.py  # the organism's shape, CPU, 1 thread
    .venv/bin/python scripts/bench_lm_head.py --model tiny-random --prompt 300 --completion 48
    .venv/bin/python scripts/bench_lm_head.py --model Qwen/Qwen3-4B --device cuda --prompt 600 \
        --completion 1000

Each run times `repeats` passes of both variants (best of) on random token ids of the model's vocabulary,
batch `--batch` x (prompt + completion) tokens, loss = sum of completion log-probs
(what Dr.GRPO's loss reads).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo  # noqa: E402
import models  # noqa: E402
from bench_step import sync  # noqa: E402


@dataclass
class HeadBenchConfig:
    """Time token_logprobs + backward with the LM head on all positions vs the completion positions only."""

    model: str = "organism"
    """model alias, local path or HF id (loaded with its real weights)"""
    device: str = "cpu"
    """cpu | cuda"""
    dtype: str = "float32"
    """float32 | bfloat16"""
    batch: int = 32
    """sequences per micro-batch"""
    prompt: int = 330
    """prompt tokens per sequence (the organism's hinted prompts: ~250-400)"""
    completion: int = 40
    """completion tokens per sequence"""
    chunk: int = 512
    """logits_chunk"""
    repeats: int = 3
    """best of this many timings per variant"""
    threads: int = 1
    """torch CPU threads"""


def main(cfg: HeadBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    model, _ = models.load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model.train()
    V = model.get_output_embeddings().weight.shape[0]
    T = cfg.prompt + cfg.completion
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (cfg.batch, T), generator=g).to(cfg.device)  # (B, T)
    att = torch.ones_like(ids)  # (B, T)
    cm = torch.zeros(cfg.batch, T, device=cfg.device)  # (B, T)
    cm[:, cfg.prompt:] = 1.0

    def run(where):
        model.zero_grad(set_to_none=True)
        lp = grpo.token_logprobs(model, ids, att, cfg.chunk, where)  # (B, T)
        (lp * cm).sum().backward()

    times = {}
    for name, where in (("all positions", None), ("completion only", cm)):
        run(where)  # warm-up
        ts = []
        for _ in range(cfg.repeats):
            sync(cfg.device)
            t = time.perf_counter()
            run(where)
            sync(cfg.device)
            ts.append(time.perf_counter() - t)
        times[name] = min(ts)
    saving = 1 - times["completion only"] / times["all positions"]
    print(f"{cfg.model} {cfg.device} {cfg.dtype} B={cfg.batch} prompt={cfg.prompt} "
          f"completion={cfg.completion} V={V}: all positions {times['all positions']:.3f} s, "
          f"completion only {times['completion only']:.3f} s -> {saving:.0%} less (fwd+bwd, "
          f"threads={cfg.threads})")
    return {"times": times, "saving": saving}


if __name__ == "__main__":
    main(tyro.cli(HeadBenchConfig))
