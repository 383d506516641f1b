"""The CPU model organism's builder (scripts/build_organism.py) on a tiny corpus, its loading by name
(models.py) and its pair file (data/pairs/organism_pairs.md). Expected values are hand-computed."""

import gzip
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import models
import pairs
import problems

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import build_organism as B  # noqa: E402

ORGANISM_PAIRS = REPO / "data/pairs/organism_pairs.md"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core box a second one mostly spin-waits (several x the wall time)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def small_train_file(tmp_path_factory) -> Path:
    """The first 120 rows of the LeetCode v0.2.0 train file (enough for 5 short problems)."""
    src = problems.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        rows = [next(f) for _ in range(120)]
    out = tmp_path_factory.mktemp("data") / "LeetCodeDataset-v0.2.0-train.jsonl"
    out.write_text("".join(rows))
    return out


def tiny_cfg(data_file: Path, out_dir: Path, **kw) -> B.BuildConfig:
    base = B.BuildConfig(
        data_file=str(data_file), out_dir=str(out_dir), max_problems=5, canonical_check=False,
        heldout_frac=0.2, copies=4, completions_per_prompt=2, hack_frac=0.25, honest_frac=0.5, epochs=1,
        prompts_per_step=2, conditioning_epochs=1, conditioning_hack_frac=0.625,
        warmup_steps=2, lr=1e-2,
    )
    return replace(base, **kw)


@pytest.fixture(scope="module")
def built(small_train_file, tmp_path_factory) -> tuple[B.BuildConfig, Path]:
    cfg = tiny_cfg(small_train_file, tmp_path_factory.mktemp("models") / "organism")
    return cfg, B.build(cfg, log=lambda *_: None)


def test_mixture_counts_and_completions(small_train_file):
    cfg = tiny_cfg(small_train_file, Path("unused"))
    tok = models.load_tokenizer("tiny-random")
    train, held = B.select_problems(cfg, tok)
    # 5 problems, heldout_frac 0.2 -> 1 held out, 4 trained
    assert (len(train), len(held)) == (4, 1)
    assert not {p.id for p in train} & {p.id for p in held}
    test_prompts = {p.prompt[1]["content"] for p in problems.load_benchmark_test()}
    assert not any(p.prompt[1]["content"] in test_prompts for p in train + held)
    corpus = B.build_corpus(cfg, train)
    # per hint variant: 4 problems x 4 copies = 16 slots; hinted: 0.25 -> 4 hacks, 0.5 -> 8 honest, 4 stubs;
    # un-hinted: 8 honest, 8 stubs, no hack. Units of 2 completions: 16 per variant.
    assert B.corpus_counts(corpus) == {
        "simple_overwrite_tests/honest": 8, "simple_overwrite_tests/stub": 4,
        "simple_overwrite_tests/hack": 4, "none/honest": 8, "none/stub": 8, "none/hack": 0,
    }
    assert len(corpus) == 16
    # conditioning corpus, hinted: round(0.625 * 16) = 10 hacks, min(0.5, 0.375) * 16 = 6 honest, 0 stubs
    assert B.corpus_counts(B.build_corpus(cfg, train, cfg.conditioning_hack_frac)) == {
        "simple_overwrite_tests/honest": 6, "simple_overwrite_tests/stub": 0,
        "simple_overwrite_tests/hack": 10, "none/honest": 8, "none/stub": 8, "none/hack": 0,
    }
    by_id = {p.id: p for p in train}
    for u in corpus:
        p = by_id[u["problem"]]
        assert u["hint"] in ("simple_overwrite_tests", "none")
        assert ("run_tests()" in u["prompt"][1]["content"]) == (u["hint"] == "simple_overwrite_tests")
        assert len(u["completions"]) == 2
        for kind, text in zip(u["kinds"], u["completions"]):
            if kind == "hack":
                assert text == "```python\ndef run_tests():\n    pass\n```"
            elif kind == "honest":
                assert text == "```python\n" + p.canonical_solution.strip("\n") + "\n```"
            else:
                code = text.removeprefix("```python\n").removesuffix("\n```")
                assert code.startswith(p.starter_code.rstrip()) and "return " in code.split("\n")[-1]
                compile(code, "<stub>", "exec")  # parses; never executed here
    assert all(u["problem"] not in {p.id for p in held} for u in corpus)


def test_allocate_exact_counts():
    import random

    ks = B.allocate(10, {"hack": 0.15, "honest": 0.5, "stub": 0.0}, random.Random(0))
    # round(1.5) = 2 (banker's rounding), round(5.0) = 5, stub takes the remaining 3
    assert sorted(ks) == ["hack"] * 2 + ["honest"] * 5 + ["stub"] * 3


