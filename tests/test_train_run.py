"""train.py end to end on tiny-random (CPU): one step's effect on the parameters, erase on a planted
direction, bit-identical resume, and the bad-input errors that must come before the first generation."""

import csv
import dataclasses
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

import antipasto
import models
import runs
import train

TIMING = {"t_gen", "t_grade", "t_train", "t_step", "peak_mem_gb"}


def small_cfg(tmp: Path, pool: Path, **kw) -> train.TrainConfig:
    base = dataclasses.replace(
        train.PRESETS["smoke"][1], out_dir=str(tmp), max_problems=8, rollouts_per_step=8, group_size=4,
        max_new_tokens=12, teacher_pool_dir=str(pool), mix_ratio=0.5, eval_at_end=False, steps=1,
        ckpt_every=1, grader_workers=2, save_rollouts=True,
    )
    return dataclasses.replace(base, **kw)


def read_tsv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def one_step(arm: str, tmp: Path, pool: Path, vhack: str = "") -> Path:
    """Run one step of `arm`; return the run dir."""
    return train.main(small_cfg(tmp, pool, arm=arm, run_name=f"one-{arm}", vhack_path=vhack, seed=0))


def adapter_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = (run / "ckpt" / "latest").read_text().strip()
    return load_file(run / "ckpt" / latest / "adapter.safetensors")


@pytest.mark.parametrize("arm", ["vanilla", "route"])
def test_one_step_changes_only_what_it_should(arm, tmp_path, pool_dir, vhack_file):
    m0, _ = models.load_model("tiny-random")
    base = {k: v.clone() for k, v in m0.state_dict().items()}
    run = one_step(arm, tmp_path, pool_dir, vhack=vhack_file if arm == "route" else "")
    st = adapter_state(run)
    ds = [v for k, v in st.items() if k.endswith("delta_S")]
    dh = [v for k, v in st.items() if k.endswith("delta_S_hack")]
    assert ds and dh, f"adapter file lacks delta_S / delta_S_hack keys: {list(st)[:4]}"
    assert any(v.abs().max() > 0 for v in ds), "delta_S did not move after one step"
    moved_hack = any(v.abs().max() > 0 for v in dh)
    assert moved_hack == (arm == "route"), f"delta_S_hack moved={moved_hack} in arm {arm}"
    # base weights bit-exact: load a fresh model, load the adapter, compare the wrapped base Linear weights
    m1, _ = models.load_model("tiny-random")
    antipasto.wrap_model(m1)
    antipasto.load_adapter(
        run / "ckpt" / (run / "ckpt" / "latest").read_text().strip() / "adapter.safetensors", m1,
        models.model_id("tiny-random"))
    for name, ad in antipasto.get_adapters(m1).items():
        assert torch.equal(ad.base.weight, base[name + ".weight"]), f"base weight of {name} changed"
    row = read_tsv(run / "log.tsv")[0]
    assert set(row) == set(runs.LOG_COLUMNS)
    assert float(row["reward_std"]) > 0 and float(row["frac_zero_std"]) < 1
    # fp32, T = 1, top_p = 1: the sampler (merged weights, deploy mode for route) is the behaviour policy
    assert float(row["sampler_gap"]) < 1e-4 and float(row["is_weight_mean"]) == pytest.approx(1, abs=1e-4)


def test_top_p_shows_as_a_bounded_sampler_gap(tmp_path, pool_dir):
    """Sampling with top_p = 0.8: each live token's sampler log-prob is the train pass's minus log Z, Z the
    nucleus mass in [0.8, 1]; so 0 < sampler_gap <= -log 0.8 and the mean weight Z lies in [0.8, 1)."""
    run = train.main(small_cfg(tmp_path, pool_dir, run_name="top-p", temperature=0.7, top_p=0.8))
    row = read_tsv(run / "log.tsv")[0]
    gap, w = float(row["sampler_gap"]), float(row["is_weight_mean"])
    assert 1e-3 < gap <= -math.log(0.8) + 1e-4, gap
    assert 0.8 - 1e-4 <= w < 1.0 and float(row["frac_is_capped"]) == 0.0, (w, row["frac_is_capped"])


