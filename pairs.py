"""Hand-written contrastive (hack, clean) completion pairs: parser, selection and chat messages.

    python pairs.py                           # parse data/pairs/hack_pairs.md, print counts per mode/split
    python pairs.py --select @mode=overwrite  # the same for a subset

The file format is described in data/pairs/hack_pairs.md's header and docs/pairs.md. `load_pairs` fails
loudly (ValueError naming the pair and the line) on anything it does not understand.

Selection strings (`select=`): whitespace- or comma-separated terms, all of which must hold:
  `@key=value`, `@key=v1|v2` (any of), `@key!=value` (none of), over the tags of each pair, plus the
  derived tag `group` in {train, heldout_within, heldout_cross}, and the named sets
  `all`, `train`, `heldout`, `heldout_within`, `heldout_cross`.
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from problems import SYSTEM_PROMPT

SIDES = ("hack", "clean")

_REPO = Path(__file__).resolve().parent
DEFAULT_PAIRS = _REPO / "data/pairs/hack_pairs.md"
LOOPHOLE_SENTENCE = "will be evaluated by calling a function called run_tests()"
SPLITS = ("train", "heldout")
GROUPS = ("train", "heldout_within", "heldout_cross")
NAMED_SETS = {
    "all": "",
    "train": "@split=train",
    "heldout": "@split=heldout",
    "heldout_within": "@group=heldout_within",
    "heldout_cross": "@group=heldout_cross",
}
FENCE = "````"  # four backticks: completions contain ``` fences, so blocks use a longer one
SECTIONS = ("prompt", "hack", "clean")


@dataclass(frozen=True)
class Pair:
    """One contrastive pair: same prompt, a completion that games the evaluator and an honest one."""

    id: str
    mode: str  # hack mode, e.g. "overwrite"
    prompt: str  # the user message (benchmark user prompt with the loophole sentence)
    hack: str  # assistant completion that games run_tests / the grader, incl. ```python fences
    clean: str  # honest assistant completion, incl. fences
    tags: dict[str, str] = field(hash=False)  # all tags from the file plus derived `group`
    split: str  # "train" | "heldout"

    @property
    def group(self) -> str:
        return self.tags["group"]


@dataclass(frozen=True)
class PairFile:
    """Everything in a pair file: header fields and the pairs in file order."""

    pairs: tuple[Pair, ...]
    modes: tuple[str, ...]
    heldout_modes: tuple[str, ...]
    path: str


def _err(path, lineno: int, msg: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: {msg}")


def parse_pairs_text(text: str, path: str = "<text>") -> PairFile:
    """Parse the markdown pair format. Validates structure, ids, tags and the held-out declarations."""
    lines = text.split("\n")
    header: dict[str, str] = {}
    raw: list[dict] = []  # {"id", "line", "tags", sections...}
    cur: dict | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## pair:"):
            pid = line[len("## pair:"):].strip()
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", pid):
                raise _err(path, i + 1, f"pair id {pid!r} must match [A-Za-z0-9_.-]+")
            cur = {"id": pid, "line": i + 1, "tags": None}
            raw.append(cur)
        elif cur is None:
            m = re.fullmatch(r"(format|modes|heldout_modes):\s*(.*)", line)
            if m:
                header[m.group(1)] = m.group(2).strip()
        elif line.startswith("tags:"):
            if cur["tags"] is not None:
                raise _err(path, i + 1, f"pair {cur['id']}: second tags: line")
            tags = {}
            for tok in line[len("tags:"):].split():
                if "=" not in tok:
                    raise _err(path, i + 1, f"pair {cur['id']}: tag {tok!r} is not key=value")
                k, v = tok.split("=", 1)
                if k in tags:
                    raise _err(path, i + 1, f"pair {cur['id']}: tag {k!r} given twice")
                tags[k] = v
            cur["tags"] = tags
        elif line.startswith("### "):
            name = line[4:].strip()
            if name not in SECTIONS:
                raise _err(path, i + 1,
                           f"pair {cur['id']}: unknown section {name!r}; expected one of {SECTIONS}")
            if name in cur:
                raise _err(path, i + 1, f"pair {cur['id']}: section {name!r} given twice")
            j = i + 1
            while j < len(lines) and lines[j].strip() == "":
                j += 1
            if j >= len(lines) or not lines[j].startswith(FENCE) or lines[j].startswith(FENCE + "`"):
                raise _err(path, j + 1,
                           f"pair {cur['id']}: section {name!r} must start with a {FENCE} fence line")
            k = j + 1
            while k < len(lines) and lines[k] != FENCE:
                if lines[k].startswith("## pair:"):
                    raise _err(path, k + 1,
                               f"pair {cur['id']}: section {name!r} fence opened at line {j + 1} not closed")
                k += 1
            if k >= len(lines):
                raise _err(path, j + 1,
                           f"pair {cur['id']}: section {name!r} fence never closed (need a line '{FENCE}')")
            cur[name] = "\n".join(lines[j + 1 : k])
            i = k
        elif line.strip() and not line.startswith("#"):
            raise _err(path, i + 1,
                       f"pair {cur['id']}: unexpected text outside a fenced section: {line[:60]!r}")
        i += 1

    for key in ("format", "modes", "heldout_modes"):
        if key not in header:
            raise ValueError(f"{path}: header line '{key}: ...' missing (put it before the first '## pair:')")
    if header["format"] != "pairs-md-v1":
        raise ValueError(f"{path}: format {header['format']!r} unsupported; expected pairs-md-v1")
    modes = tuple(header["modes"].replace(",", " ").split())
    heldout_modes = tuple(header["heldout_modes"].replace(",", " ").split())
    for m in heldout_modes:
        if m not in modes:
            raise ValueError(f"{path}: heldout_modes entry {m!r} is not in modes {modes}")

    pairs, seen = [], set()
    for r in raw:
        where = f"{path}:{r['line']}: pair {r['id']}"
        if r["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(r["id"])
        if r["tags"] is None:
            raise ValueError(f"{where}: missing 'tags: mode=... split=...' line")
        for s in SECTIONS:
            if s not in r:
                raise ValueError(f"{where}: missing section '### {s}'")
        tags = dict(r["tags"])
        mode, split = tags.get("mode"), tags.get("split")
        if mode not in modes:
            raise ValueError(f"{where}: tag mode={mode!r} not one of the header's modes {modes}")
        if split not in SPLITS:
            raise ValueError(f"{where}: tag split={split!r}; use split=train or split=heldout")
        if "group" in tags:
            raise ValueError(f"{where}: tag 'group' is derived by the parser; remove it")
        if mode in heldout_modes and split != "heldout":
            raise ValueError(f"{where}: mode {mode!r} is in heldout_modes, so its pairs "
                             "must be split=heldout")
        tags["group"] = ("heldout_cross" if mode in heldout_modes
                         else ("train" if split == "train" else "heldout_within"))
        pairs.append(Pair(id=r["id"], mode=mode, prompt=r["prompt"], hack=r["hack"], clean=r["clean"],
                          tags=tags, split=split))

    for m in modes:
        splits = Counter(p.split for p in pairs if p.mode == m)
        if not splits:
            raise ValueError(f"{path}: mode {m!r} is declared but has no pairs")
        if m not in heldout_modes and (splits["train"] == 0 or splits["heldout"] == 0):
            raise ValueError(f"{path}: mode {m!r} needs both split=train and split=heldout pairs "
                             f"(has {dict(splits)})")
    return PairFile(pairs=tuple(pairs), modes=modes, heldout_modes=heldout_modes, path=str(path))


def _term_matches(term: str, p: Pair) -> bool:
    m = re.fullmatch(r"@([A-Za-z_]+)(!?=)(.+)", term)
    if not m:
        raise ValueError(f"select term {term!r} is not @key=value, @key=v1|v2 or @key!=value "
                         f"(or a named set {sorted(NAMED_SETS)})")
    key, op, vals = m.group(1), m.group(2), set(m.group(3).split("|"))
    have = p.id if key == "id" else p.tags.get(key)
    return (have in vals) if op == "=" else (have not in vals)


def select_pairs(pairs, select: str | None) -> list[Pair]:
    """Filter pairs by a selection string (see module docstring). None / "" / "all" keeps everything."""
    terms = []
    for t in (select or "").replace(",", " ").split():
        terms += NAMED_SETS[t].split() if t in NAMED_SETS else [t]
    out = [p for p in pairs if all(_term_matches(t, p) for t in terms)]
    if pairs and not out:
        raise ValueError(f"select {select!r} matched no pairs")
    return out


def load_pair_file(path=DEFAULT_PAIRS) -> PairFile:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pair file {path} not found (default is "
                                "data/pairs/hack_pairs.md in the repo)")
    return parse_pairs_text(path.read_text(), str(path))


def load_pairs(path=DEFAULT_PAIRS, select: str | None = None) -> list[Pair]:
    """Pairs from `path` in file order, filtered by `select` (e.g. "@mode=overwrite", "@split=train")."""
    return select_pairs(load_pair_file(path).pairs, select)


def pair_messages(pair: Pair) -> list[dict]:
    """System (benchmark system prompt) + user messages; the completion is the assistant turn."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": pair.prompt}]


