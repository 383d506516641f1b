"""README "Real runs", in order, on a fresh copy of this working tree at the tiny scale (CPU, no hub): the
steps that need a GPU or the hub are replaced by their smoke-preset twin or skipped with the reason below.

    .venv/bin/pytest tests/test_readme_real_runs.py -q # the whole chain (~2-4 min on 2 cores; in `just test`)

README step                        here
  just download-model              offline: must fail in one line, exit 2, within seconds (HF_ENDPOINT
                                   unreachable)
  just prepare-data --source hub   offline: must fail in one line, exit 2; then the local split with
                                   --canonical-check off (the canonical run of ~1.5k solutions takes minutes)
  just smoke                       scripts/smoke.py --arms vanilla erase --steps 2 (every arm: `just smoke`)
  just extract-vhack full          just extract-vhack smoke
  just verify-vhack full           just verify-vhack smoke (finds what smoke wrote; requires nothing)
  just probe-full-seed 100         --dry-run (the pilot trains the full preset: GPU)
  just queue-full --dry-run        as is
  just summarize full              just summarize smoke --runs <the smoke runs>
  just eval RUN                    just eval <a smoke run> --eval-problems 2: a separate evals/eval-*.json
  just train erase 0               offline: one line about the v_hack it was handed (the smoke file as full's)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JUST = str(ROOT / ".venv" / "bin" / "just")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The working tree's tracked and untracked-but-not-ignored files (what a commit would hold), a .venv link
    and an empty out/: a fresh clone without the network."""
    dst = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in files:
        if f and (ROOT / f).is_file() and not f.startswith(".venv"):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            (dst / f).write_bytes((ROOT / f).read_bytes())
    (dst / ".venv").symlink_to((ROOT / ".venv").resolve())
    return dst


def env(**kw) -> dict:
    """One torch thread; the data where this checkout finds it (the copy has no ../shared beside it)."""
    import problems

    return {**os.environ, "OMP_NUM_THREADS": "1", "PGRPO_DATA_DIR": str(problems.DEFAULT_DATA_DIR), **kw}


def just(clone: Path, *args: str, ok: bool = True, timeout: int = 1800, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([JUST, *args], check=False, cwd=clone, env=env(**kw), capture_output=True, text=True,
                       timeout=timeout)
    if ok:
        assert p.returncode == 0, (
            f"just {' '.join(args)}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ") and "recipe" not in ln]
    assert len(errs) == 1 and needle in errs[0], p.stderr[-2000:]


def test_download_model_offline_fails_in_one_line(clone):
    t0 = time.time()
    p = just(clone, "download-model", ok=False, HF_ENDPOINT="http://127.0.0.1:9")
    one_line_error(p, "cannot reach the Hugging Face hub")
    assert time.time() - t0 < 60


def test_recipes_chain_on_a_fresh_clone(clone):
    for r in ("extract-vhack", "verify-vhack", "pregen-teacher", "pregen-base", "probe-distill",
              "probe-mixed"):
        body = just(clone, "--show", r).stdout
        assert "fetch-smollm" in body, f"recipe {r} does not fetch SmolLM2 for its smollm default:\n{body}"
    # before smoke has run, verify-vhack smoke names the file smoke writes and how to make it
    one_line_error(just(clone, "verify-vhack", "smoke", ok=False), "smoke-tiny-random.safetensors")


def readme_real_runs() -> list[str]:
    """The `just ...` commands of README's "Real runs" block, in order (what the recipe name and arguments
    are)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Real runs"):].split("\n\n")[1]
    return [ln.split("#")[0].split(None, 1)[1].strip() for ln in block.splitlines()
            if ln.strip().startswith("just ")]


# README step -> its tiny twin here (None: handled in the test); a README step missing here fails the test
TWINS = {
    "download-model": None,  # offline: one line, exit 2 (test_download_model_offline_fails_in_one_line too)
    # offline: one line, exit 2; then the local split the later steps read
    "prepare-data --source hub --tokenizer Qwen/Qwen3-4B": ("prepare-data", "--canonical-check", "off"),
    "smoke": None,  # scripts/smoke.py --arms vanilla erase --steps 2
    "extract-vhack full": ("extract-vhack", "smoke"),
    "verify-vhack full": ("verify-vhack", "smoke"),
    "probe-full-seed 100": ("probe-full-seed", "100", "--dry-run"),
    "queue-full": ("queue-full", "--dry-run"),
    "summarize full": None,  # summarize smoke --runs <the smoke runs>
    # the full preset offline: one line naming the missing model, after the v_hack resolved
    "train erase 0": None,
}


def test_real_runs_section_in_order(clone):
    """Every README "Real runs" step in order, at the tiny scale (~2-4 min on 2 cores), then `just eval` of a
    smoke run (a separate evals/eval-*.json, eval.json and eval.tsv untouched)."""
    steps = readme_real_runs()
    assert steps and all(st in TWINS for st in steps), (
        f"README steps without a twin here: {set(steps) - set(TWINS)}")
    t0 = time.time()
    for st in steps:
        name = st.split()[0]
        if name == "download-model":
            one_line_error(just(clone, "download-model", ok=False, HF_ENDPOINT="http://127.0.0.1:9"),
                           "cannot reach the Hugging Face hub")
        elif name == "prepare-data":
            one_line_error(just(clone, *st.split(), ok=False, HF_ENDPOINT="http://127.0.0.1:9"),
                           "cannot reach the Hugging Face hub")
            just(clone, *TWINS[st])
            assert (clone / "out/data/train.jsonl").is_file()
        elif name == "smoke":
            p = subprocess.run([str(clone / ".venv/bin/python"), "scripts/smoke.py", "--arms", "vanilla",
                                "erase", "--steps", "2"], check=False, cwd=clone, capture_output=True,
                               text=True, timeout=1800, env=env())
            assert p.returncode == 0, p.stderr[-3000:]
        elif name == "summarize":
            run_dirs = sorted(str(d) for d in (clone / "out/runs").glob("smoke-*/*") if (d / "DONE").exists())
            assert len(run_dirs) >= 1, list((clone / "out/runs").glob("*/*"))
            just(clone, "summarize", "smoke", "--runs", *run_dirs)
            assert (clone / "out/sweeps/smoke/results.md").is_file()
        elif name == "train":
            # the recipe passes the v_hack a sweep or `extract-vhack full` wrote; here the smoke one stands
            # in, so the one-line refusal names the model it is for, not a missing --vhack-path
            shutil.copy(clone / "out/vhack/smoke-tiny-random.safetensors",
                        clone / "out/vhack/full.safetensors")
            p = just(clone, *st.split(), ok=False, HF_HUB_OFFLINE="1")
            one_line_error(p, "full.safetensors")
        else:
            p = just(clone, *TWINS[st])
            if name == "extract-vhack":
                assert (clone / "out/vhack/smoke-tiny-random.safetensors").is_file()
            if name == "verify-vhack":
                assert "requires no split" in p.stdout
    run = next(d for d in sorted((clone / "out/runs").glob("smoke-*/*")) if (d / "DONE").exists())
    before = ((run / "eval.json").read_text(), (run / "eval.tsv").read_text())
    just(clone, "eval", str(run.relative_to(clone / "out/runs")), "--eval-problems", "2")
    records = list((run / "evals").glob("eval-*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["modes"], records
    assert ((run / "eval.json").read_text(), (run / "eval.tsv").read_text()) == before, (
        "eval.json/eval.tsv changed")
    print(f"README real-runs chain: {time.time() - t0:.0f} s")
