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
