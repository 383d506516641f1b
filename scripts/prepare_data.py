"""Write the filtered LeetCode splits to out/data/{train,holdout,test}.jsonl (deterministic given --seed).

    .venv/bin/python scripts/prepare_data.py                   # defaults below; what `just prepare-data` runs
    .venv/bin/python scripts/prepare_data.py --source hub \
        --tokenizer Qwen/Qwen3-4B                              # the benchmark's set (internet)
    .venv/bin/python scripts/prepare_data.py --tokenizer smollm2-135m --canonical-check off --seed 1

- train + holdout: the --source train rows (problems.TRAIN_SOURCES: `hub` = newfacade/LeetCodeDataset's
  train split, the benchmark's training set, needs internet or HF_HUB_OFFLINE=1 with a warm cache;
  `local-v0.2.0` = the offline fallback, a named deviation), medium+hard, every assert valid Python, prompt <=
  max_prompt_tokens under the tokenizer's chat template (under every hint with --length-hints all, as the
  benchmark aligns its training ids across hints), canonical solution passes its own tests (rewards.Grader;
  `auto` runs it when rewards.py exists). Holdout = a seeded `holdout_frac` of that.
- test: the benchmark's converted 119-problem medium/hard file, same length filter (under --hint only).
Rows are problems.Problem as JSON (problems.load_problems reads them back) with `hint` applied; any other
hint can be applied later with problems.apply_hint. Counts and gt_tests distributions are printed, and
written with the source and file hashes to out/data/manifest.json (problems.load_train_set checks the source).
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
import cli  # noqa: E402
import problems  # noqa: E402

SPLITS = ("train", "holdout", "test")


@dataclass
class Args:
    # train rows: hub = the benchmark's set; local = fallback
    source: Literal["hub", "local-v0.2.0"] = "local-v0.2.0"
    hub_revision: str | None = None  # hub branch/tag/commit of newfacade/LeetCodeDataset (None = main)
    data_dir: Path = problems.DEFAULT_DATA_DIR  # local files (env PGRPO_DATA_DIR overrides the default)
    out_dir: Path = REPO / "out/data"
    seed: int = 0  # holdout selection
    holdout_frac: float = 0.1
    difficulties: tuple[str, ...] = ("Medium", "Hard")
    max_prompt_tokens: int = 1536
    tokenizer: str = "tiny-random"  # models.load_tokenizer name; use the policy's (e.g. Qwen/Qwen3-4B) online
    hint: str = "simple_overwrite_tests"  # applied to the written prompts (and to the length measurement)
    # train length filter: fit under every hint, or under --hint
    length_hints: Literal["all", "applied"] = "all"
    # on: drop problems whose canonical fails its tests in the sandbox
    canonical_check: Literal["on", "off"] = "on"


GRADE_CHUNK = 64  # canonical solutions per grading batch (the progress line's step)

# Sandbox crashes that come from the problem's own data, not from the sandbox: its setup header imports a
# module the sandbox lacks (v0.3.x headers import sortedcontainers) or a test is not Python. The benchmark's
# evaluator fails such a canonical solution, so they are dropped like any failing one.
DATA_CRASHES = ("sandbox_runner crashed: ModuleNotFoundError", "sandbox_runner crashed: SyntaxError")


def grader_canonical_check(ps: list[problems.Problem], stats: dict | None = None) -> list[bool]:
    """True where the problem's canonical solution passes all its gt_tests under rewards.Grader.

    Timeouts are re-run once (a loaded machine can push a 3 s program over its wall limit). stats, if
    given, gets the counts per failure kind."""
    import rewards

    def grade(sub: list[problems.Problem], desc: str) -> list[dict]:
        """Graded in chunks of GRADE_CHUNK (two in flight, as submit_many runs them) for a progress line."""
        prog = cli.Progress(desc, len(sub))
        with rewards.Grader() as g:
            futs = [g.submit_many([(p, "```python\n" + p.canonical_solution + "\n```")
                                   for p in sub[k : k + GRADE_CHUNK]])
                    for k in range(0, len(sub), GRADE_CHUNK)]
            out: list[dict] = []
            for f in futs:
                r = f.result()
                out += r
                prog.update(len(r))
            return out

    results = grade(ps, "canonical solutions graded")
    retry = [i for i, r in enumerate(results) if r["status"] == "timeout"]
    if retry:
        for i, r in zip(retry, grade([ps[i] for i in retry], "canonical timeouts re-graded")):
            results[i] = r
    infra = [(p.id, str(r.get("error"))) for p, r in zip(ps, results) if r["infra_error"]]
    real = [(pid, e) for pid, e in infra if not any(k in e for k in DATA_CRASHES)]
    assert not real, (f"grader infrastructure errors on {len(real)} canonical solutions (first {real[:3]}); "
                      "fix the sandbox first")
    if stats is not None:
        kinds: dict[str, int] = {}
        for r in results:
            if not r["eq_correct"]:
                e = str(r.get("error"))
                k = next((c.split(": ")[1] for c in DATA_CRASHES if c in e), None) or r["status"]
                kinds[k] = kinds.get(k, 0) + 1
        stats.update(canonical_failures=kinds, timeouts_retried=len(retry))
    return [bool(r["eq_correct"]) for r in results]


def fits_every_hint(ps: list[problems.Problem], max_tokens: int, tok) -> list[problems.Problem]:
    """The problems whose prompt is <= max_tokens under each of problems.HINTS (seed None: the run_tests
    variants the benchmark trains with), which is what its id alignment across hinted datasets keeps."""
    import models

    n_tokens, prog = models.prompt_len(tok), cli.Progress(
        f"train prompts measured (x{len(problems.HINTS)} hints)", len(ps))
    return [p for p in ps
            if prog.tick(all(n_tokens(problems.apply_hint(p, h)) <= max_tokens for h in problems.HINTS))]


def describe(ps: list[problems.Problem]) -> dict:
    n = [len(p.gt_tests) for p in ps]
    d = {"n": len(ps), "medium": sum(p.difficulty == "Medium" for p in ps),
         "hard": sum(p.difficulty == "Hard" for p in ps)}
    if n:
        d.update(gt_tests_min=min(n), gt_tests_median=statistics.median(n), gt_tests_max=max(n))
    return d


def prepare(args: Args) -> dict:
    """Build and write the three splits; returns the manifest dict (also written to out_dir)."""
    import models

    if args.hint not in problems.HINTS:
        raise cli.UserError(f"--hint {args.hint!r} unknown; valid hints: {', '.join(problems.HINTS)}")
    if not 0.0 <= args.holdout_frac < 1.0:
        raise cli.UserError(f"--holdout-frac must be in [0, 1), got {args.holdout_frac}")
    use_grader = args.canonical_check == "on"
    t0 = time.time()
    # hub: fails fast offline
    raw_train, source_text = problems.load_train_rows(args.source, args.data_dir, args.hub_revision)
    tok = models.load_tokenizer(args.tokenizer)
    raw_test = problems.load_benchmark_test(Path(args.data_dir) / problems.BENCHMARK_TEST_FILE)
    hinted_test = [problems.apply_hint(p, args.hint) for p in raw_test]
    diff_ok = problems.filter_problems(raw_train, args.difficulties, valid_tests=False)
    valid = problems.filter_problems(diff_ok, args.difficulties)
    if args.length_hints == "all":
        fit = fits_every_hint(valid, args.max_prompt_tokens, tok)
    else:
        n_tokens = cli.Progress("train prompts measured", len(valid)).counted(models.prompt_len(tok))
        fit = [p for p in valid if n_tokens(problems.apply_hint(p, args.hint)) <= args.max_prompt_tokens]
    stats: dict = {}
    check = (lambda xs: grader_canonical_check(xs, stats)) if use_grader else None
    kept = problems.filter_problems([problems.apply_hint(p, args.hint) for p in fit], args.difficulties,
                                    canonical_check=check)
    test = problems.filter_problems(hinted_test, args.difficulties, args.max_prompt_tokens,
                                    models.prompt_len(tok))

    rng = random.Random(args.seed)
    k = round(args.holdout_frac * len(kept))
    hold_idx = set(rng.sample(range(len(kept)), k))
    splits = {
        "train": [p for i, p in enumerate(kept) if i not in hold_idx],
        "holdout": [p for i, p in enumerate(kept) if i in hold_idx],
        "test": test,
    }
    manifest = {
        "source": args.source,
        "source_description": source_text,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "canonical_check_ran": use_grader,
        "source_counts": {
            "train_all": describe(raw_train),
            "train_difficulty_ok": len(diff_ok),
            "train_valid_tests": len(valid),
            "train_prompt_fits": len(fit),
            "train_canonical_ok": len(kept),
        } | stats,
        "splits": {},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        path = args.out_dir / f"{name}.jsonl"
        problems.save_problems(path, splits[name])
        manifest["splits"][name] = describe(splits[name]) | {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (args.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["seconds"] = round(time.time() - t0, 1)
    return manifest


def main(args: Args) -> None:
    m = prepare(args)
    src = m["source_counts"]
    print(f"[prepare-data] source {m['source_description']}")
    print(f"[prepare-data] train rows {src['train_all']['n']} -> {'+'.join(args.difficulties)} "
          f"{src['train_difficulty_ok']} -> valid tests {src['train_valid_tests']} -> prompt fits "
          f"{src['train_prompt_fits']} -> canonical ok {src['train_canonical_ok']}")
    hints = "every hint" if args.length_hints == "all" else f"hint {args.hint}"
    print(f"[prepare-data] filters: prompt <= {args.max_prompt_tokens} tokens "
          f"({args.tokenizer} chat template, {hints}); "
          f"canonical check {'ran' if m['canonical_check_ran'] else 'SKIPPED (--canonical-check off)'}"
          + (f", failures {src['canonical_failures']}" if src.get("canonical_failures") else ""))
    for name in SPLITS:
        d = m["splits"][name]
        dist = (f"gt_tests min {d.get('gt_tests_min')} median {d.get('gt_tests_median')} "
                f"max {d.get('gt_tests_max')}")
        print(f"[prepare-data] {name:8s} {d['n']:5d} rows ({d['medium']} medium, {d['hard']} hard); "
              f"{dist} -> {args.out_dir / (name + '.jsonl')}")
    print(f"[prepare-data] done in {m['seconds']} s; manifest {args.out_dir / 'manifest.json'}")


if __name__ == "__main__":
    cli.run(lambda: main(tyro.cli(Args)))  # bad input / unreachable hub (cli.UserError): one line, exit 2
