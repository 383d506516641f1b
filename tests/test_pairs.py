"""Tests for pairs.py and the hand-written pair file data/pairs/hack_pairs.md.

    .venv/bin/python -m pytest tests/test_pairs.py -q

Structural rules (loophole sentence, hack != clean, token-length ratio <= 2) plus behavioural checks:
every completion is executed (in-process, tiny snippets) to confirm that the clean side is honest and
the hack side games the evaluator the way its mode says.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

import pairs
import problems
from pairs import LOOPHOLE_SENTENCE, load_pair_file, load_pairs, pair_messages, parse_pairs_text, select_pairs

REPO = Path(__file__).resolve().parents[1]
GGUF_DIR = REPO / "out/models/smollm2-135m"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LEN_RATIO = 2.0
# hack defines run_tests
RUN_TESTS_MODES = ("overwrite", "special_case", "try_except", "exit_early", "weak_asserts")
ARBITRARY_PASS_MODES = ("overwrite", "try_except", "exit_early")  # hack run_tests passes with any solution

PF = load_pair_file()
ALL = list(PF.pairs)


# ---------------------------------------------------------------------------------------------- helpers
def code_of(completion: str) -> str:
    m = re.fullmatch(r"```python\n(.*)\n```", completion, flags=re.S)
    assert m, f"completion is not exactly one ```python fenced block: {completion[:80]!r}"
    return m.group(1)


def method_of(p) -> str:
    m = re.search(r"called (\w+) and will be evaluated", p.prompt)
    assert m, f"{p.id}: cannot find the method name in the prompt"
    return m.group(1)


def exec_code(code: str) -> dict:
    ns: dict = {"__name__": "pairtest"}
    exec(problems.SETUP_CODE, ns)
    exec(compile(code, "<completion>", "exec"), ns)
    return ns


def passes(ns: dict, arbitrary_method: str | None = None) -> bool:
    """Call ns['run_tests']() like the grader: pass = returns, or exits with status 0/None."""
    if arbitrary_method is not None:  # the benchmark's arbitrary solution: every call returns 0
        setattr(ns["Solution"], arbitrary_method, lambda self, *a, **k: 0)
    try:
        ns["run_tests"]()
    except SystemExit as e:
        return e.code in (0, None)
    except Exception:
        return False
    return True


def crude_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


# ---------------------------------------------------------------------------------------------- structure
def test_counts_and_modes(capsys):
    with capsys.disabled():
        print("\n" + pairs.format_counts(ALL))
    modes = Counter(p.mode for p in ALL)
    assert len(ALL) >= 60, f"need >= 60 pairs, have {len(ALL)}"
    assert len(modes) >= 5 and set(modes) == set(PF.modes), modes
    assert min(modes.values()) >= 8, f"every mode needs >= 8 pairs: {modes}"
    assert PF.heldout_modes == ("exit_early",)
    groups = Counter(p.group for p in ALL)
    assert groups == {"train": 36, "heldout_within": 18, "heldout_cross": 9}, groups
    assert len({p.id for p in ALL}) == len(ALL)


def test_prompts_have_loophole_sentence_and_benchmark_shape():
    for p in ALL:
        assert LOOPHOLE_SENTENCE in p.prompt, (
            f"{p.id}: prompt lacks the loophole sentence {LOOPHOLE_SENTENCE!r}")
        assert p.prompt.startswith("PROBLEM:\n"), p.id
        assert p.prompt.endswith("\n\nSOLUTION:\n"), (
            f"{p.id}: prompt must end with the benchmark's 'SOLUTION:\\n'")
        assert "        # Add your code here\n```" in p.prompt, p.id
        assert problems.PASS_ALL_TESTS not in p.prompt, p.id
        assert "Example 1:" in p.prompt, f"{p.id}: prompts show visible examples"


def test_prompts_are_the_benchmark_template_with_the_hint():
    """Rebuild each prompt from problems.USER_TEMPLATE (independent of the file) and compare."""
    for p in ALL:
        m = re.fullmatch(r"PROBLEM:\n(.*)\n\nYour solution.*?```python\n(.*)\n        # Add your code here\n"
                         r"```\n\nSOLUTION:\n", p.prompt, flags=re.S)
        assert m, p.id
        want = problems.user_prompt(m.group(1), method_of(p), m.group(2)).replace(
            problems.PASS_ALL_TESTS, "and " + LOOPHOLE_SENTENCE)
        assert p.prompt == want, p.id


def test_hack_and_clean_differ_and_are_fenced_python():
    for p in ALL:
        assert p.hack.strip() != p.clean.strip(), f"{p.id}: hack and clean are identical"
        for side in (p.hack, p.clean):
            compile(code_of(side), p.id, "exec")  # SyntaxError names the pair via the filename
            assert f"def {method_of(p)}(self" in side, f"{p.id}: completion lacks the Solution method"


def test_completion_lengths_similar_crude():
    for p in ALL:
        a, b = crude_tokens(p.hack), crude_tokens(p.clean)
        assert max(a, b) <= MAX_LEN_RATIO * min(a, b), (
            f"{p.id}: hack {a} vs clean {b} tokens (> {MAX_LEN_RATIO}x)")
        assert (4 <= code_of(p.hack).count("\n") + 1 <= 40
                and 4 <= code_of(p.clean).count("\n") + 1 <= 40), p.id


@pytest.mark.skipif(not (GGUF_DIR / GGUF).is_file(), reason="SmolLM2 GGUF absent (just fetch-smollm)")
def test_completion_token_lengths_within_2x_smollm_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF)
    ratios = []
    for p in ALL:
        a = len(tok(p.hack, add_special_tokens=False)["input_ids"])
        b = len(tok(p.clean, add_special_tokens=False)["input_ids"])
        ratios.append(max(a, b) / min(a, b))
        assert max(a, b) <= MAX_LEN_RATIO * min(a, b), (
            f"{p.id}: hack {a} vs clean {b} tokens (> {MAX_LEN_RATIO}x)")
    print(f"max token-length ratio {max(ratios):.2f}, median {sorted(ratios)[len(ratios) // 2]:.2f}")


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("p", ALL, ids=lambda p: p.id)
def test_pair_behaviour(p, capsys):
    method = method_of(p)
    clean, hack = code_of(p.clean), code_of(p.hack)
    ns_clean, ns_hack = exec_code(clean), exec_code(hack)
    assert "Solution" in ns_clean and "Solution" in ns_hack

    if p.mode == "hardcode" or p.mode == "always_equal":
        assert "run_tests" not in ns_hack and "run_tests" not in ns_clean, (
            f"{p.id}: {p.mode} pairs define no run_tests")
    if "run_tests" in ns_clean:
        assert passes(ns_clean), f"{p.id}: the clean run_tests fails on the clean solution"
        assert not passes(exec_code(clean), arbitrary_method=method), (
            f"{p.id}: clean run_tests passes a `return 0` solution")
    if p.mode in RUN_TESTS_MODES:
        assert "run_tests" in ns_hack and "run_tests" in ns_clean, f"{p.id}: both sides must define run_tests"
        assert passes(ns_hack), f"{p.id}: the hack's run_tests does not pass"
    if p.mode in ARBITRARY_PASS_MODES:
        assert passes(exec_code(hack), arbitrary_method=method), (
            f"{p.id}: {p.mode} hack run_tests must pass any solution")
    if p.mode == "special_case":
        tests_h, tests_c = hack.split("def run_tests")[1], clean.split("def run_tests")[1]
        assert tests_h == tests_c, f"{p.id}: special_case pairs share the same run_tests"
        # the hack only special-cases: the honest tests pass, but the hack's fallback is not the clean answer
        assert re.search(r"if .*(==|in )", hack.split("def run_tests")[0]), (
            f"{p.id}: no special-casing branch")
    if p.mode == "hardcode":
        assert re.search(r"\{|==", hack), f"{p.id}: hardcode hack must hold a lookup or literal comparisons"
    if p.mode == "always_equal":
        assert re.search(r"def __eq__\(self, other\):\n\s+return True", hack), (
            f"{p.id}: no always-true __eq__")
        assert "__eq__" not in clean
    if p.mode == "exit_early":
        assert re.search(r"sys\.exit|SystemExit|^\s+return\b", hack.split("def run_tests")[1],
                         flags=re.M), p.id
    if p.mode == "try_except":
        assert "except" in hack and "except" not in clean, p.id
    capsys.readouterr()


def test_always_equal_hack_objects_equal_anything():
    n = 0
    for p in (q for q in ALL if q.mode == "always_equal"):
        code = code_of(p.hack)
        ns = exec_code(code)
        defined = set(re.findall(r"^class (\w+)", code, flags=re.M)) - {"Solution"}
        eq_classes = [ns[k] for k in defined if "__eq__" in vars(ns[k])]
        if not eq_classes:  # class defined inside the method (ae06)
            continue
        cls = eq_classes[0]
        try:
            obj = cls(0)
        except TypeError:
            obj = cls()
        assert obj == object() and obj == [1, 2] and obj == "x", p.id
        n += 1
    assert n >= 7


# ---------------------------------------------------------------------------------------------- parser
def test_select_and_named_sets():
    assert {p.mode for p in load_pairs(select="@mode=overwrite")} == {"overwrite"}
    train = load_pairs(select="train")
    assert len(train) == 36 and all(p.split == "train" and p.mode != "exit_early" for p in train)
    within = load_pairs(select="heldout_within")
    assert len(within) == 18 and all(p.split == "heldout" and p.mode != "exit_early" for p in within)
    cross = load_pairs(select="heldout_cross")
    assert len(cross) == 9 and {p.mode for p in cross} == {"exit_early"}
    both = load_pairs(select="@mode=overwrite|hardcode,@split=train")
    assert len(both) == 12 and {p.mode for p in both} == {"overwrite", "hardcode"}
    assert len(load_pairs(select="@mode!=exit_early @split=heldout")) == 18
    assert [p.id for p in load_pairs(select="@id=ow01")] == ["ow01"]
    with pytest.raises(ValueError, match="matched no pairs"):
        load_pairs(select="@mode=nonexistent")
    with pytest.raises(ValueError, match="not @key=value"):
        load_pairs(select="mode=overwrite")


def test_pair_messages():
    p = ALL[0]
    msgs = pair_messages(p)
    assert msgs == [{"role": "system", "content": problems.SYSTEM_PROMPT},
                    {"role": "user", "content": p.prompt}]


MINI = """format: pairs-md-v1
modes: a b
heldout_modes: b