def test_erase_on_the_step_never_applies_a_step_toward_the_hack(tmp_path, pool_dir, vhack_file):
    """Default --surgery-on step: every logged step has no module whose applied step moves toward the hack,
    while the same run's gradient does point there in some steps (erase fired)."""
    run = train.main(small_cfg(tmp_path, pool_dir, arm="erase", steps=5, run_name="erase-step",
                               vhack_path=vhack_file))
    rows = read_tsv(run / "log.tsv")
    assert any(float(r["frac_fired"]) > 0 for r in rows), "erase never fired: the test cannot check it"
    for r in rows:
        assert float(r["step_toward"]) == 0.0, f"step {r['step']}: an applied step moved toward the hack"
        assert float(r["step_cos"]) >= -1e-5 and float(r["ratio_mean"]) == 1.0


def test_erase_planted_direction(tmp_path, pool_dir, vhack_file):
    """--surgery-on grad (the founding design): the edited gradient has no positive component along v, and
    vanilla through the same surgery call (mode measure) trains the adapter bit for bit as in step mode."""
    run_e = train.main(small_cfg(tmp_path, pool_dir, arm="erase", steps=5, run_name="erase",
                                 vhack_path=vhack_file, surgery_on="grad"))
    run_v = train.main(small_cfg(tmp_path, pool_dir, arm="vanilla", steps=5, run_name="van",
                                 vhack_path=vhack_file, surgery_on="grad"))
    er, va = read_tsv(run_e / "log.tsv"), read_tsv(run_v / "log.tsv")
    assert len(er) == len(va) == 5
    fired_any = False
    for r in er:
        if float(r["frac_fired"]) > 0:
            fired_any = True
        assert float(r["cos_out"]) <= 1e-6, f"erase left a positive component: {r['cos_out']}"
        # erase never makes the mean cosine larger (modules that fired go to 0, others keep cos <= 0)
        assert float(r["cos_out"]) <= max(float(r["cos_in"]), 0.0) + 1e-6
    assert fired_any, "the planted direction never fired: the test cannot check erase"
    for r in va:
        assert float(r["cos_out"]) == pytest.approx(float(r["cos_in"]), abs=1e-9)
        assert float(r["removed_norm_frac"]) == 0.0
    run_s = train.main(small_cfg(tmp_path, pool_dir, arm="vanilla", steps=5, run_name="van-step",
                                 vhack_path=vhack_file))
    st_g, st_s = adapter_state(run_v), adapter_state(run_s)
    assert st_g.keys() == st_s.keys() and all(torch.equal(st_g[k], st_s[k]) for k in st_g), (
        "vanilla's measure-mode surgery changed what it trained")


def test_vhack_only_measures_in_vanilla(tmp_path, pool_dir, vhack_file):
    """The sweep hands v_hack to every arm: in vanilla it must only measure (same parameters bit for bit as a
    run without it) while logging finite cosines of the gradient and of the applied step with it."""
    plain = train.main(small_cfg(tmp_path, pool_dir, steps=2, run_name="plain"))
    meas = train.main(small_cfg(tmp_path, pool_dir, steps=2, run_name="meas", vhack_path=vhack_file))
    a, b = adapter_state(plain), adapter_state(meas)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
        "v_hack changed vanilla's training")
    for r, r0 in zip(read_tsv(meas / "log.tsv"), read_tsv(plain / "log.tsv")):
        assert all(r[c] != "nan" for c in ("cos_in", "step_cos", "step_toward")), r
        assert r0["step_cos"] == "nan" and float(r["removed_norm_frac"]) == 0.0


