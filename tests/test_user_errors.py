"""User errors stop train.py before the model loads, as one stderr line naming the field or file (exit 2, no
traceback); damaged checkpoints fall back to the previous sound one (issue 20).

The subprocess cases run the real entry point (its exit status and stderr); the others call train.validate /
runs directly."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cli
import problems as P
import runs
import train

ROOT = Path(__file__).resolve().parent.parent
NO_POOL = ("--teacher-pool-dir", "", "--mix-ratio", "0")


def cfg(tmp: Path, **kw) -> train.TrainConfig:
    """The smoke preset without a teacher pool, writing under tmp."""
    base = dataclasses.replace(train.PRESETS["smoke"][1], out_dir=str(tmp / "runs"), teacher_pool_dir="",
                               mix_ratio=0.0)
    return dataclasses.replace(base, **kw)


def other_model_vhack(tmp: Path) -> Path:
    """A direction file whose metadata names another model (the header is all validate reads)."""
    p = tmp / "other.safetensors"
    meta = {"model_id": json.dumps("HuggingFaceTB/SmolLM2-135M-Instruct"), "dtype": json.dumps("float32")}
    save_file({"x": torch.zeros(2)}, str(p), metadata=meta)
    return p


def truncated_gz(tmp: Path) -> Path:
    """The first half of the LeetCode train file's bytes: gzip raises EOFError at its end."""
    src = P.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz"
    p = tmp / "train.jsonl.gz"
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return p


# ---- validate(), in process: one UserError per case, naming the field or file


def test_bad_inputs_raise_user_error_naming_the_field(tmp_path):
    prepared = tmp_path / "data" / "train.jsonl"  # a prepared split of the local source, with its manifest
    prepared.parent.mkdir()
    prepared.write_text("{}\n")
    (prepared.parent / "manifest.json").write_text(json.dumps({"source": "local-v0.2.0"}))
    bare = tmp_path / "bare" / "train.jsonl"  # no manifest beside it
    bare.parent.mkdir()
    bare.write_text("{}\n")
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "config.json").write_text("{}")
    (tmp_path / "notarun").mkdir()
    cases = [
        (dict(lr=-0.001), "--lr=-0.001"),
        (dict(top_p=1.5), "--top-p=1.5"),
        (dict(betas=(0.9, 1.0)), "--betas="),
        (dict(steps=0), "--steps=0"),
        (dict(mix_ratio=0.5), "--mix-ratio=0.5 needs --teacher-pool-dir"),
        (dict(teacher_pool_dir=str(tmp_path)), "--mix-ratio is 0"),
        (dict(arm="erase", vhack_path=str(tmp_path / "nope.safetensors")),
         "nope.safetensors' does not exist"),
        (dict(arm="erase", vhack_path=str(other_model_vhack(tmp_path))), "model_id='HuggingFaceTB/SmolLM2"),
        (dict(data_path=str(truncated_gz(tmp_path))), "train.jsonl.gz does not decompress"),
        (dict(data_path=str(tmp_path / "nope.jsonl")), "--data-path="),
        (dict(data_path=str(prepared), train_source="hub"), "prepared from source 'local-v0.2.0' but "
         "--train-source=hub; run `just prepare-data --source hub`"),
        (dict(data_path=str(bare)), "manifest.json not found"),
        (dict(run_name="taken"), "--run-name='taken'"),
        (dict(resume=str(tmp_path / "notarun")), "not a run directory"),
    ]
    for kw, needle in cases:
        with pytest.raises(cli.UserError) as e:
            train.validate(cfg(tmp_path, **kw))
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, f"{kw}: {msg!r} lacks {needle!r}"