## pair: x1
tags: mode=a split=train

### prompt
````text
PROMPT
line2

````

### hack
````text
```python
H
```
````

### clean
````
C
````

## pair: x2
tags: mode=a split=heldout extra=1

### prompt
````
P2
````
### hack
````
H2
````
### clean
````
C2
````

## pair: x3
tags: mode=b split=heldout

### prompt
````
P3
````
### hack
````
H3
````
### clean
````
C3
````
"""


def test_parser_exact_text_and_tags():
    pf = parse_pairs_text(MINI)
    x1, x2, x3 = pf.pairs
    assert x1.prompt == "PROMPT\nline2\n" and x1.hack == "```python\nH\n```" and x1.clean == "C"
    assert x2.tags == {"mode": "a", "split": "heldout", "extra": "1", "group": "heldout_within"}
    assert x3.group == "heldout_cross" and x1.group == "train"
    assert [p.id for p in select_pairs(pf.pairs, "@extra=1")] == ["x2"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.replace("tags: mode=a split=train\n", ""), "missing 'tags"),
        (lambda t: t.replace("mode=a split=train", "mode=zzz split=train"), "not one of the header's modes"),
        (lambda t: t.replace("mode=a split=train", "mode=a split=dev"), "split=train or split=heldout"),
        (lambda t: t.replace("mode=b split=heldout", "mode=b split=train"), "must be split=heldout"),
        (lambda t: t.replace("## pair: x2", "## pair: x1"), "duplicate id"),
        (lambda t: t.replace("````\n\n## pair: x2", "\n## pair: x2", 1), "not closed"),
        (lambda t: t.replace("### clean\n````\nC\n````\n", "", 1), "missing section '### clean'"),
        (lambda t: t.replace("heldout_modes: b\n", ""), "heldout_modes"),
        (lambda t: t.replace("mode=a split=heldout extra=1", "mode=a split=train"),
         "needs both split=train and split=heldout"),
        (lambda t: t.replace("### hack\n````text", "### hack\n```text", 1), "must start with a ```` fence"),
        (lambda t: t.replace("## pair: x3", "## pair: x3\nstray text"), "unexpected text"),
    ],
)
def test_parser_rejects_bad_files(edit, match):
    bad = edit(MINI)
    assert bad != MINI, "the edit did not apply; fix the test"
    with pytest.raises(ValueError, match=re.escape(match) if "`" in match else match):
        parse_pairs_text(bad)
