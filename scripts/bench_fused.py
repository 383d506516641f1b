"""One adapted Linear, fused vs unfused train pass (antipasto.fused_training): forward, forward+backward, and
the once-per-step merge rebuild, at a chosen shape and token count. CPU or GPU; prints one line per config.

    .venv/bin/python scripts/bench_fused.py  # Qwen3 MLP shapes at 4096 tokens
    .venv/bin/python scripts/bench_fused.py --d-in 2560 --d-out 9728 --tokens 16384 --dtype bfloat16 \
        --device cuda

The fused forward is one matmul with a cached W + U diag(s) Vh instead of three; backward stays at three.
The rebuild (U diag(s) Vh, once per optimizer step) costs about what `rank` tokens of forward cost, so the
fused pass only pays off when a step trains on many more tokens than the rank (always true in real runs:
hundreds of thousands of tokens per step; not true in tiny CPU benches).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import antipasto  # noqa: E402
from bench_step import sync  # noqa: E402


@dataclass
class FusedBenchConfig:
    """Time one adapted Linear's train pass, fused and unfused."""

    shapes: tuple[str, ...] = ("1024x3072", "3072x1024", "2560x9728")
    """d_in x d_out pairs (default: Qwen3-0.6B up/down, Qwen3-4B up)"""
    tokens: int = 4096
    """tokens in the batch (B * T)"""
    dtype: str = "float32"
    """float32 | bfloat16"""
    device: str = "cpu"
    """cpu | cuda"""
    repeats: int = 3
    """best of this many timings"""


def best(fn, device: str, n: int) -> float:
    ts = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_one(d_in: int, d_out: int, cfg: FusedBenchConfig) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("p", nn.Linear(d_in, d_out).to(cfg.device, dtype))
    a = antipasto.wrap_model(m, targets=("p",))["p"]
    with torch.no_grad():
        a.delta_S.normal_(0, 0.01)
    x = torch.randn(cfg.tokens, d_in, device=cfg.device, dtype=dtype, requires_grad=True)  # (N, d_in)

    def fwd_bwd():
        m(x).float().sum().backward()

    out = {"shape": f"{d_in}x{d_out}", "rank": a.r, "tokens": cfg.tokens}
    out["plain_fwd"] = best(lambda: m(x), cfg.device, cfg.repeats)
    out["plain_fwd_bwd"] = best(fwd_bwd, cfg.device, cfg.repeats)
    with antipasto.fused_training(m):
        m(x)  # build the merged weight
        out["fused_fwd"] = best(lambda: m(x), cfg.device, cfg.repeats)
        out["fused_fwd_bwd"] = best(fwd_bwd, cfg.device, cfg.repeats)

        def rebuild_and_fwd():
            a._fused.clear()
            m(x)

        out["rebuild"] = max(0.0, best(rebuild_and_fwd, cfg.device, cfg.repeats) - out["fused_fwd"])
    return out


def main(cfg: FusedBenchConfig) -> list[dict]:
    print(f"device {cfg.device}, dtype {cfg.dtype}, {cfg.tokens} tokens, best of {cfg.repeats} (ms)")
    rows = []
    for s in cfg.shapes:
        d_in, d_out = (int(v) for v in s.lower().split("x"))
        r = bench_one(d_in, d_out, cfg)
        rows.append(r)
        ms = {k: 1e3 * v for k, v in r.items() if isinstance(v, float)}
        print(f"{r['shape']:>10} r={r['rank']:5d} | fwd {ms['plain_fwd']:8.1f} -> {ms['fused_fwd']:8.1f} "
              f"({r['plain_fwd'] / r['fused_fwd']:.2f}x) | fwd+bwd {ms['plain_fwd_bwd']:8.1f} -> "
              f"{ms['fused_fwd_bwd']:8.1f} ({r['plain_fwd_bwd'] / r['fused_fwd_bwd']:.2f}x) "
              f"| merge rebuild once per step {ms['rebuild']:7.1f}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(FusedBenchConfig))
