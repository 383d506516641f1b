"""The top-level modules form a DAG: no import cycle (lazy imports inside functions count too), and no library
module imports an entry script (train.py, extract_vhack_grad.py, probe_distill.py) or anything in scripts/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = {"train", "extract_vhack_grad", "probe_distill"}
SCRIPTS = {p.stem for p in (ROOT / "scripts").glob("*.py")}


def project_imports(path: Path, names: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth of the file (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & names


def graph() -> dict[str, set[str]]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    return {m: project_imports(p, set(mods) | SCRIPTS) - {m} for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m, stack + [m])):
                return c
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n, [n])):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_top_level_modules():
    g = graph()
    assert {"train", "grpo", "arms", "runs", "antipasto", "gate"} <= set(g), sorted(g)
    assert find_cycle(g) is None, f"import cycle: {' -> '.join(find_cycle(g))}"


def test_library_modules_import_no_entry_script_and_no_script():
    bad = {m: sorted(deps & (ENTRY_SCRIPTS | SCRIPTS)) for m, deps in graph().items()
           if m not in ENTRY_SCRIPTS and deps & (ENTRY_SCRIPTS | SCRIPTS)}
    assert not bad, f"library modules importing entry scripts or scripts/: {bad}"


def test_train_py_stays_a_short_script():
    n = len((ROOT / "train.py").read_text().splitlines())
    assert n <= 600, f"train.py has {n} lines; move library code to grpo.py / arms.py / runs.py"