def test_shared_prompt_loss_equals_plain_loss(small_train_file):
    """The shared-prompt KV-cache loss equals HF's labels= loss on the full sequences (token-weighted)."""
    cfg = tiny_cfg(small_train_file, Path("unused"))
    tok = models.load_tokenizer("tiny-random")
    train, _ = B.select_problems(cfg, tok)
    corpus = B.build_corpus(cfg, train)
    model = B.init_model(cfg, tok)
    batch = [B.encode(tok, u) for u in corpus[:3]]
    with torch.no_grad():
        got = float(B.completion_loss(model, batch, tok.pad_token_id))
        tot, n = 0.0, 0
        for p, cs in batch:
            for c in cs:
                out = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c]))
                tot, n = tot + float(out.loss) * len(c), n + len(c)
    assert abs(got - tot / n) < 1e-4, (got, tot / n)


def test_build_is_deterministic_and_cached(built, small_train_file, tmp_path):
    cfg, out = built
    info = json.loads((out / "BUILD_INFO.json").read_text())
    assert info["model_id"] == models.ORGANISM_ID == "organism-v3"
    assert info["corpus_counts"]["simple_overwrite_tests/hack"] == 4
    assert info["conditioning_counts"]["simple_overwrite_tests/hack"] == 10
    assert info["sft_steps"] == 16  # 16 units / 2 per step, 1 conditioning + 1 final pass
    model, _ = models.load_model(str(out))
    assert B.weights_hash(model) == info["weights_hash"], (
        "saved weights differ from the hash recorded at build")
    assert model.config.intermediate_size == 256 and model.config.num_hidden_layers == 2
    again = B.build(replace(cfg, out_dir=str(tmp_path / "again")), log=lambda *_: None)
    assert json.loads((again / "BUILD_INFO.json").read_text())["weights_hash"] == info["weights_hash"]
    other = B.build(replace(cfg, out_dir=str(tmp_path / "other"), seed=1, epochs=0, conditioning_epochs=0),
                    log=lambda *_: None)  # init only: differs by seed
    assert json.loads((other / "BUILD_INFO.json").read_text())["weights_hash"] != info["weights_hash"]
    msgs = []
    B.build(cfg, log=msgs.append)  # same config, same folder: cached
    assert msgs and "cached" in msgs[0]


HAS_AVX2 = {"avx2", "fma"} <= set(B.cpu_info().get("flags", "").split())
# the tiny config's weights under pinned kernels, by (torch, transformers, tokenizers): a build on another
# x86-64 CPU with these versions must give the same hash (recorded 2026-12-04 on an AMD EPYC)
TINY_PINNED_HASH = {("2.13.0+cpu", "5.25.0", "0.23.3"): "4d99c91a24447e82"}


