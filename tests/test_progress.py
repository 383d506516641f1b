"""Progress lines: grpo.generate's in-batch GenProgress (lines during a batch, outputs unchanged) and
scripts/prepare_data.py's filters (n/N with an eta)."""

import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from loguru import logger

import grpo
import models
import problems

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def lines():
    out: list[str] = []
    hid = logger.add(lambda m: out.append(m.record["message"]), level="INFO")
    yield out
    logger.remove(hid)


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-random")


def _prompts(tok) -> list[list[int]]:
    return [models.chat_ids(tok, [{"role": "user", "content": f"Write function number {i}."}])
            for i in range(4)]


def test_generate_logs_tokens_during_a_batch_and_samples_the_same(tiny, lines, monkeypatch):
    m, tok = tiny
    prompts = _prompts(tok)
    monkeypatch.setattr(grpo, "GEN_PROGRESS_EVERY_S", 0.0)
    got = grpo.generate(m, tok, prompts, 12, 1.0, 1.0, 2, seed=7)  # sampled: the RNG stream must be untouched
    with monkeypatch.context() as mp:  # without the criterion: generate gets stopping_criteria=None
        mp.setattr(transformers, "StoppingCriteriaList", lambda xs: None)
        want = grpo.generate(m, tok, prompts, 12, 1.0, 1.0, 2, seed=7)
    assert got == want
    assert any(o.truncated for o in got), ("no completion ran to max_new_tokens: "
                                      "the line count below would be vacuous")
    gen = [ln for ln in lines if ln.startswith("generating ")]
    print("\n".join(gen[:3]))
    for b in (1, 2):
        toks = [int(re.search(r"token (\d+)/12 ", ln).group(1))
                for ln in gen if ln.startswith(f"generating batch {b}/2:")]
        longest = max(len(o.ids) for o in got[2 * (b - 1) : 2 * b])
        assert toks == list(range(1, longest + 1)), f"batch {b}: one line per token at interval 0, got {toks}"
    assert re.fullmatch(r"generating batch 1/2: token 1/12 \(\d+s elapsed, eta <= \d+s; [0-2]/2 ended\)",
                        gen[0])


def test_gen_progress_throttles_and_stops_nothing(lines):
    crit = grpo.GenProgress("batch 1/1", width=3, max_new_tokens=100, eos=[0], every_s=3600.0)
    ids = torch.tensor([[5, 5, 5, 7, 0], [5, 5, 5, 8, 9]])  # (2, P + t): row 0 has ended
    done = crit(ids, None)  # (2,)
    assert done.dtype == torch.bool and done.shape == (2,) and not done.any()
    assert lines == []  # within the interval: no line
    crit.every_s, crit.t0 = 0.0, crit.t0 - 20.0
    crit(ids, None)
    assert len(lines) == 1 and "token 2/100 (20s elapsed, eta <= 16.3min; 1/2 ended)" in lines[0], lines


def test_prepare_data_filters_print_totals(lines, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_data

    tok = models.load_tokenizer("tiny-random")
    setup = problems.SETUP_CODE
    p = problems.Problem(id=1, difficulty="Medium", func_name="Solution().add", question="Add a and b.",
                         starter_code="class Solution:\n    def add(self, a, b):", setup_code=setup,
                         gt_tests=("assert Solution().add(a = 1, b = 2) == 3",), prompt=(), hint="none",
                         canonical_solution="class Solution:\n    def add(self, a, b):\n"
                                            "        return a + b\n")
    bad = problems.dataclasses.replace(p, id=2,
                                       canonical_solution=p.canonical_solution.replace("a + b", "a - b"))
    ps = [problems.apply_hint(q, "none") for q in (p, bad, p)]
    assert prepare_data.fits_every_hint(ps, 10**6, tok) == ps
    assert f"train prompts measured (x{len(problems.HINTS)} hints) 3/3 (" in "\n".join(lines), lines
    monkeypatch.setattr(prepare_data, "GRADE_CHUNK", 1)
    assert prepare_data.grader_canonical_check(ps) == [True, False, True]
    graded = [ln for ln in lines if ln.startswith("canonical solutions graded ")]
    print("\n".join(lines))
    assert graded and re.match(r"canonical solutions graded 3/3 \(\d+s elapsed, eta \d+s\)",
                               graded[-1]), lines


def test_length_filter_progress_knows_its_total(tmp_path):
    """problems.load_train_split sets the Progress total to the problems it measures: lines read k/N."""
    import cli
    import problems as P
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        prog = cli.Progress("measured", every_s=0)
        probs, _ = P.load_train_split("local-v0.2.0", "", ("Medium", "Hard"), 5, "simple_overwrite_tests",
                                      10**6,
                                      lambda p: 1, progress=prog)
    finally:
        logger.remove(sink)
    assert len(probs) == 5 and prog.total == 5 and prog.n == 5
    assert any("measured 5/5" in ln for ln in lines), lines


def test_ratio_warnings_fire_once_and_not_on_nan(lines):
    """runs.warn_ratios: a sampler gap above 0.1 nats warns once per run; NaN (no sampler log-probs) never."""
    import runs

    warned: set[str] = set()
    nan = float("nan")
    for step, gap in enumerate([nan, 0.05, 0.3, 0.4]):
        runs.warn_ratios({"frac_clipped": 0.0, "sampler_gap": gap, "is_weight_mean": 0.8,
                          "frac_is_capped": 0.0}, step, warned)
    got = [ln for ln in lines if "disagree" in ln]
    want = "step 2: the sampler and the train pass disagree by 0.300"
    assert len(got) == 1 and got[0].startswith(want), got
