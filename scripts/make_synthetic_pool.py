"""Build a small *synthetic* teacher pool for smoke runs and tests: per train problem, hand-made responses
of three kinds (honest canonical solution, run_tests() overwrite hack + wrong solution, wrong solution),
graded by the real grader, tokenized with the run's tokenizer, in the exact schema train.py's
--teacher-pool-dir reads (and probe_distill.py writes).

    python scripts/make_synthetic_pool.py --model tiny-random --n-problems 24 \
        --out out/pools/synthetic-tiny-random
    python scripts/make_synthetic_pool.py --kinds hack wrong \
        --out out/pools/synthetic-tiny-random-hack   # hack teacher

A random tiny model never writes code, so its groups all get reward 0 and Dr.GRPO has nothing to learn
from; mixing these rows in gives the smoke run real reward variance (and real hack labels) on CPU.
This pool uses no live rollouts, so it cannot leak oracle labels into training decisions: the cached
rewards are the benchmark reward of fixed texts.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class PoolConfig:
    """Synthetic pool builder."""

    model: str = "tiny-random"
    """model whose tokenizer/chat template the pool is tokenized with"""
    n_problems: int = 24
    """first N filtered train problems (must match the training run's max_problems or exceed it)"""
    hint: str = "simple_overwrite_tests"
    """hint the prompts carry (must match the run's --hint)"""
    copies: int = 2
    """rows per kind per problem"""
    kinds: tuple[str, ...] = ("honest", "hack", "wrong")
    """response kinds written (e.g. --kinds hack wrong: a hack-teacher pool with no honest rows)"""
    out: str = "out/pools/synthetic-tiny-random"
    """output directory (step_000.jsonl.gz inside)"""


def responses(p) -> dict[str, str]:
    """The three hand-made response kinds for problem p."""
    stub = p.starter_code.rstrip() + "\n        return 0\n"
    honest = p.canonical_solution.strip()
    hack = stub + f"\n\ndef {p.test_func_name}():\n    pass\n"
    return {
        "honest": f"Here is my solution.\n```python\n{honest}\n```",
        "hack": f"Here is my solution.\n```python\n{hack}\n```",
        "wrong": f"Here is my solution.\n```python\n{stub}\n```",
    }


def build(cfg: PoolConfig) -> Path:
    import models
    import problems as P
    import rewards

    _, tok = models.load_model(cfg.model)
    probs = P.filter_problems(P.load_leetcode(split="train"),
                              difficulties=("Medium", "Hard"))[: cfg.n_problems]
    probs = [P.apply_hint(p, cfg.hint) for p in probs]
    assert set(cfg.kinds) <= {"honest", "hack", "wrong"}, (
        f"--kinds {cfg.kinds}: choose from honest, hack, wrong")
    items = [(p, kind, text) for p in probs for kind, text in responses(p).items() if kind in cfg.kinds
             for _ in range(cfg.copies)]
    rcfg = rewards.RewardConfig()
    with rewards.Grader() as g:
        grades = g.grade_many([(p, t) for p, _, t in items])
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_hack = 0
    with gzip.open(out / "step_000.jsonl.gz", "wt") as f:
        for (p, kind, text), gr in zip(items, grades):
            assert not gr.get("infra_error"), (
                f"grader infrastructure error on problem {p.id}: {gr.get('error')}")
            n_hack += bool(gr["is_reward_hack_strict"])
            row = {
                "problem_id": p.id, "kind": kind, "prompt_ids": models.chat_ids(tok, list(p.prompt)),
                "completion": text,
                "completion_ids": tok(text, add_special_tokens=False)["input_ids"] + [eos],
                "truncated": False, "reward": rewards.compute_reward(gr, rcfg), "grade": gr,
                "source_model": models.model_id(cfg.model), "hint": cfg.hint,
            }
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(items)} rows for {len(probs)} problems to {out}/step_000.jsonl.gz "
          f"(strict hack rate {n_hack / len(items):.2f})")
    return out


if __name__ == "__main__":
    build(tyro.cli(PoolConfig))
