"""scripts/bench_step.py: the tiny shape runs on CPU through the real train.py paths and reports every
field, with token counts equal to what was requested; the analytic helpers against hand arithmetic;
the Qwen3 shapes against the published parameter counts."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_step as B  # noqa: E402

FIELDS = {
    "date", "git_sha", "config", "device", "device_name", "dtype", "attn", "svd", "params", "adapter_params",
    "n_adapters", "kv_bytes_per_token", "gen_batch", "rollouts", "group_size", "gen_len", "max_new_tokens",
    "completion_lengths", "completion_tokens_requested", "completion_tokens", "completion_tokens_computed",
    "prompt_tokens", "train_tokens", "train_tokens_padded", "loss_tokens", "t_build", "t_wrap", "t_merge",
    "t_generate", "t_ref", "t_policy", "t_backward", "t_surgery", "t_optimizer", "t_train", "t_step",
    "gen_tokens_per_s", "train_tokens_per_s", "peak_flops", "hbm_bytes_per_s", "mfu_6n",
    "decode_lower_bound_s", "peak_mem_gen_gb", "peak_mem_train_gb", "peak_mem_gb", "mem_kind", "loss", "kl",
    "grad_norm", "steps",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench_step.py"), "--shape", "tiny", "--rollouts", "6",
           "--group-size", "3", "--gen-len", "typical:5,3,0.2", "--max-new-tokens", "9", "--gen-batch", "4",
           "--micro-batch", "4", "--prompt-len-mean", "24", "--prompt-len-std", "8", "--prompt-len-min", "8",
           "--grad-checkpointing", "--surgery-mode", "route", "--steps", "1", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


def test_tiny_prints_table_and_full_json(tiny_run):
    stdout, res = tiny_run
    for stage in ("merge", "generate", "ref", "policy", "backward", "surgery", "optimizer", "train", "step"):
        assert any(line.startswith(stage) for line in stdout.splitlines()), (
            f"table lacks the {stage!r} row:\n{stdout}")
    assert FIELDS <= res.keys(), f"missing fields {sorted(FIELDS - res.keys())}"
    for k in B.STAGES + ("t_train", "t_step"):
        assert res[k] > 0, f"{k} = {res[k]} not positive"
    assert res["t_step"] >= res["t_generate"] + res["t_train"]
    assert res["t_train"] == pytest.approx(res["t_ref"] + res["t_policy"] + res["t_backward"])
    assert res["device"] == "cpu" and res["mfu_6n"] is None and res["peak_mem_gb"] > 0
    assert res["svd"] == "exact" and res["n_adapters"] == 14  # 2 layers x 7 projections


def test_tiny_token_counts_equal_request(tiny_run):
    _, res = tiny_run
    lens = res["completion_lengths"]
    assert len(lens) == 6 and all(1 <= n <= 9 for n in lens)
    assert res["completion_tokens"] == res["completion_tokens_requested"] == sum(lens)
    assert res["loss_tokens"] == sum(lens)  # the loss saw exactly the requested completion tokens
    # generation computes every row of a batch up to that batch's longest completion
    assert res["completion_tokens_computed"] == sum(len(lens[s : s + 4]) * max(lens[s : s + 4])
                                                    for s in range(0, 6, 4))
    # prompts are shared within groups of 3
    assert res["train_tokens"] == res["prompt_tokens"] + sum(lens)
    assert res["train_tokens_padded"] >= res["train_tokens"]
    assert res["prompt_tokens"] % 3 == 0


def test_forced_lengths_are_exact():
    lens = B.completion_lengths("fixed:7", 5, 9, random.Random(0))
    assert lens == [7] * 5
    lens = B.completion_lengths("typical:100,50,0.5", 2000, 150, random.Random(0))
    assert min(lens) >= 1 and max(lens) == 150
    assert 0.54 < sum(n == 150 for n in lens) / 2000 < 0.62  # 0.5 + 0.5 * P(z > 1) = 0.579


@pytest.mark.parametrize("spec", ["fixed:0", "fixed:2000", "fixed:x", "typical:1,2", "uniform:5"])
def test_bad_gen_len_names_the_flag(spec):
    with pytest.raises(ValueError, match="--gen-len"):
        B.parse_gen_len(spec, 1536)


def test_kv_bytes_and_decode_bound_by_hand():
    from transformers import Qwen3Config

    c = Qwen3Config(**B.SHAPES["qwen3-4b"])
    assert B.kv_bytes_per_token(c, 2) == 2 * 36 * 8 * 128 * 2 == 147456
    # 2 rows, prompt width 3, 2 decode steps: contexts 4 and 5 -> 2 * (4 + 5) = 18 token-reads of KV
    got = B.decode_lower_bound(weight_bytes=100.0, kv_per_token=10, batches=[(2, 3, 2)], hbm_bw=10.0)
    assert got == pytest.approx((2 * 100 + 18 * 10) / 10.0)
    # 80 GB free, 144 KiB per token, 2136 tokens per row -> floor(0.8 * 80e9 / (147456 * 2136)) = 203 rows
    assert B.auto_gen_batch(80e9, 147456, 2136, 256) == 203
    assert B.auto_gen_batch(80e9, 147456, 2136, 64) == 64


@pytest.mark.parametrize("shape,total_b,non_emb_b",
                         [("qwen3-0.6b", 0.6, 0.44), ("qwen3-1.7b", 1.7, 1.4), ("qwen3-4b", 4.0, 3.6)])
def test_shapes_match_published_parameter_counts(shape, total_b, non_emb_b):
    """Qwen3 model cards: 0.6B (0.44B non-embedding), 1.7B (1.4B), 4.0B (3.6B); meta device, no memory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        m = Qwen3ForCausalLM(Qwen3Config(**B.SHAPES[shape], tie_word_embeddings=True))
    n = sum(p.numel() for p in m.parameters())
    emb = m.get_input_embeddings().weight.numel()
    assert round(n / 1e9, 1) == total_b
    assert round((n - emb) / 1e9, 2 if non_emb_b < 1 else 1) == non_emb_b


def test_analytic_sizes_by_hand():
    """Qwen3-4B: full-rank adapter buffers r (d_in + d_out) per projection, summed over 36 layers."""
    res = B.analytic(B.BenchConfig(shape="qwen3-4b", rollouts=32, group_size=16, gen_len="fixed:1536",
                                   grad_checkpointing=True), 16)
    h, q, kv, f = 2560, 4096, 1024, 9728
    per_layer_A = 2560 * (h + q) + 2 * kv * (h + kv) + 2560 * (q + h) + 3 * 2560 * (h + f)
    per_layer_W = h * q + 2 * h * kv + q * h + 3 * h * f
    assert res["A"] == 36 * per_layer_A == 4_888_461_312
    assert res["N_lin"] == 36 * per_layer_W
    assert res["completion_tokens"] == 32 * 1536
    N, A, a = res["N"], res["A"], res["attn_flops_per_token"]
    assert res["train_flops_per_token"] == pytest.approx(8 * N + 6 * A + 5 * a)
    assert res["train_flops_per_token_fused"] == pytest.approx(8 * N + 2 * A + 5 * a)
