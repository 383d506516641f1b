"""train.py's organism preset: its inputs are checked before the model loads, and (slow) vanilla Dr.GRPO on
the built organism raises the strict hack rate above its step-0 value and evaluates on the held-out
problems."""

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest

import models
import train
from cli import UserError

REPO = Path(__file__).resolve().parent.parent


def organism_cfg(tmp_path, **kw):
    return dataclasses.replace(train.PRESETS["organism"][1], out_dir=str(tmp_path / "runs"), **kw)


def test_unbuilt_organism_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    with pytest.raises(UserError, match=r"--model organism: .*just organism-build"):
        train.validate(organism_cfg(tmp_path))


def test_missing_eval_data_path_is_a_user_error(tmp_path):
    cfg = dataclasses.replace(train.PRESETS["smoke"][1], out_dir=str(tmp_path / "runs"), teacher_pool_dir="",
                              mix_ratio=0.0, eval_data_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match=r"--eval-data-path=.*nope\.jsonl.* does not exist"):
        train.validate(cfg)


@pytest.mark.slow
def test_vanilla_organism_learns_the_hack(tmp_path):
    """The organism preset, seed 0, 30 steps (~4-7 min on 2 cores): the strict hack rate of the training
    rollouts averaged over the last 5 steps exceeds step 0's by >= 0.15 (measured seed 0: 0.03 -> ~0.5); the
    final eval runs on the 35 held-out problems x 4 samples."""
    import subprocess

    # as `just organism-build` (a fresh process, so its kernels are pinned); cached after the first build
    subprocess.run([sys.executable, str(REPO / "scripts/build_organism.py")], check=True, timeout=3600)
    run = train.main(organism_cfg(tmp_path, run_name="org-vanilla"))
    rows = list(csv.DictReader(open(run / "log.tsv"), delimiter="\t"))
    hack = [float(r["hack_strict"]) for r in rows]
    assert len(hack) == 30
    assert sum(hack[-5:]) / 5 >= hack[0] + 0.15, hack
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_problems"] == 35 and ev["modes"]["deploy"]["n"] + ev["modes"]["deploy"]["n_infra"] == 35 * 4
