"""scripts/gpu_check.py on CPU (the tiny `smoke` shape): it times both adapter variants, writes a json that
scripts/sweep.py's GPU-hour estimate picks up for the smoke preset, and prints performance.md rows.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_gpu_check.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402
import grpo  # noqa: E402
import sweep  # noqa: E402


def test_cpu_path_writes_a_record_the_budget_uses(tmp_path, capsys):
    out = tmp_path / "bench" / "gpu-check.json"
    res = gpu_check.main(gpu_check.GpuCheckConfig(device="cpu", json=out, prompt_len_mean=32))
    got = json.loads(out.read_text())
    assert got["kind"] == "gpu-check" and got["preset"] == "smoke" and got["shape"] == "tiny"
    assert set(got["results"]) == {"unfused", "fused"} and got["vllm"]["ran"] is False
    for v, r in got["results"].items():
        c = r["config"]
        # PRESETS
        assert (c["shape"], c["rollouts"], c["group_size"], c["max_new_tokens"]) == ("tiny", 16, 4, 48)
        assert c["fused_adapter"] == (v == "fused")
        parts = (r["t_merge"] + r["t_generate"] + r["t_ref"] + r["t_policy"] + r["t_backward"]
                 + r["t_surgery"] + r["t_optimizer"])
        assert r["t_step"] == pytest.approx(parts, rel=1e-9) and r["t_step"] > 0
        assert r["peak_mem_train_gb"] > 0 and r["train_tokens"] > 16 * 1
    assert res["results"]["unfused"]["t_generate"] == res["results"]["fused"]["t_generate"]  # generated once
    text = capsys.readouterr().out
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert len(rows) == 2 and all(ln.count("|") == 13 for ln in rows), rows  # performance.md's 12 columns
    assert "unfused adapter" in rows[0] and "fused adapter" in rows[1]
    # the budget estimate reads it for the smoke preset (unfused), labelled as measured
    st = sweep.measured_step(out.parent, sweep.preset_fields("smoke"))
    assert (st is not None and st.measured
            and st.sec_per_step == pytest.approx(got["results"]["unfused"]["t_step"]))
    assert str(out) in st.source
    assert (sweep.measured_step(out.parent, sweep.preset_fields("smoke", ("fused_adapter=true",)))
            .sec_per_step == pytest.approx(got["results"]["fused"]["t_step"]))


def test_a_crash_after_the_train_passes_keeps_their_figures(tmp_path, monkeypatch):
    """The record is rewritten after every phase and a failing phase is recorded, not fatal: a generation
    that dies leaves both train passes on disk without t_step (so the budget does not read a partial step
    as a measured one), and the record says it is not complete."""
    out = tmp_path / "bench" / "gpu-check.json"
    real, calls = gpu_check.generate, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 1:  # the warm-up's generation runs; the timed one dies
            raise RuntimeError("CUDA error: out of memory (planted)")
        return real(*a, **k)

    monkeypatch.setattr(gpu_check, "generate", failing)
    res = gpu_check.main(gpu_check.GpuCheckConfig(device="cpu", json=out, prompt_len_mean=32))
    got = json.loads(out.read_text())
    assert got == json.loads(json.dumps(res))
    assert got["complete"] is False and got["last_phase"] == "done" and "planted" in got["errors"]["generate"]
    assert set(got["results"]) == {"unfused", "fused"}
    for r in got["results"].values():
        assert r["t_train"] > 0 and "t_step" not in r and "t_generate" not in r
    assert sweep.measured_step(out.parent, sweep.preset_fields("smoke")) is None


def test_a_failing_fused_warm_up_skips_fused_and_keeps_the_rest(tmp_path, monkeypatch):
    out = tmp_path / "gpu-check.json"
    real = gpu_check.train_pass

    def train_pass(b, *a, **k):
        if b.fused_adapter:
            raise RuntimeError("fused kernel failed (planted)")
        return real(b, *a, **k)

    monkeypatch.setattr(gpu_check, "train_pass", train_pass)
    got = gpu_check.main(gpu_check.GpuCheckConfig(device="cpu", json=out, prompt_len_mean=32))
    assert set(got["results"]) == {"unfused"} and got["results"]["unfused"]["t_step"] > 0
    assert "planted" in got["errors"]["warm-up fused"] and not got["complete"]
    assert any("fused: skipped" in n for n in got["notes"])
    assert json.loads(out.read_text())["results"]["unfused"]["t_step"] == got["results"]["unfused"]["t_step"]


class _Cfg:
    vocab_size = 50


class _Model:
    config = _Cfg()

    def eval(self):
        return self


class _Clock:
    """A fake perf_counter that only the stand-in generator moves."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_generation_past_the_time_limit_is_extrapolated_from_the_batches_timed(monkeypatch):
    """Batches of 4 rows decoding to 20, 10 and 30 tokens at 0.5 s a decode step (a stand-in for
    grpo.generate on a fake clock). With time to spare all three are timed (30 s); with the time left short
    after the first, the rest is estimated at the first batch's 0.5 s per step: 10 + 5 + 15 = 30 s."""
    import contextlib

    clock = _Clock()
    monkeypatch.setattr(gpu_check.time, "perf_counter", clock)
    monkeypatch.setattr(gpu_check.antipasto, "merged_inference", lambda m: contextlib.nullcontext())

    def fake_generate(model, tok, chunk, max_new, *a, **k):
        clock.now += 0.5 * max_new
        return [grpo.Completion([5] * max_new, True) for _ in chunk]

    monkeypatch.setattr(gpu_check.grpo, "generate", fake_generate)
    b = gpu_check.B.BenchConfig(rollouts=12, group_size=4, max_new_tokens=30)
    prompts, lens = [[3, 4]] * 12, [20, 5, 20, 20] + [10] * 4 + [30, 1, 2, 3]
    full, r = gpu_check.generate(b, _Model(), prompts, lens, 4, "cpu", time_left=lambda: 1e9)
    assert (r["gen_batches_timed"], r["t_generate_extrapolated"]) == (3, False)
    assert r["t_generate"] == 30.0 and [len(c) for c in full] == lens
    left = iter([100.0, 0.0])  # enough for batch 2 (1.2 x 5 s), not for batch 3
    part, r = gpu_check.generate(b, _Model(), prompts, lens, 4, "cpu", time_left=lambda: next(left))
    assert (r["gen_batches_timed"], r["t_generate_extrapolated"]) == (2, True) and len(part) == 8
    assert r["gen_batch_seconds"] == [10.0, 5.0] and r["t_generate"] == 30.0
    short, r = gpu_check.generate(b, _Model(), prompts, lens, 4, "cpu", time_left=lambda: 0.0)
    assert (r["gen_batches_timed"], r["t_generate"]) == (1, 30.0) and len(short) == 4


def test_a_timed_out_subprocess_group_is_killed_with_its_grandchildren(tmp_path):
    """vLLM's engine workers inherit the test's output; a timeout must not wait for them, and kills them."""
    import time as _time

    mark = tmp_path / "grandchild-lived"
    t = _time.perf_counter()
    rc, out = gpu_check.run_group(["bash", "-c", f"(sleep 3; touch {mark}) & echo started; sleep 30"],
                                  timeout_s=1.0)
    assert _time.perf_counter() - t < 10, "waited for the grandchild"
    assert rc != 0 and "timed out after 1 s" in out and "started" in out
    _time.sleep(4)
    assert not mark.exists(), "the grandchild outlived the timeout"