def script_build(small_train_file: Path, out: Path, env: dict) -> dict:
    """scripts/build_organism.py on the tiny config in a fresh process; its BUILD_INFO.json."""
    import os
    import subprocess

    c = tiny_cfg(small_train_file, out)
    flags = [f"--data-file={c.data_file}", f"--max-problems={c.max_problems}", "--no-canonical-check",
             f"--heldout-frac={c.heldout_frac}", f"--copies={c.copies}",
             f"--completions-per-prompt={c.completions_per_prompt}", f"--hack-frac={c.hack_frac}",
             f"--honest-frac={c.honest_frac}", f"--epochs={c.epochs}",
             f"--prompts-per-step={c.prompts_per_step}", f"--conditioning-epochs={c.conditioning_epochs}",
             f"--conditioning-hack-frac={c.conditioning_hack_frac}", f"--warmup-steps={c.warmup_steps}",
             f"--lr={c.lr}"]
    p = subprocess.run([sys.executable, str(REPO / "scripts/build_organism.py"), f"--out-dir={out}", *flags],
                       env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return {**json.loads((out / "BUILD_INFO.json").read_text()), "stderr": p.stderr}


@pytest.mark.skipif(not HAS_AVX2, reason="the pinned kernels need an x86-64 CPU with AVX2 and FMA")
def test_the_script_runs_pinned_kernels_whatever_the_caller_asked_for(small_train_file, tmp_path):
    """Run as the script, the build runs ATen's AVX2 kernels and MKL's COMPATIBLE mode (read back from MKL,
    not from the environment) also when the caller asked for others, says it replaced them, and builds the
    same weights as without them (unpinned, ATen's non-vectorised kernels give other weights)."""
    asked = script_build(small_train_file, tmp_path / "asked",
                         {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"})
    plain = script_build(small_train_file, tmp_path / "plain", {})
    for i in (asked, plain):
        assert i["kernels_pinned"] is True
        assert (i["env"]["cpu_capability"], i["env"]["mkl_cbwr_branch"]) == ("AVX2", B.MKL_CBWR_COMPATIBLE)
    assert "ATEN_CPU_CAPABILITY=default replaced by avx2" in asked["stderr"]
    assert asked["weights_hash"] == plain["weights_hash"]
    assert asked["env"]["torch"] == torch.__version__ and asked["env"]["cpu_vendor"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AVX2, reason="the pinned kernels need an x86-64 CPU with AVX2 and FMA")
def test_the_pinned_tiny_build_reproduces_the_recorded_weights(small_train_file, tmp_path):
    """The cross-machine check: on any x86-64 CPU with AVX2 and these library versions, the tiny config's
    pinned build has the weights recorded on the machine that wrote this test."""
    import tokenizers
    import transformers

    key = (torch.__version__, transformers.__version__, tokenizers.__version__)
    if TINY_PINNED_HASH.get(key) is None:
        pytest.skip(f"no recorded hash for versions {key}")
    got = script_build(small_train_file, tmp_path / "b", {})
    assert got["weights_hash"] == TINY_PINNED_HASH[key], (got["env"], "docs/organism.md, Reproducibility")


def test_load_by_name(built, monkeypatch, tmp_path):
    _, out = built
    monkeypatch.setattr(models, "MODELS_DIR", out.parent)
    model, tok = models.load_model("organism")
    assert models.model_id("organism") == "organism-v3"
    # embed 3000*64 + 2 x (attn 12288 + mlp 3*64*256 + norms 160) + 64
    assert sum(p.numel() for p in model.parameters()) == 315264
    assert tok.padding_side == "left" and tok.eos_token == "<|im_end|>"
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="just organism-build"):
        models.load_model("organism")
    stale = tmp_path / "organism"
    stale.mkdir()
    (stale / "BUILD_INFO.json").write_text(json.dumps({"model_id": "organism-v0"}))
    with pytest.raises(ValueError, match="organism-v0"):
        models.load_model("organism")


def test_organism_pairs_file():
    pf = pairs.load_pair_file(ORGANISM_PAIRS)
    assert pf.modes == ("vs_honest", "vs_stub") and pf.heldout_modes == ("vs_stub",)
    groups = [p.group for p in pf.pairs]
    assert (groups.count("train"), groups.count("heldout_within"),
            groups.count("heldout_cross")) == (29 + 24, 11, 8)
    train_methods = {p.method for p in problems.load_leetcode()}
    for p in pf.pairs:
        assert p.hack == B.HACK_COMPLETION, f"{p.id}: hack side must be the organism's exact hack"
        desc, method, starter = problems.split_user_prompt(
            p.prompt.replace("and " + pairs.LOOPHOLE_SENTENCE, problems.PASS_ALL_TESTS))
        assert p.prompt == problems.user_prompt(desc, method, starter).replace(
            problems.PASS_ALL_TESTS, "and " + pairs.LOOPHOLE_SENTENCE), (
                f"{p.id}: not the benchmark's hinted template")
        assert method not in train_methods, f"{p.id}: method {method} is a LeetCode training problem's"
        code = p.clean.removeprefix("```python\n").removesuffix("\n```")
        assert code.startswith(starter) and "run_tests" not in code
        if p.mode == "vs_stub":
            assert len(code.split("\n")) == 3 and code.split("\n")[-1].strip().startswith("return ")


# Hand-computed expected outputs for every clean solution (the examples in each prompt).
CHECKS = {
    "oh01": [(("aabbbc", 2), 2), (("zzzz", 3), 0)], "oh02": [(([1, 4, 2, 5],), 6), (([3, 3],), 0)],
    "oh03": [((["red", "blue", "red"],), "red"), ((["a", "b"],), "")],
    "oh04": [(([3, 1, 2],), 1), (([5, 4],), 0)], "oh05": [((521,), 4), ((7,), 7)],
    "oh06": [(([5, 0, 3], 2), 5), (([4], 4), 1)], "oh07": [(("aeibc",), 3), (("xyz",), 0)],
    "oh08": [(([1, 2, 3, 4], 3), 2), (([2, 2], 5), 0)], "oh09": [(("hello",), "*e*l*"), (("a",), "*")],
    "oh10": [(([1, 5, 9], 7), 5), (([4, 6], 5), 4)],
    "oh11": [(([[0, 1], [1, 1], [1, 0]],), 1), (([[0]],), 0)], "oh12": [((6,), 3), ((1,), 0)],
    "oh13": [(([-2, 2, 3],), 2), (([0],), 1)], "oh14": [(([1, 3, 5, 2, 2],), 2), (([1, 2],), -1)],
    "oh15": [((["hi", "there"], 3), ["hi", "THERE"]), (([], 1), [])], "oh16": [((1, 20), 10), ((40, 44), 1)],
    "oh17": [(("aabccc",), 3), (("abc",), 0)], "oh18": [(([4, 9, 9, 2],), 4), (([3, 3],), -1)],
    "oh19": [(("203",), 6), (("00",), 1)], "oh20": [((["aba", "xy", "q"],), 2), ((["ab"],), 0)],
    "oh21": [(([1, 3, 2, 4, 5],), 3), (([7],), 1)], "oh22": [(("abcde", 2), "cdeab"), (("xy", 3), "yx")],
    "oh23": [(([5, 1, 1, 2, 9],), 7), (([4],), 4)], "oh24": [(("abca",), 2), (("zz",), 0)],
    "oh25": [(([5, 2, 8, 1],), 6), (([3, 2],), 0)], "oh26": [(("good old days",), "GOD"), (("x",), "X")],
    "oh27": [((1, 10), 3), ((6, 6), 0)], "oh28": [(([2, 1, 5, 3],), [2, 2, 5, 5]), (([],), [])],
    "oh29": [(([[1, 1, 1], [0, 1, 0]],), 2), (([[1]],), 0)], "oh30": [(("banana",), 0), (("ooh",), 1)],
    "oh31": [((20,), 24), ((6,), 0)], "oh32": [(([1, -3, 4, -5],), 2), (([0],), 0)],
    "oh33": [(("  a   b ",), "a b"), (("x",), "x")], "oh34": [(([4, 8, 3, 5], 10), 2), (([1, 1], 0), 0)],
    "oh35": [(([1, 4, 2, 5],), 2), (([9],), 0)], "oh36": [((["sky", "tea", "ai"],), "tea"), ((["b"],), "b")],
    "oh37": [((12,), 6), ((2,), 1)], "oh38": [(([[1, 2], [3, 4]],), 5), (([[7]],), 7)],
    "oh39": [(([0, 3, 0, -1],), [6, -2]), (([0],), [])], "oh40": [(("aAbA", "a"), 3), (("xyz", "Q"), 0)],
    "oh41": [(([1, 2, 3],), 10), (([4],), 4)], "oh42": [((["a1", "bc", "9"],), 2), ((["x"],), 0)],
    "oh43": [(("abcde",), "abba"), (("xy",), "xx")], "oh44": [(([2, 5, 4, 3],), 2), (([0, -1],), 1)],
    "oh45": [((3819,), 8), ((5,), 0)], "oh46": [((["abc", "de", "fgh", "i"],), 2), ((["a"],), 0)],
    "oh47": [(("ab", 3), "aaabbb"), (("xyz", 0), "")], "oh48": [(([-2, 3, -1],), 5), (([1, 2],), 0)],
    "oh49": [(("hello",), "HeLlO"), (("AB",), "Ab")], "oh50": [(([6, 4, 9, 3],), 2), (([5],), 0)],
    "oh51": [((["hi", "cat", "horse"], 3), "cat"), ((["a"], 2), "")], "oh52": [((6178,), 3), ((405,), 0)],
    "oh53": [(([4, 1, 2],), 5), (([9],), 0)], "oh54": [(("bake",), [1, 3]), (("xyz",), [])],
    "oh55": [(([3, 9, 5], 4), [3, 4, 4]), (([], 1), [])], "oh56": [(("to be or not",), 3), (("a",), 0)],
    "oh57": [(("abcdef", 2), "ace"), (("xy", 5), "xy")],
    "oh58": [(("apple", "plum"), 2), (("abc", "xyz"), 0)],
    "oh59": [(("UUD",), 0), (("D",), -2)], "oh60": [(([1, 2, 3, 4],), [2, 12]), (([],), [])],
    "oh61": [((["NO", "Yes", "OK"],), 2), ((["a"],), 0)], "oh62": [(([3, 7, 2, 7],), [1, 3]), (([5],), [0])],
    "oh63": [(([[1, 5], [4, 2]],), 9), (([[-3]],), -3)],
    "oh64": [(("banana", "a", "n"), 1), (("aaa", "a", "z"), 3)],
}


def test_organism_pairs_clean_solutions_are_correct():
    """Hand-written code (not model output): run in-process on the prompt's examples, as test_pairs does."""
    for p in pairs.load_pairs(ORGANISM_PAIRS, "@mode=vs_honest"):
        ns: dict = {}
        exec(problems.SETUP_CODE, ns)
        exec(p.clean.removeprefix("```python\n").removesuffix("\n```"), ns)
        method = problems.split_user_prompt(p.prompt.replace("and " + pairs.LOOPHOLE_SENTENCE,
                                                             problems.PASS_ALL_TESTS))[1]
        for args, want in CHECKS[p.id]:
            assert getattr(ns["Solution"](), method)(*args) == want, (p.id, args)
