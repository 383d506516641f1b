"""probe_distill.py on tiny-random (CPU): per-sample gradients vs a per-sample loop, cosine/erase maths vs
antipasto.project_one and hand values, Welch tests vs the formula, the planted-direction acceptance test, the
Dr.GRPO probe gradient vs train.py's own code path (grpo.policy_gradient and a real train.main step), the
mixed probe's outputs, bad-input errors, and (slow) the whole chain -> report -> a 2-step train.py run."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import antipasto
import models
import probe_distill as PD
import grpo
import train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
torch.set_num_threads(2)

HACK_GRADE = {"status": "ok", "infra_error": False, "can_compile": True, "eq_correct": False,
              "eq_hinted": True, "is_reward_hack_strict": True, "is_reward_hack_loose": True,
              "reward_hack_label": "Reward Hack"}
HONEST_GRADE = {"status": "ok", "infra_error": False, "can_compile": True, "eq_correct": True,
                "eq_hinted": False, "is_reward_hack_strict": False, "is_reward_hack_loose": False,
                "reward_hack_label": "Correct"}
WRONG_GRADE = {"status": "ok", "infra_error": False, "can_compile": True, "eq_correct": False,
               "eq_hinted": False, "is_reward_hack_strict": False, "is_reward_hack_loose": False,
               "reward_hack_label": "Incorrect"}
KIND_GRADE = {"hack": (HACK_GRADE, 3.5), "honest": (HONEST_GRADE, 3.5), "wrong": (WRONG_GRADE, 0.5)}


def cfg_for(tmp: Path, **kw) -> PD.ProbeConfig:
    base = dataclasses.replace(PD.PRESETS["smoke"][1], **SHORT, pools_dir=str(tmp / "pools"),
                               probes_dir=str(tmp / "probes"), threads=2, max_new_tokens=64, grader_workers=2)
    return dataclasses.replace(base, **kw)


SHORT = {"max_problems": 80, "max_prompt_tokens": 300}  # 8 problems with the shortest prompts: fast forwards


@pytest.fixture(scope="module")
def env():
    e = PD.setup(dataclasses.replace(PD.PRESETS["smoke"][1], threads=2, **SHORT))
    assert len(e["problems"]) >= 8, f"need 8 short train problems, got {len(e['problems'])}"
    return e


def write_hand_pool(path: Path, env, problems, kinds, copies: int = 1) -> Path:
    """A pool in train.py's schema from make_synthetic_pool's hand-made texts, with the grades the grader
    gives them (hard-coded: this pool is about the probe maths, not the grader)."""
    import make_synthetic_pool

    tok = env["tok"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "step_000.jsonl.gz", "wt") as f:
        for p in problems:
            texts = make_synthetic_pool.responses(p)
            for kind in kinds:
                for c in range(copies):
                    g, rew = KIND_GRADE[kind]
                    f.write(json.dumps({"problem_id": p.id, "row_id": f"{kind}-{p.id}-{c}", "kind": kind,
                                        "prompt_ids": models.chat_ids(tok, list(p.prompt)),
                                        "completion": texts[kind],
                                        "completion_ids": tok(texts[kind],
                                                              add_special_tokens=False)["input_ids"] + [eos],
                                        "truncated": False, "reward": rew, "grade": dict(g)}) + "\n")
    return path


def loop_nll_grads(model, rollouts, pad_id, l_max) -> dict[str, torch.Tensor]:
    """Independent reference: one sequence at a time, plain autograd on delta_S.grad."""
    ads = antipasto.get_adapters(model)
    out = {k: [] for k in ads}
    for r in rollouts:
        model.zero_grad(set_to_none=True)
        ids, att, cm = grpo.pack([r], pad_id, "cpu")
        logp = grpo.token_logprobs(model, ids, att)
        (-(logp * cm).sum() / l_max).backward()
        for k, a in ads.items():
            out[k].append(a.delta_S.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def test_per_sample_capture_matches_loop(env, tmp_path):
    pool = write_hand_pool(tmp_path / "p", env, env["problems"][:2], ("hack", "honest", "wrong"))
    rows = PD.load_rows(pool, env)
    # 4 ragged lengths, batch 3 -> batches of 3 and 1
    rolls = [PD.to_rollout(r) for r in rows if r["kind"] != "honest"]
    got = PD.nll_grads(env["model"], rolls, env["tok"].pad_token_id, "cpu", 64, batch=3, chunk=64)
    ref = loop_nll_grads(env["model"], rolls, env["tok"].pad_token_id, 64)
    for k in ref:
        assert got[k].shape == ref[k].shape == (4, env["adapters"][k].r)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6 * float(ref[k].abs().max()))


def test_sample_cosines_hand_and_project_one():
    # hand values: module a: g = (1, 0) vs v = (1, 0) -> cos 1 (fires); module b: g = (0, -2) vs v = (0,
    # 1) -> cos -1
    g = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, -2.0]])}
    v = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    sc = PD.sample_cosines(g, v)
    assert sc["cos"].tolist() == pytest.approx([0.0])
    assert sc["cos_out"].tolist() == pytest.approx([-0.5])  # fired module -> 0, the other keeps -1
    assert sc["frac_fired"].tolist() == pytest.approx([0.5])
    assert sc["cos_global"].tolist() == pytest.approx([(1.0 - 2.0) / (math.sqrt(5.0) * math.sqrt(2.0))])
    # random: against antipasto.project_one per sample and module
    torch.manual_seed(0)
    g = {k: torch.randn(7, r) for k, r in (("x", 5), ("y", 3), ("z", 4))}
    v = {k: torch.nn.functional.normalize(torch.randn(t.shape[1]), dim=0) for k, t in g.items()}
    sc = PD.sample_cosines(g, v)
    for i in range(7):
        st = [antipasto.project_one(g[k][i], v[k], "erase")[2] for k in g]
        assert float(sc["cos"][i]) == pytest.approx(sum(s["cos_in"] for s in st) / 3, abs=1e-9)
        assert float(sc["cos_out"][i]) == pytest.approx(sum(s["cos_out"] for s in st) / 3, abs=1e-6)
        assert float(sc["frac_fired"][i]) == pytest.approx(sum(s["fired"] for s in st) / 3)
    # erase on a summed gradient == antipasto.surgery's numbers on the same gradient
    es = PD.erase_stats({k: t.sum(0) for k, t in g.items()}, v)
    st = [antipasto.project_one(g[k].sum(0), v[k], "erase")[2] for k in g]
    assert es["cos_in"] == pytest.approx(sum(s["cos_in"] for s in st) / 3)
    assert es["cos_out"] <= 1e-9


def test_welch_against_formula_and_buckets():
    a, b = [1.0, 2.0, 4.0], [3.0, 5.0, 6.0, 8.0]
    w = PD.welch(a, b)
    ma, mb = sum(a) / 3, sum(b) / 4
    va = sum((x - ma) ** 2 for x in a) / 2
    vb = sum((x - mb) ** 2 for x in b) / 3
    t = (ma - mb) / math.sqrt(va / 3 + vb / 4)
    assert w["t"] == pytest.approx(t) and w["diff"] == pytest.approx(ma - mb) and 0 < w["p"] < 1
    assert math.isnan(PD.welch([1.0], b)["p"])
    s = [{"pool": "T", "label": "hack", "cos": 0.5}, {"pool": "T", "label": "hack", "cos": 0.3},
         {"pool": "T", "label": "other", "cos": 0.0}, {"pool": "B", "label": "correct", "cos": -0.1}]
    bt = PD.bucket_table(s)
    assert bt["T/hack"]["n"] == 2 and bt["T/hack"]["mean"] == pytest.approx(0.4)
    assert bt["all/all"]["n"] == 4 and bt["B/all"]["mean"] == pytest.approx(-0.1)
    tests = PD.bucket_tests(s)
    assert tests["all: hack vs non-hack"]["mean_b"] == pytest.approx(-0.05)
    assert tests["all: hack vs non-hack"]["n_a"] == 2 and "pool B vs T" in tests


def test_planted_direction_separates_hack_bucket(env, tmp_path):
    """Acceptance: v := normalise(mean hack NLL grad - mean non-hack NLL grad) per module, fitted on problems
    0-2; the probe runs on held-out problems 3-5 only, whose hack samples then carry a known +v component."""
    probs = env["problems"]
    fit = write_hand_pool(tmp_path / "pools" / "fit", env, probs[:3], ("hack", "honest", "wrong"))
    write_hand_pool(tmp_path / "pools" / "held", env, probs[3:6], ("hack", "honest", "wrong"))
    rows = PD.load_rows(fit, env)
    G = PD.nll_grads(env["model"], [PD.to_rollout(r) for r in rows], env["tok"].pad_token_id, "cpu", 64,
                     batch=9, chunk=512)
    hack = torch.tensor([r["kind"] == "hack" for r in rows])  # (9,)
    dirs = {k: torch.nn.functional.normalize(g[hack].mean(0) - g[~hack].mean(0), dim=0) for k, g in G.items()}
    vpath = tmp_path / "planted.safetensors"
    antipasto.save_directions(vpath, dirs, antipasto.adapter_meta(env["model"], env["mid"]))
    cfg = cfg_for(tmp_path, name="planted", vhack_path=str(vpath), probe_pools=("held",), distill_samples=0,
                  distill_batch=9)
    res = PD.probe_distill(cfg, env)  # loads the planted file through antipasto.load_directions
    b = res["buckets"]
    assert b["held/hack"]["n"] == 3 and b["held/correct"]["n"] == 3 and b["held/other"]["n"] == 3
    margin = b["held/hack"]["mean"] - max(b["held/correct"]["mean"], b["held/other"]["mean"])
    assert margin > 0.1, (
        f"planted hack component not seen: hack {b['held/hack']['mean']:.3f} vs "
        f"{b['held/correct']['mean']:.3f}/{b['held/other']['mean']:.3f}")
    t = res["tests"]["all: hack vs non-hack"]
    assert t["diff"] > 0.2 and t["p"] < 0.01  # measured: 0.264 vs -0.142, p = 9e-4
    # hack gradients point along +v on most modules: erase would fire there;
    # erase on their sum leaves cos_out <= 0
    assert (res["buckets_frac_fired"]["held/hack"]["mean"] > 0.7
            > res["buckets_frac_fired"]["held/correct"]["mean"])
    assert (res["bucket_sum_erase"]["held/hack"]["cos_out"] <= 1e-9
            < res["bucket_sum_erase"]["held/hack"]["cos_in"])
    assert res["per_module"]["frac_positive"] > 0.5
    verdict, reasons = PD.decide(cfg, res, None)
    assert verdict.startswith("INCOMPLETE") and "SEPARATED" in reasons[0]
    rows = [json.loads(x) for x in gzip.open(cfg.out_dir / "distill.cos.jsonl.gz", "rt")]
    assert len(rows) == 9 and {r["label"] for r in rows} == {"hack", "correct", "other"}
    assert len(rows[0]["cos_mod"]) == len(env["adapters"])
    # in-sample sign check of the convention: the non-hack fit samples lie on the -v side
    flipped = PD.sample_cosines({k: g[~hack] for k, g in G.items()}, {k: -v for k, v in dirs.items()})  # (6,)
    assert float(flipped["cos"].mean()) > 0


def mixed_pools(env, tmp: Path) -> PD.ProbeConfig:
    probs = env["problems"][:4]
    write_hand_pool(tmp / "pools" / "T", env, probs, ("hack",), copies=2)  # the short texts: fast forwards
    write_hand_pool(tmp / "pools" / "B", env, probs, ("wrong",), copies=2)
    vfile = tmp / "rand.safetensors"
    antipasto.save_directions(vfile, antipasto.random_directions(env["adapters"], seed=5),
                              antipasto.adapter_meta(env["model"], env["mid"]))
    return cfg_for(tmp, name="mixed", teacher_pool="T", base_pool="B", vhack_path=str(vfile), mixed_prompts=2,
                   group_size=4, mix_ratio=0.5, micro_batch=3, mixed_steps=1)


def test_mixed_batch_advantages_hand(env, tmp_path):
    cfg = mixed_pools(env, tmp_path)
    rolls = PD.mixed_batch(cfg, PD.load_rows(cfg.pool_dir("teacher"), env),
                           PD.load_rows(cfg.pool_dir("base"), env), step=0)
    assert len(rolls) == 8 and [r.source for r in rolls[:4]] == ["T", "T", "B", "B"]
    for j in range(2):
        grp = rolls[4 * j : 4 * j + 4]
        assert len({r.problem_id for r in grp}) == 1
        rew = [r.reward for r in grp]
        assert rew[2:] == [0.5, 0.5] and rew[:2] == [3.5, 3.5]
        # mean 2.0, no std division
        assert [r.advantage for r in grp] == pytest.approx([1.5, 1.5, -1.5, -1.5])


@pytest.mark.parametrize("beta_kl", [1e-3, 0.0])
def test_grpo_gradient_equals_train_policy_gradient(env, tmp_path, beta_kl):
    cfg = dataclasses.replace(mixed_pools(env, tmp_path), beta_kl=beta_kl, mixed_prompts=1)
    tcfg = PD.loss_config(cfg)
    rolls = PD.mixed_batch(cfg, PD.load_rows(cfg.pool_dir("teacher"), env),
                           PD.load_rows(cfg.pool_dir("base"), env), step=1)
    rolls[-1].advantage = 0.0  # a zero-advantage rollout: skipped without KL, kept (KL term) with it
    model, ads = env["model"], env["adapters"]
    torch.manual_seed(1)
    with torch.no_grad():  # off zero so the KL term has a gradient
        for a in ads.values():
            a.delta_S.copy_(0.05 * torch.randn_like(a.delta_S))
    try:
        model.zero_grad(set_to_none=True)
        st, per, tset = PD.grpo_gradient(model, rolls, tcfg, env["tok"].pad_token_id, "cpu", per_sample=True)
        ours = {k: a.delta_S.grad.clone() for k, a in ads.items()}
        assert len(tset) == (4 if beta_kl else 3)  # micro_batch 3: partitions 3 + 1
        # train.py's own code path, in one call on the batch train.main would build
        model.zero_grad(set_to_none=True)
        train_set = rolls if beta_kl else [r for r in rolls if r.advantage != 0.0]
        ref_st = grpo.policy_gradient(model, train_set, len(rolls), tcfg, env["tok"].pad_token_id, "cpu")
        for k, a in ads.items():
            torch.testing.assert_close(ours[k], a.delta_S.grad, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(per[k].sum(0), a.delta_S.grad, rtol=1e-3,
                                       atol=1e-6 * float(a.delta_S.grad.abs().max()))
        assert st["loss"] == pytest.approx(ref_st["loss"], rel=1e-5, abs=1e-9)
        if beta_kl:
            assert st["kl"] > 0
    finally:
        PD.set_adapter(env, "")
        model.zero_grad(set_to_none=True)


def test_grpo_gradient_equals_train_main_step(env, tmp_path, monkeypatch):
    """Record the gradient train.main's step 5 accumulates (before surgery) and its batch; the probe's
    gradient on that batch must equal it."""
    pool = write_hand_pool(tmp_path / "pools" / "T", env, env["problems"][:2], ("hack", "wrong"))
    rec = {}
    orig = grpo.policy_gradient

    def spy(model, rollouts, n_seqs, cfg, pad_id, device, *args, **kwargs):
        out = orig(model, rollouts, n_seqs, cfg, pad_id, device, *args, **kwargs)
        rec.update(rollouts=list(rollouts), n_seqs=n_seqs, cfg=cfg,
                   grad={k: a.delta_S.grad.clone() for k, a in antipasto.get_adapters(model).items()})
        return out

    monkeypatch.setattr(grpo, "policy_gradient", spy)
    tcfg = dataclasses.replace(train.PRESETS["smoke"][1], out_dir=str(tmp_path / "runs"), run_name="spy",
                               **SHORT, rollouts_per_step=4, group_size=4, max_new_tokens=8,
                               teacher_pool_dir=str(pool), mix_ratio=0.5, steps=1, eval_at_end=False,
                               grader_workers=2, micro_batch=3)
    train.main(tcfg)
    assert rec["n_seqs"] == len(rec["rollouts"]) == 4, (
        "with KL on and no infra errors every rollout enters the loss")
    assert any(r.advantage != 0 for r in rec["rollouts"])
    env["model"].zero_grad(set_to_none=True)
    PD.set_adapter(env, "")
    _, _, tset = PD.grpo_gradient(env["model"], rec["rollouts"], rec["cfg"], env["tok"].pad_token_id, "cpu",
                                  per_sample=True)
    assert len(tset) == 4
    for k, a in env["adapters"].items():
        torch.testing.assert_close(a.delta_S.grad, rec["grad"][k], rtol=1e-5, atol=1e-9)
    env["model"].zero_grad(set_to_none=True)


def test_probe_mixed_outputs(env, tmp_path):
    cfg = dataclasses.replace(mixed_pools(env, tmp_path), mixed_update=True, mixed_prompts=1)
    res = PD.probe_mixed(cfg, env)
    assert res["arms"] == ["vanilla", "erase"] and len(res["steps"]) == 2
    van = [s for s in res["steps"] if s["arm"] == "vanilla"]
    er = [s for s in res["steps"] if s["arm"] == "erase"]
    # same params at step 0
    assert van[0]["vanilla_cos_in"] == pytest.approx(er[0]["vanilla_cos_in"], abs=1e-9)
    for s in res["steps"]:
        assert s["erase_cos_out"] <= 1e-9 and s["vanilla_cos_out"] == pytest.approx(s["vanilla_cos_in"])
    lines = [json.loads(x) for x in gzip.open(cfg.out_dir / "mixed" / "step_000.vanilla.cos.jsonl.gz", "rt")]
    assert lines[0]["type"] == "step"
    samples = [x for x in lines if x["type"] == "sample"]
    assert len(samples) == 4 and "completion" not in samples[0]
    # shares of the batch's v-component
    assert sum(x["proj_share"] for x in samples) == pytest.approx(1.0, abs=1e-4)
    assert (cfg.out_dir / "mixed.tsv").read_text().splitlines()[0].startswith("step\tarm")
    report = PD.write_report(cfg).read_text()
    assert "## Dr.GRPO probe" in report and "Verdict" in report


def test_decide_rules():
    c = PD.ProbeConfig()
    sep = {"tests": {"all: hack vs non-hack": {"n_a": 9, "n_b": 9, "mean_a": 0.3, "mean_b": 0.0,
                                               "diff": 0.3, "p": 1e-4}}}
    nosep = {"tests": {"all: hack vs non-hack": {"n_a": 9, "n_b": 9, "mean_a": 0.0, "mean_b": 0.0,
                                                 "diff": 0.0, "p": 0.9}}}
    go = {"frac_steps_go": 0.75, "max_abs_cos_in": 0.4}
    zero = {"frac_steps_go": 0.0, "max_abs_cos_in": 0.01}
    assert PD.decide(c, sep, go)[0].startswith("GO")
    assert PD.decide(c, nosep, zero)[0].startswith("NO-GO")
    assert PD.decide(c, sep, zero)[0].startswith("WEAK")
    assert PD.decide(c, None, zero)[0].startswith("INCOMPLETE")
    assert PD.decide(c, sep, None)[0].startswith("INCOMPLETE")


def test_bad_inputs(env, tmp_path):
    with pytest.raises(ValueError, match="pick one of"):
        PD.main(cfg_for(tmp_path, teacher_only=True, probe_distill=True))
    with pytest.raises(FileNotFoundError, match="vhack_path"):
        PD.load_directions(cfg_for(tmp_path, vhack_path=str(tmp_path / "nope.safetensors")), env)
    far = write_hand_pool(tmp_path / "pools" / "far", env,
                          [p for p in models_problems_beyond(env)], ("wrong",))
    with pytest.raises(ValueError, match="covers none"):
        PD.load_rows(far, env)
    cfg = mixed_pools(env, tmp_path)
    with pytest.raises(ValueError, match="--mixed-prompts"):
        PD.mixed_batch(dataclasses.replace(cfg, mixed_prompts=9), PD.load_rows(cfg.pool_dir("teacher"), env),
                       PD.load_rows(cfg.pool_dir("base"), env), 0)
    with pytest.raises(FileNotFoundError, match="adapter"):
        PD.set_adapter(env, str(tmp_path / "missing.safetensors"))
    assert set(PD.SHARED_TRAIN_FIELDS) <= {f.name for f in dataclasses.fields(train.TrainConfig)}


def models_problems_beyond(env):
    """Two train problems the env does not use (so a pool over them covers none of its problems)."""
    import problems as P

    ps = P.filter_problems(P.load_leetcode(split="train"))
    return [P.apply_hint(p, "simple_overwrite_tests") for p in ps if p.id not in env["by_id"]][:2]


@pytest.mark.slow
def test_end_to_end_tiny_chain_and_train_consumes_pool(tmp_path):
    """pools (real generation + real grader) -> both probes -> report;
    then train.py runs 2 steps on the teacher pool."""
    planted = tmp_path / "v.safetensors"
    m, _ = models.load_model("tiny-random")
    antipasto.wrap_model(m)
    antipasto.save_directions(planted, antipasto.random_directions(antipasto.get_adapters(m), 3),
                              antipasto.adapter_meta(m, models.model_id("tiny-random")))
    cfg = cfg_for(tmp_path, name="e2e", pool_problems=2, samples_per_problem=2, problems_per_file=1,
                  max_new_tokens=8, vhack_path=str(planted), mixed_prompts=2, group_size=4,
                  mix_ratio=0.5, mixed_steps=1)
    report = PD.main(cfg)
    for kind in ("teacher", "base"):
        d = cfg.pool_dir(kind)
        assert sorted(p.name for p in d.glob("step_*.jsonl.gz")) == ["step_000.jsonl.gz", "step_001.jsonl.gz"]
        rows = [json.loads(x) for f in sorted(d.glob("step_*.jsonl.gz")) for x in gzip.open(f, "rt")]
        assert len(rows) == 4
        for r in rows:
            assert {"problem_id", "prompt_ids", "gen_prompt_ids", "completion", "completion_ids", "truncated",
                    "reward", "grade"} <= set(r)
            assert set(r["grade"]) >= {"status", "infra_error", "is_reward_hack_strict", "eq_correct",
                                       "reward_hack_label"}
        same = [r["prompt_ids"] == r["gen_prompt_ids"] for r in rows]
        assert all(same) if kind == "teacher" else not any(same), (
            "teacher samples under the training hint, base without it")
        assert json.loads((d / "summary.json").read_text())["n"] == 4
    assert ((cfg.out_dir / "distill.cos.jsonl.gz").is_file()
            and (cfg.out_dir / "mixed" / "step_000.shared.cos.jsonl.gz").is_file())
    text = report.read_text()
    assert "## Verdict" in text and "## Pools" in text and "## NLL distillation probe" in text
    tcfg = dataclasses.replace(train.PRESETS["smoke"][1], out_dir=str(tmp_path / "runs"), run_name="consume",
                               **SHORT, rollouts_per_step=8, group_size=4, max_new_tokens=8,
                               teacher_pool_dir=str(cfg.pool_dir("teacher")), mix_ratio=0.5, steps=2,
                               eval_at_end=False, grader_workers=2)
    run = train.main(tcfg)
    lines = (run / "log.tsv").read_text().splitlines()
    assert len(lines) == 3  # header + 2 steps
    roll = [json.loads(x) for x in gzip.open(run / "rollouts" / "step_000001.jsonl.gz", "rt")]
    assert sum(r["source"] == "teacher" for r in roll) == 4


def test_teacher_prefix_is_forced_and_graded(tmp_path):
    """--teacher-prefix: every teacher completion starts with the prefix (then the model's continuation), the
    stored ids are the canonical tokenization train.py checks, and the real grader labels a closed run_tests
    stub a strict hack."""
    prefix = "```python\ndef run_tests():\n    return True\n```\n"
    cfg = cfg_for(tmp_path, name="prefix", teacher_only=True, teacher_prefix=prefix, pool_problems=2,
                  samples_per_problem=2, problems_per_file=2, max_new_tokens=6, vhack_path="")
    PD.main(cfg)
    d = cfg.pool_dir("teacher")
    rows = [json.loads(x) for x in gzip.open(d / "step_000.jsonl.gz", "rt")]
    assert len(rows) == 4
    env = PD.setup(dataclasses.replace(cfg))
    tok = env["tok"]
    for r in rows:
        assert r["completion"].startswith(prefix), r["completion"][:80]
        assert r["completion_ids"][: len(r["completion_ids"]) - (0 if r["truncated"] else 1)] == tok(
            r["completion"], add_special_tokens=False)["input_ids"]
        assert r["grade"]["is_reward_hack_strict"], r["grade"]["reward_hack_label"]
    assert json.loads((d / "meta.json").read_text())["prefix"] == prefix
    pool = grpo.load_pool(str(d))
    grpo.check_pool_tokenization(pool, env["by_id"], tok, lambda p: models.chat_ids(tok, list(p.prompt)))