def test_a_v_hack_from_another_organism_build_is_refused(tmp_path, monkeypatch):
    """An organism id names a recipe: a rebuild can give other weights. A v_hack whose recorded weights_hash
    differs from this build's is refused in one line (hand-made header); the same hash, or a file from before
    the field existed, passes."""
    import models

    def vhack(wh: str | None) -> Path:
        p = tmp_path / f"v-{wh}.safetensors"
        meta = {"model_id": json.dumps("organism-v1"), "dtype": json.dumps("float32"),
                **({"weights_hash": json.dumps(wh)} if wh else {})}
        save_file({"x": torch.zeros(2)}, str(p), metadata=meta)
        return p

    info = tmp_path / "models" / "organism" / "BUILD_INFO.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"model_id": "organism-v1", "weights_hash": "aaaa"}))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    assert models.weights_hash("organism") == "aaaa" and models.weights_hash("tiny-random") is None
    with pytest.raises(cli.UserError, match="weights_hash='bbbb', this run has weights_hash='aaaa'"):
        cli.check_vhack_file(vhack("bbbb"), "--vhack-path", "organism-v1", "float32",
                             models.weights_hash("organism"))
    cli.check_vhack_file(vhack("aaaa"), "--vhack-path", "organism-v1", "float32", "aaaa")
    cli.check_vhack_file(vhack(None), "--vhack-path", "organism-v1", "float32", "aaaa")


def test_check_gz_names_the_file_of_a_truncated_pool(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    with gzip.open(pool / "step_000.jsonl.gz", "wt") as f:
        f.write("{}\n" * 5000)
    raw = (pool / "step_000.jsonl.gz").read_bytes()
    cli.check_pool_dir(pool, "--teacher-pool-dir")  # sound
    (pool / "step_000.jsonl.gz").write_bytes(raw[:-9])
    with pytest.raises(cli.UserError, match="step_000.jsonl.gz does not decompress"):
        cli.check_pool_dir(pool, "--teacher-pool-dir")


def test_tiny_random_without_its_data_is_a_user_error(tmp_path, monkeypatch):
    """A fresh clone without the LeetCode data: building tiny-random stops in one line (PGRPO_DATA_DIR)."""
    import models

    monkeypatch.setattr(P, "DEFAULT_DATA_DIR", tmp_path / "nowhere")
    with pytest.raises(cli.UserError, match="set PGRPO_DATA_DIR") as e:
        models.tiny_dir(tmp_path / "models")
    assert "\n" not in str(e.value) and not (tmp_path / "models").exists()


def test_git_dirty_lists_changed_tracked_files(tmp_path):
    """A throwaway repository: clean -> ([], ""); an edited tracked file and an untracked one -> only the
    tracked file, with its diff."""
    import antipasto

    def git(*a):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    assert antipasto.git_dirty(tmp_path) == ([], "")
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "scratch.txt").write_text("untracked\n")
    files, diff = antipasto.git_dirty(tmp_path)
    assert files == ["a.py"] and "-x = 1" in diff and "+x = 2" in diff


def test_in_range_specs():
    assert cli.in_range(1, ">=1") and not cli.in_range(0, ">=1")
    assert cli.in_range(1e-9, ">0") and not cli.in_range(0, ">0")
    assert cli.in_range(0, "[0,1)") and not cli.in_range(1, "[0,1)")
    assert cli.in_range(1, "(0,1]") and not cli.in_range(0, "(0,1]")


def test_cli_run_prints_one_line_and_exits_2(capsys):
    def bad():
        raise cli.UserError("--x=1 is wrong;\n  pass --x 2")

    with pytest.raises(SystemExit) as e:
        cli.run(bad)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --x=1 is wrong; pass --x 2\n"

    def bug():
        raise KeyError("a programming error keeps its traceback")

    with pytest.raises(KeyError):
        cli.run(bug)


def test_step_eta_uses_step_times_and_counts_evals():
    eta = cli.StepEta(steps=10, eval_every=5, eval_at_end=True, eval_seqs=100)
    # step 1: 10 s, 4 s of it generating + grading 8 live sequences -> 0.5 s/seq -> an eval ~50 s
    # left: 9 steps x 10 s + evals at step 5 and the end, 2 x 50 s
    assert eta.update(1, 10.0, 4.0, 8, now=100.0) == pytest.approx(90 + 100)
    # the gap after step 5 (its eval) measures the eval: 100 - 10 s of step 6 = 90 s
    for k in range(2, 6):
        eta.update(k, 10.0, 4.0, 8, now=100.0 + 10 * (k - 1))
    assert eta.update(6, 10.0, 4.0, 8, now=140.0 + 100.0) == pytest.approx(4 * 10 + 90)


# ---- checkpoints: verified on load, the previous sound one on damage


