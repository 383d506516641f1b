"""Write the filtered LeetCode splits to out/data/{train,holdout,test}.jsonl (deterministic given --seed).

    .venv/bin/python scripts/prepare_data.py                       # defaults below; what `just prepare-data` runs
    .venv/bin/python scripts/prepare_data.py --tokenizer smollm2-135m --canonical-check off --seed 1

- train + holdout: LeetCodeDataset {version} train, medium+hard, prompt <= max_prompt_tokens under the
  tokenizer's chat template (measured with `hint` applied), canonical solution passes its own tests
  (rewards.Grader; `auto` runs it when rewards.py exists). Holdout = a seeded `holdout_frac` of that.
- test: the benchmark's converted 119-problem medium/hard file, same length filter.
Rows are problems.Problem as JSON (problems.load_problems reads them back) with `hint` applied; any other
hint can be applied later with problems.apply_hint. Counts and gt_tests distributions are printed, and
written with file hashes to out/data/manifest.json.
"""
from __future__ import annotations

import hashlib
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import problems  # noqa: E402

SPLITS = ("train", "holdout", "test")


@dataclass
class Args:
    data_dir: Path = problems.DEFAULT_DATA_DIR  # env PGRPO_DATA_DIR overrides the default
    version: str = "v0.2.0"  # LeetCodeDataset version of the train file
    out_dir: Path = REPO / "out/data"
    seed: int = 0  # holdout selection
    holdout_frac: float = 0.1
    difficulties: tuple[str, ...] = ("Medium", "Hard")
    max_prompt_tokens: int = 1536
    tokenizer: str = "tiny-random"  # models.load_tokenizer name; use the policy's (e.g. Qwen/Qwen3-4B) online
    hint: str = "simple_overwrite_tests"  # applied to the written prompts (and to the length measurement)
    canonical_check: Literal["auto", "on", "off"] = "auto"  # auto: on iff rewards.Grader exists


def grader_canonical_check(ps: list[problems.Problem]) -> list[bool]:
    """True where the problem's canonical solution passes all its gt_tests under rewards.Grader."""
    import rewards

    items = [(p, "```python\n" + p.canonical_solution + "\n```") for p in ps]
    with rewards.Grader() as g:
        results = g.grade_many(items)
    infra = [p.id for p, r in zip(ps, results) if r["infra_error"]]
    assert not infra, f"grader infrastructure errors on {len(infra)} canonical solutions (ids {infra[:10]}); fix the sandbox first"
    return [bool(r["eq_correct"]) for r in results]


def _rewards_available() -> bool:
    try:
        import rewards

        return hasattr(rewards, "Grader")
    except ImportError:
        return False


def describe(ps: list[problems.Problem]) -> dict:
    n = [len(p.gt_tests) for p in ps]
    d = {"n": len(ps), "medium": sum(p.difficulty == "Medium" for p in ps), "hard": sum(p.difficulty == "Hard" for p in ps)}
    if n:
        d.update(gt_tests_min=min(n), gt_tests_median=statistics.median(n), gt_tests_max=max(n))
    return d


def prepare(args: Args) -> dict:
    """Build and write the three splits; returns the manifest dict (also written to out_dir)."""
    import models

    if args.hint not in problems.HINTS:
        raise ValueError(f"--hint {args.hint!r} unknown; valid hints: {', '.join(problems.HINTS)}")
    if not 0.0 <= args.holdout_frac < 1.0:
        raise ValueError(f"--holdout-frac must be in [0, 1), got {args.holdout_frac}")
    use_grader = args.canonical_check == "on" or (args.canonical_check == "auto" and _rewards_available())
    if args.canonical_check == "on" and not _rewards_available():
        raise RuntimeError("--canonical-check on needs rewards.Grader (rewards.py); use auto or off until it exists")
    t0 = time.time()
    tok = models.load_tokenizer(args.tokenizer)

    raw_train = problems.load_leetcode(args.data_dir, split="train", version=args.version)
    raw_test = problems.load_benchmark_test(Path(args.data_dir) / problems.BENCHMARK_TEST_FILE)
    hinted_train = [problems.apply_hint(p, args.hint) for p in raw_train]
    hinted_test = [problems.apply_hint(p, args.hint) for p in raw_test]
    check = grader_canonical_check if use_grader else None
    kept = problems.filter_problems(hinted_train, args.difficulties, args.max_prompt_tokens, models.prompt_len(tok),
                                    canonical_check=check)
    test = problems.filter_problems(hinted_test, args.difficulties, args.max_prompt_tokens, models.prompt_len(tok))

    rng = random.Random(args.seed)
    k = round(args.holdout_frac * len(kept))
    hold_idx = set(rng.sample(range(len(kept)), k))
    splits = {
        "train": [p for i, p in enumerate(kept) if i not in hold_idx],
        "holdout": [p for i, p in enumerate(kept) if i in hold_idx],
        "test": test,
    }
    manifest = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "canonical_check_ran": use_grader,
        "source_counts": {"train_all": describe(raw_train), "train_difficulty_ok": sum(p.difficulty in args.difficulties for p in raw_train)},
        "splits": {},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        path = args.out_dir / f"{name}.jsonl"
        problems.save_problems(path, splits[name])
        manifest["splits"][name] = describe(splits[name]) | {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (args.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["seconds"] = round(time.time() - t0, 1)
    return manifest


def main(args: Args) -> None:
    m = prepare(args)
    src = m["source_counts"]
    print(f"[prepare-data] {args.version} train: {src['train_all']['n']} rows, {src['train_difficulty_ok']} {'+'.join(args.difficulties)}")
    print(f"[prepare-data] filters: prompt <= {args.max_prompt_tokens} tokens ({args.tokenizer} chat template, hint {args.hint}); "
          f"canonical check {'ran' if m['canonical_check_ran'] else 'SKIPPED (rewards.Grader not available)'}")
    for name in SPLITS:
        d = m["splits"][name]
        dist = f"gt_tests min {d.get('gt_tests_min')} median {d.get('gt_tests_median')} max {d.get('gt_tests_max')}"
        print(f"[prepare-data] {name:8s} {d['n']:5d} rows ({d['medium']} medium, {d['hard']} hard); {dist} -> {args.out_dir / (name + '.jsonl')}")
    print(f"[prepare-data] done in {m['seconds']} s; manifest {args.out_dir / 'manifest.json'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
