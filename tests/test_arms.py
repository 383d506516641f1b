"""arms.ARMS against an expectation table written out by hand here (a wrong table entry fails), and
docs/arms.md's table against ARMS (the docs list exactly the arms the code has, with the same properties)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import arms

ROOT = Path(__file__).resolve().parent.parent

# name: (direction, surgery, trains a quarantine, per-rollout gradients, logs column group, placebo of, oracle)
EXPECTED = {
    "vanilla": ("none", "measure", False, False, "", "", False),
    "measure": ("vhack", "measure", False, False, "", "", False),
    "erase": ("vhack", "erase", False, False, "", "", False),
    "route": ("vhack", "route", True, False, "", "", False),
    "erase-random": ("random", "erase", False, False, "", "erase", False),
    "route-random": ("random", "route", True, False, "", "route", False),
    "oracle-penalty": ("none", "measure", False, False, "", "", True),
    "gate-route": ("vhack", "measure", True, True, "gate", "", False),
    "gate-route-random": ("random", "measure", True, True, "gate", "gate-route", False),
    "gate-random": ("none", "measure", True, True, "gate", "gate-route", False),
    "vanilla-2x": ("none", "measure", True, False, "", "", False),
    "shrinkage": ("vhack", "measure", False, False, "", "", False),
    "am": ("none", "measure", False, False, "am", "", False),
}


def test_arm_table_matches_the_hand_written_expectations():
    assert set(arms.ARMS) == set(EXPECTED), f"arms differ: {set(arms.ARMS) ^ set(EXPECTED)}"
    for name, (direction, surgery, quar, per_sample, cols, placebo, oracle) in EXPECTED.items():
        a = arms.ARMS[name]
        got = (a.direction, a.surgery, a.quarantine, a.per_sample, a.columns, a.placebo_of, a.oracle)
        assert got == (direction, surgery, quar, per_sample, cols, placebo, oracle), f"{name}: {got}"


def test_random_arms_never_use_vhack_and_gate_arms_have_their_hook():
    for name, a in arms.ARMS.items():
        if name.endswith("-random") and name != "gate-random":
            assert a.direction == "random", f"{name} must use a random direction, not v_hack"
        if name.startswith("gate-"):
            assert a.grad_hook in arms.GRAD_HOOKS and a.per_sample, f"{name} would silently run as vanilla"
    assert arms.ARMS["shrinkage"].grad_hook == "shrink" and arms.ARMS["am"].reward_hook == "am"


def test_aliases_and_unknown_arm_error():
    assert arms.get("projected").name == "erase"
    with pytest.raises(ValueError, match="arm='nope' is not an arm"):
        arms.get("nope")


def test_docs_arms_table_lists_every_arm_with_its_properties():
    text = (ROOT / "docs/arms.md").read_text()
    doc = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # "\|" inside a cell is not a separator
        m = re.match(r"`([a-z0-9-]+)`", cells[0]) if len(cells) >= 4 else None
        if m:  # | arm | surgery | trains | direction | ...
            doc[m.group(1)] = (cells[3], cells[1], cells[2])
    assert set(doc) == set(arms.ARMS), f"docs/arms.md table vs ARMS: {set(doc) ^ set(arms.ARMS)}"
    for name, (direction, _surgery, trains) in doc.items():
        a = arms.ARMS[name]
        assert ("delta_S_hack" in trains) == a.quarantine, f"docs/arms.md {name}: 'trains' column vs quarantine"
        if a.direction == "random":
            assert "random" in direction.lower(), f"docs/arms.md {name}: direction column must say random"
        if a.direction == "vhack":
            assert "v_hack" in direction, f"docs/arms.md {name}: direction column must say v_hack"