@pytest.fixture(scope="module")
def two_ckpt_run(tmp_path_factory) -> Path:
    """A 2-step tiny-random run with checkpoints after steps 1 and 2 (keep 2)."""
    tmp = tmp_path_factory.mktemp("ckrun")
    return train.main(cfg(tmp, steps=2, ckpt_every=1, keep_ckpts=2, eval_at_end=False, run_name="r",
                          rollouts_per_step=8, max_new_tokens=12, max_problems=8, grader_workers=2))


def damaged(run: Path, tmp: Path, how: str) -> Path:
    d = tmp / f"{how}"
    shutil.copytree(run, d)
    ck = d / "ckpt"
    if how == "truncated_adapter":
        f = ck / "step_000002" / "adapter.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty_latest":
        (ck / "latest").write_text("")
    elif how == "latest_nowhere":
        (ck / "latest").write_text("step_000009")
    elif how == "truncated_optimizer":
        f = ck / "step_000002" / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:20])
    elif how == "wrong_state_step":
        (ck / "step_000002" / "state.json").write_text(json.dumps({"step": 7}))
    elif how == "all_bad":
        for s in ("step_000001", "step_000002"):
            (ck / s / "rng.pt").write_bytes(b"")
    return d


def test_checkpoint_writes_latest_atomically(two_ckpt_run):
    ck = two_ckpt_run / "ckpt"
    assert (ck / "latest").read_text() == "step_000002"
    assert not (ck / "latest.tmp").exists()
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000001", "step_000002"]
    assert runs.check_checkpoint(ck / "step_000002") is None


@pytest.mark.parametrize("how,want", [("truncated_adapter", "step_000001"),
                                      ("truncated_optimizer", "step_000001"),
                                      ("wrong_state_step", "step_000001"), ("empty_latest", "step_000002"),
                                      ("latest_nowhere", "step_000002")])
def test_damaged_checkpoint_falls_back(two_ckpt_run, tmp_path, how, want):
    d = damaged(two_ckpt_run, tmp_path, how)
    assert runs.good_checkpoint(d).name == want


def test_no_sound_checkpoint_is_a_user_error(two_ckpt_run, tmp_path):
    d = damaged(two_ckpt_run, tmp_path, "all_bad")
    with pytest.raises(cli.UserError, match="no usable checkpoint"):
        runs.good_checkpoint(d)


def test_resume_from_truncated_latest_retrains_the_lost_step(two_ckpt_run, tmp_path):
    d = damaged(two_ckpt_run, tmp_path, "truncated_adapter")
    train.main(dataclasses.replace(runs.config_from_run(d, train.TrainConfig), resume=str(d), run_name=""))
    rows = (d / "log.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1"], rows  # step 1 dropped, then trained again
    assert runs.check_checkpoint(d / "ckpt" / "step_000002") is None
    assert (d / "ckpt" / "latest").read_text() == "step_000002"


# ---- the real entry point: exit 2, one stderr line, no traceback, before the model loads


def run_train(args: list[str], **env_kw: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_kw}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "smoke", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_one_line(p: subprocess.Popen, needle: str, label: str) -> None:
    out, err = p.communicate(timeout=600)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 2, f"{label}: exit {p.returncode}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{label}: traceback\n{err[-2000:]}"
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], f"{label}: {lines}"
    assert "loading model" not in err + out, f"{label}: the model started loading"


def test_bad_lr_subprocess(tmp_path):
    check_one_line(run_train(["--lr", "-0.001", *NO_POOL, "--out-dir", str(tmp_path)]), "--lr=-0.001",
                   "bad lr")


