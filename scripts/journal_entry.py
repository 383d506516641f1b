"""journal_entry.py: prepend a dated, pre-filled entry skeleton for a summarized sweep to RESEARCH_JOURNAL.md.

    python scripts/journal_entry.py SWEEP                      # after scripts/summarize.py SWEEP
    python scripts/journal_entry.py SWEEP --journal /tmp/J.md --out-root /tmp/out --date 2026-11-21

Newest first: the entry goes after the journal's header (everything before the first `## ` heading) and
before the older entries. It carries the sweep's config (from sweep.json), the primary comparison, the
missing runs and the final deploy table (from results.md), the plot paths and TODO slots that the
researcher fills in (what the plots show, what it means, what is still unverified). Refuses a journal file
that does not exist (it never creates one).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
from cli import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    sweep: tyro.conf.Positional[str]
    journal: Path = REPO / "RESEARCH_JOURNAL.md"
    out_root: Path = REPO / "out"
    date: str = ""
    """YYYY-MM-DD; default today"""


def section(md: str, title_prefix: str) -> str:
    """The body of the first `## <title_prefix>...` section of results.md (heading included), or ''."""
    out, inside = [], False
    for line in md.splitlines():
        if line.startswith("## "):
            if inside:
                break
            inside = line[3:].startswith(title_prefix)
        if inside:
            out.append(line)
    return "\n".join(out).strip()


def entry_text(c: Config) -> str:
    d = c.out_root / "sweeps" / c.sweep
    results = d / "results.md"
    if not results.exists():
        raise UserError(f"{results} not found: run `python scripts/summarize.py {c.sweep}` first")
    md = results.read_text()
    man_path = d / "sweep.json"
    man = json.loads(man_path.read_text()) if man_path.exists() else {"runs": {}, "submissions": []}
    subs = man.get("submissions", [])
    last = subs[-1] if subs else {}
    arms = sorted({r["arm"] for r in man["runs"].values()})
    seeds = sorted({int(r["seed"]) for r in man["runs"].values()})
    commands = sorted({r["command"] for r in man["runs"].values()})
    date = c.date or datetime.date.today().isoformat()
    rel = d.relative_to(REPO) if d.resolve().is_relative_to(REPO) else d
    L = [f"## {date} — sweep `{c.sweep}`: TODO one-line conclusion", "",
         f"- **What ran:** preset `{man.get('preset', '?')}`, arms {', '.join(arms) or '?'}, seeds "
         f"{', '.join(map(str, seeds)) or '?'}, overrides `{' '.join(last.get('set', [])) or 'none'}`, "
         f"git {last.get('git_sha', '?')[:10]}, backend {last.get('backend', '?')}, "
         f"v_hack `{man.get('vhack', '?')}`.",
         f"- **Commands:** `python scripts/sweep.py ...` submitted {len(commands)} train runs, e.g.",
         f"  `{commands[0]}`" if commands else "  (none recorded)",
         f"- **Summary:** `python scripts/summarize.py {c.sweep}` -> `{rel}/results.md`, "
         f"`{rel}/results.tsv`.", ""]
    for title in ("Primary comparison", "Missing or incomplete runs", "Final eval"):
        s = section(md, title)
        if s:
            L += [s.replace("## ", "#### ", 1), ""]
    L += ["- **Plots** (looked at: TODO describe what each shows):"]
    L += [f"  - `{rel}/{p}`: TODO"
          for p in ("hack_vs_step.png", "pass_vs_step.png", "hack_vs_pass.png", "projection_vs_step.png")]
    L += ["- **What it means:** TODO (the preregistered claim first, as results.md states it; then, labelled "
          "exploratory, which other flags fired, WORSE flags included)",
          "- **Still unverified / next:** TODO", "", ""]
    return "\n".join(L)


def insert_entry(journal_text: str, entry: str) -> str:
    """Insert before the first `## ` heading (the newest entry), or append when there is none."""
    lines = journal_text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("## "):
            return "".join(lines[:i]) + entry + "".join(lines[i:])
    sep = "" if journal_text.endswith("\n\n") else ("\n" if journal_text.endswith("\n") else "\n\n")
    return journal_text + sep + entry


def main(c: Config) -> Path:
    if not c.journal.exists():
        raise UserError(f"--journal {c.journal} does not exist; point it at RESEARCH_JOURNAL.md")
    c.journal.write_text(insert_entry(c.journal.read_text(), entry_text(c)))
    print(f"[journal-entry] added a skeleton for sweep {c.sweep} to {c.journal}: fill in the TODOs")
    return c.journal


if __name__ == "__main__":
    cli.run(lambda: main(tyro.cli(Config)))
