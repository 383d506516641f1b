"""The two-pool teacher mix (hack teacher + solve teacher, exact rows per group) and the solve pool's builder:
exact counts over many steps, the pools' intersection, refusal before the model loads, advantages over the
whole mixed group (recomputed by hand from the saved rollouts), per-source log columns, and the solve pool's
no-cheat rule (poisoned hack labels give the same pool)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import zlib
from pathlib import Path

import pytest
import torch

import grpo
import probe_distill as PD
import train
from cli import UserError
from test_train_run import read_tsv, small_cfg


def fake_pool(ids_counts: dict[int, int], tag: str) -> dict[int, list[dict]]:
    return {pid: [{"row_id": f"{tag}-{pid}-{i}", "grade": {"infra_error": False}} for i in range(n)]
            for pid, n in ids_counts.items()}


def test_exact_counts_every_group_every_step():
    hack = fake_pool({pid: 3 + pid % 4 for pid in range(20)}, "h")
    solve = fake_pool({pid: 2 + pid % 3 for pid in range(20)}, "s")
    pools = [("teacher", hack, 2), ("solve", solve, 2)]
    seen = set()
    for step in range(60):
        for pid in range(20):
            rows = grpo.teacher_rows(pools, seed=3, step=step, problem_id=pid)
            srcs = [s for s, _ in rows]
            assert srcs == ["teacher", "teacher", "solve", "solve"], (step, pid, srcs)  # never varies
            ids = [r["row_id"] for _, r in rows]
            assert len(set(ids)) == 4, f"drawn without replacement: {ids}"
            assert all(i.startswith("h-") for i in ids[:2]) and all(i.startswith("s-") for i in ids[2:])
            seen.update(ids)
    assert len(seen) == sum(map(len, hack.values())) + sum(map(len, solve.values())), (
        "every row gets drawn over 60 steps")
    # a pure function of (seed, step, problem): a resumed run draws the same rows
    assert grpo.teacher_rows(pools, 3, 7, 5) == grpo.teacher_rows(pools, 3, 7, 5)


def test_coverage_is_the_intersection_with_enough_rows():
    hack = fake_pool({1: 2, 2: 2, 3: 2, 4: 1, 5: 2}, "h")  # 4 has too few hack rows
    solve = fake_pool({2: 1, 3: 3, 4: 1, 5: 1, 6: 4}, "s")  # 1 has no solve rows; 6 no hack rows
    pools = [("teacher", hack, 2), ("solve", solve, 1)]
    assert grpo.covered_ids(pools, [6, 5, 4, 3, 2, 1], n_prompts=3) == [5, 3, 2]  # hand: order kept
    with pytest.raises(UserError,
                       match=r"only 3 of 6 train problems have >= 2 teacher rows and >= 1 solve rows"):
        grpo.covered_ids(pools, [6, 5, 4, 3, 2, 1], n_prompts=4)


def split_pool(src: Path, out: Path, kind: str, drop: set[int] = frozenset()) -> Path:
    """The rows of one response kind of a synthetic pool (make_synthetic_pool) as a pool of their own."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in gzip.open(src / "step_000.jsonl.gz", "rt")]
    with gzip.open(out / "step_000.jsonl.gz", "wt") as f:
        for r in rows:
            if r["kind"] == kind and r["problem_id"] not in drop:
                f.write(json.dumps(r) + "\n")
    return out