def test_every_bad_input_subprocess(tmp_path, two_ckpt_run):
    """Each case through the real entry point, one at a time: exit 2 within a minute on a loaded 2-core box
    (an import of torch + transformers is most of it), one line, no traceback, before the model loads."""
    out = ["--out-dir", str(tmp_path / "runs")]
    all_bad = damaged(two_ckpt_run, tmp_path, "all_bad")
    bad_eval = tmp_path / "heldout.jsonl.gz"
    bad_eval.write_bytes(truncated_gz(tmp_path).read_bytes())
    cases = {
        "mix without pool": (["--teacher-pool-dir", "", "--mix-ratio", "0.5", *out],
                             "--teacher-pool-dir", {}),
        "missing vhack": ([*NO_POOL, "--arm", "erase", "--vhack-path", str(tmp_path / "no.safetensors"),
                           *out], "no.safetensors", {}),
        "wrong-model vhack": ([*NO_POOL, "--arm", "erase", "--vhack-path", str(other_model_vhack(tmp_path)),
                               *out], "model_id='HuggingFaceTB/SmolLM2-135M-Instruct'", {}),
        "corrupt gz": ([*NO_POOL, "--data-path", str(truncated_gz(tmp_path)), *out], "train.jsonl.gz", {}),
        "corrupt eval gz": ([*NO_POOL, "--eval-data-path", str(bad_eval), *out], "--eval-data-path", {}),
        "no sound checkpoint": ([*NO_POOL, "--resume", str(all_bad), "--force-resume"],
                                "no usable checkpoint", {}),
        "hub model offline": ([*NO_POOL, "--model", "Qwen/Qwen3-0.6B", *out],
                              "just download-model Qwen/Qwen3-0.6B",
                              {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}),
        "no such model path": ([*NO_POOL, "--model", "./no/such/model", *out], "no such local path", {}),
    }
    for k, (args, needle, env_kw) in cases.items():
        t0 = time.time()
        check_one_line(run_train(args, **env_kw), needle, k)
        assert time.time() - t0 < 60, f"{k}: {time.time() - t0:.0f} s: something heavy ran before validation"


@pytest.mark.parametrize("how", ["empty_latest", "latest_nowhere"])
def test_resume_with_a_broken_latest_uses_the_newest_sound_step(two_ckpt_run, tmp_path, how):
    d = damaged(two_ckpt_run, tmp_path, how)
    before = (d / "log.tsv").read_text()
    train.main(dataclasses.replace(runs.config_from_run(d, train.TrainConfig), resume=str(d), run_name=""))
    assert (d / "log.tsv").read_text() == before, "resumed from an older step than the newest sound one"


def test_download_model_aliases_match_models():
    sys.path.insert(0, str(ROOT / "scripts"))
    import download_model
    import models

    for k, v in download_model.ALIASES.items():
        assert models.ALIASES[k] == v, f"download_model.ALIASES[{k!r}] != models.ALIASES"
    assert set(download_model.LOCAL) == set(models.ALIASES) - set(download_model.ALIASES)


def test_other_entry_points_refuse_bad_input_before_the_model(tmp_path, monkeypatch):
    """probe_distill.py, extract_vhack_grad.py and scripts/smoke.py: one-line UserErrors naming the flag,
    raised before any model loads (models.load_model would fail the test)."""
    import extract_vhack_grad as ex
    import models
    import probe_distill as pd

    sys.path.insert(0, str(ROOT / "scripts"))
    import smoke

    def no_load(*a, **k):
        raise AssertionError("a model loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", no_load)
    base = dataclasses.replace(pd.PRESETS["smoke"][1], pools_dir=str(tmp_path / "pools"),
                               probes_dir=str(tmp_path / "probes"))
    cases = [
        (lambda: pd.main(dataclasses.replace(base, teacher_only=True,
                                             adapter=str(tmp_path / "no.safetensors"))), "--adapter="),
        (lambda: pd.main(dataclasses.replace(base, teacher_only=True, teacher_hint="nosuch")),
         "--teacher-hint="),
        (lambda: pd.main(dataclasses.replace(base, probe_mixed=True)), "has no step_*.jsonl.gz files"),
        (lambda: pd.main(dataclasses.replace(base, probe_distill=True, dtype="float33")), "--dtype="),
        (lambda: ex.extract(dataclasses.replace(ex.PRESETS["smoke"][1], select="@mode=nosuchmode")),
         "--select='@mode=nosuchmode'"),
        (lambda: ex.extract(dataclasses.replace(ex.PRESETS["smoke"][1], dtype="float33")), "--dtype="),
        (lambda: smoke.main(smoke.SmokeConfig(preset="smolm")), "--preset='smolm'"),
        (lambda: smoke.main(smoke.SmokeConfig(steps=0)), "--steps=0"),
    ]
    for call, needle in cases:
        with pytest.raises(cli.UserError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))
    assert not (tmp_path / "probes").exists(), "a refused probe wrote its output folder"