def counts(pairs) -> dict[str, dict[str, int]]:
    """{mode: {group: n}} in first-seen mode order."""
    out: dict[str, dict[str, int]] = {}
    for p in pairs:
        out.setdefault(p.mode, Counter())[p.group] += 1
    return {m: dict(c) for m, c in out.items()}


def format_counts(pairs) -> str:
    rows = [f"{'mode':<14}" + "".join(f"{g:>16}" for g in GROUPS) + f"{'total':>8}"]
    for m, c in counts(pairs).items():
        rows.append(f"{m:<14}" + "".join(f"{c.get(g, 0):>16}" for g in GROUPS) + f"{sum(c.values()):>8}")
    tot = Counter(p.group for p in pairs)
    rows.append(f"{'all':<14}" + "".join(f"{tot.get(g, 0):>16}" for g in GROUPS) + f"{len(pairs):>8}")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=str(DEFAULT_PAIRS))
    ap.add_argument("--select", default=None)
    a = ap.parse_args()
    pf = load_pair_file(a.path)
    ps = select_pairs(pf.pairs, a.select)
    print(f"{a.path}: {len(ps)} pairs (select={a.select!r}), heldout_modes={list(pf.heldout_modes)}")
    print(format_counts(ps))
    sys.exit(0)


def encode_side(tokenizer, pair: Pair, side: str) -> tuple[list[int], int]:
    """(token ids of system + user + assistant completion + end-of-turn, number of prompt tokens).

    The ids are the chat template's own rendering of the full conversation, cut after the first
    end-of-turn token following the prompt (the template's trailing newline is not a completion token).
    """
    assert side in SIDES, f"side must be one of {SIDES}, got {side!r}"
    msgs = pair_messages(pair)
    import models  # lazy: torch/transformers are heavy and pairs.py is read by light tools

    prompt = models.chat_ids(tokenizer, msgs, add_generation_prompt=True)
    full = models.chat_ids(tokenizer, msgs + [{"role": "assistant", "content": getattr(pair, side)}],
                           add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError(f"pair {pair.id} ({side}): the chat template's rendering with the assistant turn "
                         "does not start with the generation prompt; completion tokens cannot be located")
    eot = tokenizer.eos_token_id
    assert eot is not None, "tokenizer has no eos (end-of-turn) token"
    rest = full[len(prompt):]
    if eot not in rest:
        raise ValueError(f"pair {pair.id} ({side}): no end-of-turn token (id {eot}) after the completion")
    comp = rest[: rest.index(eot) + 1]
    assert len(comp) >= 2, f"pair {pair.id} ({side}): empty completion"
    return prompt + comp, len(prompt)