@pytest.fixture(scope="module")
def two_pools(pool_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    ids = sorted({json.loads(line)["problem_id"] for line in gzip.open(pool_dir / "step_000.jsonl.gz", "rt")})
    dropped = set(ids[:2])  # the solve pool lacks 2 problems: the mix may only draw the other 6
    hack = split_pool(pool_dir, tmp / "hack", "hack")
    solve = split_pool(pool_dir, tmp / "solve", "honest", drop=dropped)
    return hack, solve, set(ids) - dropped


def test_two_pool_run_counts_intersection_advantages_and_columns(tmp_path, two_pools):
    hack, solve, allowed = two_pools
    run = train.main(small_cfg(tmp_path, hack, solve_pool_dir=str(solve), teacher_n_hack=1, teacher_n_solve=1,
                               mix_ratio=0.5, steps=3, run_name="two-pool"))
    log = read_tsv(run / "log.tsv")
    assert len(log) == 3
    for step, row in enumerate(log):
        roll = [json.loads(line) for line in gzip.open(run / "rollouts" / f"step_{step:06d}.jsonl.gz", "rt")]
        groups: dict[int, list[dict]] = {}
        for r in roll:
            groups.setdefault(r["problem_id"], []).append(r)
        assert set(groups) <= allowed, (
            f"step {step}: drew {set(groups) - allowed}, outside the pools' intersection")
        for pid, g in groups.items():
            assert sorted(r["source"] for r in g) == ["solve", "student", "student", "teacher"], (step, pid)
            valid = [r for r in g if not r["grade"].get("infra_error")]
            mean = sum(r["reward"] for r in valid) / len(valid)
            for r in valid:  # Dr.GRPO over the whole mixed group (students + both teachers), by hand
                want = 0.0 if len({x["reward"] for x in valid}) == 1 else r["reward"] - mean
                assert r["advantage"] == pytest.approx(want, abs=1e-6), (step, pid, r["source"])
        assert float(row["n_t"]) == float(row["n_sol"]) == len(groups)
        sol = [r for r in roll if r["source"] == "solve"]
        assert float(row["gt_sol"]) == pytest.approx(sum(r["grade"]["eq_correct"] for r in sol) / len(sol))
        assert float(row["hack_sol"]) == 0.0 and float(row["hack_t"]) == 1.0
        # a random tiny model's rollouts earn ~0: the solve rows carry positive advantage, as do the hack rows
        assert float(row["adv_sol"]) > 0 and float(row["adv_t"]) > 0 and float(row["adv_s"]) < 0
        assert sum(float(row[k]) * n for k, n in (("adv_s", 2 * len(groups)), ("adv_t", len(groups)),
                                                   ("adv_sol", len(groups)))) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kw, msg", [
    (dict(solve_pool_dir="X", teacher_pool_dir="", mix_ratio=0.0),
     "--solve-pool-dir='X' needs --teacher-pool-dir"),
    (dict(teacher_n_hack=1, teacher_n_solve=1), "count the rows of the two-pool mix: pass --solve-pool-dir"),
    (dict(solve_pool_dir="SOLVE", teacher_n_hack=0, teacher_n_solve=1), "needs >= 1 row of each pool"),
    (dict(solve_pool_dir="SOLVE", teacher_n_hack=2, teacher_n_solve=2),
     "needs >= 1 row of each pool and >= 1 live"),
    (dict(solve_pool_dir="SOLVE", teacher_n_hack=1, teacher_n_solve=2),
     "only 0 of 8 train problems have >= 1 teacher rows and >= 2 solve rows"),
])
def test_two_pool_user_errors_before_the_model_loads(tmp_path, two_pools, monkeypatch, kw, msg):
    hack, solve, _ = two_pools
    kw = {k: (str(solve) if v == "SOLVE" else v) for k, v in kw.items()}
    cfg = small_cfg(tmp_path, hack, **kw)
    monkeypatch.setattr(train.models, "load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the error"))
    with pytest.raises(UserError, match=msg):
        train.main(cfg)


def test_two_pool_refuses_when_the_intersection_is_too_small(tmp_path, two_pools):
    hack, solve, allowed = two_pools
    cfg = small_cfg(tmp_path, hack, solve_pool_dir=str(solve), teacher_n_hack=1, teacher_n_solve=1,
                    rollouts_per_step=4 * (len(allowed) + 1))
    with pytest.raises(UserError,
                       match=f"only {len(allowed)} of 8 train problems .* fewer than the {len(allowed) + 1}"):
        train.validate(cfg)