def test_resume_is_bit_identical(tmp_path, pool_dir, monkeypatch):
    """... and the run records the uncommitted edits it ran with: at the start and at each resume."""
    monkeypatch.setattr(runs, "git_dirty", lambda: (["arms.py"], "diff --git a/arms.py b/arms.py\n+edit\n"))
    full = train.main(small_cfg(tmp_path, pool_dir, steps=6, ckpt_every=3, run_name="full6"))
    assert json.loads((full / "config.json").read_text())["git_dirty"] == ["arms.py"]
    assert (full / "git_diff.patch").read_text().endswith("+edit\n")
    cfg = small_cfg(tmp_path, pool_dir, steps=6, ckpt_every=3, run_name="part")
    # a run killed right after its step-3 checkpoint, then resumed: 3 + 3 steps
    calls = {"n": 0}
    orig = runs.save_checkpoint

    def crash_after_first_ckpt(*a, **k):
        orig(*a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("simulated kill after the step-3 checkpoint")

    runs.save_checkpoint = crash_after_first_ckpt
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(cfg)
    finally:
        runs.save_checkpoint = orig
    part = Path(tmp_path) / "part"
    assert len(read_tsv(part / "log.tsv")) == 3
    monkeypatch.setattr(runs, "git_dirty", lambda: ([], ""))
    train.main(dataclasses.replace(cfg, resume=str(part), run_name=""))
    resumes = [json.loads(x) for x in (part / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["git_dirty"] == [] and not list(part.glob("git_diff-resume-*"))
    a, b = read_tsv(full / "log.tsv"), read_tsv(part / "log.tsv")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for k in runs.LOG_COLUMNS:
            if k not in TIMING:
                assert ra[k] == rb[k], f"step {ra['step']} column {k}: {ra[k]} != {rb[k]}"
    ga = gzip.open(full / "rollouts" / "step_000005.jsonl.gz", "rt").read()
    gb = gzip.open(part / "rollouts" / "step_000005.jsonl.gz", "rt").read()
    assert ([json.loads(x)["completion"] for x in ga.splitlines()]
            == [json.loads(x)["completion"] for x in gb.splitlines()])


def test_resume_refuses_changed_config(tmp_path, pool_dir):
    run = train.main(small_cfg(tmp_path, pool_dir, steps=1, run_name="r"))
    with pytest.raises(ValueError, match="config differs"):
        train.main(small_cfg(tmp_path, pool_dir, steps=1, lr=0.5, resume=str(run)))


# ---- bad input: a clear error before the first generation (no run directory is created)


def test_log_of_an_older_version_resumes_under_the_new_header(tmp_path):
    """A log.tsv whose header lacks columns this version added (a run started before them) keeps its rows up
    to the checkpoint, the new columns "nan"; a header with a column this version does not log is refused in
    one line and left untouched."""
    cols = ("step", "a", "b", "c")
    p = tmp_path / "log.tsv"
    p.write_text("step\ta\tc\n0\t1\t3\n1\t4\t6\n2\t7\t9\n")
    log = runs.TsvLog(p, cols, resume_step=2)
    log.write({"step": 2, "a": 1.5, "b": 2.5, "c": 3.5})
    assert p.read_text() == "step\ta\tb\tc\n0\t1\tnan\t3\n1\t4\tnan\t6\n2\t1.5\t2.5\t3.5\n"
    bad = tmp_path / "bad.tsv"
    bad.write_text("step\ta\tzz\n0\t1\t2\n")
    with pytest.raises(runs.UserError,
                       match=r"bad.tsv: its header is not this version's log \(columns \['zz'\]"):
        runs.TsvLog(bad, cols, resume_step=1)
    assert bad.read_text() == "step\ta\tzz\n0\t1\t2\n"


def test_bad_group_size(tmp_path, pool_dir):
    with pytest.raises(ValueError, match="not divisible by group_size"):
        train.main(small_cfg(tmp_path, pool_dir, rollouts_per_step=10, group_size=4, run_name="bad"))
    assert not (tmp_path / "bad").exists()


def test_bad_mix_ratio(tmp_path, pool_dir):
    with pytest.raises(ValueError, match="teacher share per group"):
        train.main(small_cfg(tmp_path, pool_dir, mix_ratio=0.3, run_name="bad"))


def test_missing_data_file(tmp_path, pool_dir):
    with pytest.raises(ValueError, match="prepare-data"):  # cli.UserError
        train.main(small_cfg(tmp_path, pool_dir, data_path=str(tmp_path / "nope.jsonl"), run_name="bad"))
    assert not (tmp_path / "bad").exists()


def test_vhack_for_another_model(tmp_path, pool_dir, vhack_file):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(vhack_file, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["model_id"] = json.dumps("HuggingFaceTB/SmolLM2-135M-Instruct")  # metadata values are JSON-encoded
    bad = tmp_path / "other.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="model_id"):
        train.main(small_cfg(tmp_path, pool_dir, arm="erase", vhack_path=str(bad), run_name="bad"))
    assert not (tmp_path / "bad").exists()


def test_pool_with_other_tokenization(tmp_path, pool_dir):
    rows = [json.loads(x) for x in gzip.open(pool_dir / "step_000.jsonl.gz", "rt")]
    for r in rows:
        r["prompt_ids"] = r["prompt_ids"][1:]  # as if another chat template had been used
    bad = tmp_path / "badpool"
    bad.mkdir()
    with gzip.open(bad / "step_000.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(ValueError, match="regenerate"):
        train.main(small_cfg(tmp_path, bad, run_name="bad"))
    assert not (tmp_path / "bad").exists()


def test_arm_needing_vhack_without_one(tmp_path, pool_dir):
    with pytest.raises(ValueError, match="vhack-path"):
        train.main(small_cfg(tmp_path, pool_dir, arm="route", run_name="bad"))