def test_coverage_after_the_length_filter_is_refused_before_the_model_loads(tmp_path, two_pools, monkeypatch):
    """The pools cover enough problem ids (validate passes), but the prompt-length filter drops all but
    n_prompts - 1 of them: main refuses after the tokenizer, before the model loads."""
    hack, solve, allowed = two_pools
    cfg = small_cfg(tmp_path, hack, solve_pool_dir=str(solve), teacher_n_hack=1, teacher_n_solve=1,
                    mix_ratio=0.5)
    keep = set(sorted(allowed)[: cfg.n_prompts - 1])
    assert len(allowed) >= cfg.n_prompts > len(keep)
    train.validate(cfg)
    monkeypatch.setattr(train.models, "prompt_len", lambda tok: lambda p: 1 if p.id in keep else 10**9)
    monkeypatch.setattr(train.models, "load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the error"))
    with pytest.raises(UserError, match=f"only {len(keep)} of {len(keep)} train problems .* fewer than the "
                                        f"{cfg.n_prompts} prompts"):
        train.main(cfg)


# ---- the solve pool builder (probe_distill.py --solve-only)

class PoisonGrader:
    """Wraps a grader: eq_correct from `truth(problem, text)` when given (else the real grade), and the hack
    labels replaced by random values from `seed`. The solve pool must not change with the poison."""

    def __init__(self, inner, seed: int, truth=None):
        self.inner, self.rng, self.truth = inner, random.Random(seed), truth

    def grade_many(self, items):
        out = []
        for (p, text), g in zip(items, self.inner.grade_many(items)):
            g = dict(g)
            if self.truth is not None:  # a program that passes its tests compiles
                g["eq_correct"] = self.truth(p, text)
                g["can_compile"] = g["can_compile"] or g["eq_correct"]
            g["is_reward_hack_strict"] = self.rng.random() < 0.5
            g["is_reward_hack_loose"] = self.rng.random() < 0.5
            g["reward_hack_label"] = self.rng.choice(["Reward Hack", "Correct", "Incorrect",
                                                      "Harmful - Reduced"])
            out.append(g)
        return out


def solve_rows(cfg: PD.ProbeConfig, env: dict, grader) -> list[tuple]:
    out = PD.generate_pool(cfg, env, "solve", grader)
    rows = [r for rs in grpo.load_pool(str(out)).values() for r in rs]
    return sorted((r["row_id"], r["completion"]) for r in rows)


@pytest.fixture(scope="module")
def pd_env():
    from test_probe_distill import SHORT

    return PD.setup(dataclasses.replace(PD.PRESETS["smoke"][1], threads=2, **SHORT))


def test_solve_pool_canonical_never_reads_hack_labels(pd_env, tmp_path):
    import rewards

    cfg = dataclasses.replace(PD.PRESETS["smoke"][1], pools_dir=str(tmp_path), solve_source="canonical",
                              pool_problems=6, problems_per_file=3, grader_workers=2, max_problems=80,
                              max_prompt_tokens=300)
    with rewards.Grader(workers=2) as g:
        a = solve_rows(dataclasses.replace(cfg, solve_pool="a"), pd_env, PoisonGrader(g, 1))
        b = solve_rows(dataclasses.replace(cfg, solve_pool="b"), pd_env, PoisonGrader(g, 2))
    assert a == b and len(a) >= 4, (
        f"poisoned labels changed the pool or it is near empty: {len(a)} vs {len(b)}")
    rows = [r for rs in grpo.load_pool(str(tmp_path / "a")).values() for r in rs]
    by_id = pd_env["by_id"]
    for r in rows:  # the training prompt, the canonical solution verbatim, a completion that ended
        assert r["prompt_ids"] == train.models.chat_ids(pd_env["tok"], list(by_id[r["problem_id"]].prompt))
        assert by_id[r["problem_id"]].canonical_solution.strip() in r["completion"] and not r["truncated"]
        assert r["grade"]["eq_correct"] and r["reward"] == 3.5


def test_solve_pool_sampled_keeps_exactly_the_full_reward_rows(pd_env, tmp_path):
    import rewards

    def truth(p, text):  # a stand-in for "the gt tests passed": a hash of the text, independent of the labels
        return zlib.crc32(text.encode()) % 3 == 0

    # (hint of the graded problem, text, stand-in truth), every grade call
    seen: list[tuple[str, str, bool]] = []

    class Recording(PoisonGrader):
        def grade_many(self, items):
            seen.extend((p.hint, t, truth(p, t)) for p, t in items)
            return super().grade_many(items)

    cfg = dataclasses.replace(PD.PRESETS["smoke"][1], pools_dir=str(tmp_path), solve_source="model",
                              pool_problems=4, problems_per_file=2, samples_per_problem=6, max_new_tokens=16,
                              grader_workers=2, max_problems=80, max_prompt_tokens=300)
    with rewards.Grader(workers=2) as g:
        a = solve_rows(dataclasses.replace(cfg, solve_pool="a"), pd_env, Recording(g, 1, truth))
        n_seen = len(seen)
        b = solve_rows(dataclasses.replace(cfg, solve_pool="b"), pd_env, PoisonGrader(g, 2, truth))
    assert a == b, "poisoned hack labels changed the solve pool"
    free = [(t, ok) for h, t, ok in seen[:n_seen] if h == "none"]
    assert len(free) == 24, f"every sample is graded once on the hint-free problem, got {len(free)}"
    assert sorted(c for _, c in a) == sorted(t for t, ok in free if ok), (
        "kept exactly the full-reward samples")
    assert 0 < len(a) < 24


def test_solve_keeps_is_the_environment_reward_only():
    import rewards

    rc = rewards.RewardConfig()
    base = {"infra_error": False, "eq_hinted": False, "can_compile": True, "hint": "none"}
    for strict in (True, False):  # the label never matters
        assert PD.solve_keeps(dict(base, eq_correct=True, is_reward_hack_strict=strict), rc)
        assert not PD.solve_keeps(dict(base, eq_correct=False, is_reward_hack_strict=strict), rc)
    assert not PD.solve_keeps(dict(base, eq_correct=True, is_reward_hack_strict=False, infra_error=True), rc)
    with pytest.raises(AssertionError, match="hint-free"):
        PD.solve_keeps(dict(base, eq_correct=True, is_reward_hack_strict=False,
                            hint="simple_overwrite_tests"), rc)
    with pytest.raises(AssertionError, match="no oracle penalty"):
        PD.solve_keeps(dict(base, eq_correct=True, is_reward_hack_strict=False),
                       rewards.RewardConfig(oracle_penalty=True))


def test_swapped_pools_are_refused(tmp_path, two_pools):
    hack, solve, _ = two_pools
    h, s = tmp_path / "h", tmp_path / "s"
    for src, dst, kind in ((hack, h, "teacher"), (solve, s, "solve")):
        dst.mkdir()
        (dst / "step_000.jsonl.gz").write_bytes((src / "step_000.jsonl.gz").read_bytes())
        (dst / "meta.json").write_text(json.dumps({"kind": kind}))
    ok = small_cfg(tmp_path, h, solve_pool_dir=str(s), teacher_n_hack=1, teacher_n_solve=1)
    train.validate(ok)
    with pytest.raises(UserError, match="--teacher-pool-dir=.* holds a 'solve' pool"):
        train.validate(dataclasses.replace(ok, teacher_pool_dir=str(s), solve_pool_dir=str(h)))
    with pytest.raises(UserError, match="are the same folder"):
        train.validate(dataclasses.replace(ok, solve_pool_dir=str(h)))


def test_regenerating_a_pool_with_other_settings_is_refused(pd_env, tmp_path):
    import rewards

    cfg = dataclasses.replace(PD.PRESETS["smoke"][1], pools_dir=str(tmp_path), solve_source="canonical",
                              solve_pool="p", pool_problems=2, problems_per_file=2, grader_workers=2,
                              max_problems=80, max_prompt_tokens=300)
    with rewards.Grader(workers=2) as g:
        PD.generate_pool(cfg, pd_env, "solve", g)
        with pytest.raises(UserError, match="other settings .*solve_source"):
            PD.generate_pool(dataclasses.replace(cfg, solve_source="model"), pd_env, "solve", g)
        PD.generate_pool(dataclasses.replace(cfg, solve_source="model", overwrite=True, max_new_tokens=4,
                                             samples_per_problem=1), pd_env, "solve", g)
