"""arms.ARMS against an expectation table written out by hand here (a wrong table entry fails), and
docs/arms.md's table against ARMS (the docs list exactly the arms the code has, with the same properties)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import arms

ROOT = Path(__file__).resolve().parent.parent

# name: (direction, grad-mode surgery, step edit, trains a quarantine, per-rollout gradients,
#        logs column group, placebo of, oracle)
EXPECTED = {
    "vanilla": ("none", "measure", "none", False, False, "", "", False),
    "measure": ("vhack", "measure", "none", False, False, "", "", False),
    "erase": ("vhack", "erase", "erase", False, False, "", "", False),
    "route": ("vhack", "route", "route", True, False, "", "", False),
    "erase-random": ("random", "erase", "erase", False, False, "", "erase", False),
    "erase-matched": ("vhack", "", "matched", False, False, "", "erase", False),
    "route-random": ("random", "route", "route", True, False, "", "route", False),
    "route-matched": ("vhack", "", "route-matched", True, False, "", "route", False),
    "oracle-penalty": ("none", "measure", "none", False, False, "", "", True),
    "gate-route": ("vhack", "measure", "gate", True, True, "gate", "", False),
    "gate-route-random": ("random", "measure", "gate", True, True, "gate", "gate-route", False),
    "gate-random": ("none", "measure", "gate", True, True, "gate", "gate-route", False),
    "vanilla-2x": ("none", "measure", "copy", True, False, "", "", False),
    "shrinkage": ("vhack", "measure", "shrink", False, False, "", "", False),
    "am": ("none", "measure", "none", False, False, "am", "", False),
}


def test_arm_table_matches_the_hand_written_expectations():
    assert set(arms.ARMS) == set(EXPECTED), f"arms differ: {set(arms.ARMS) ^ set(EXPECTED)}"
    for name, want in EXPECTED.items():
        a = arms.ARMS[name]
        got = (a.direction, a.surgery, a.step_edit, a.quarantine, a.per_sample, a.columns,
               a.placebo_of, a.oracle)
        assert got == want, f"{name}: {got} != {want}"


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
        # "\|" inside a cell is not a separator
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        m = re.match(r"`([a-z0-9-]+)`", cells[0]) if len(cells) >= 4 else None
        if m:  # | arm | edit | trains | direction | controls for | placebo | live labels |
            doc[m.group(1)] = (cells[3], cells[1], cells[2])
    assert set(doc) == set(arms.ARMS), f"docs/arms.md table vs ARMS: {set(doc) ^ set(arms.ARMS)}"
    for name, (direction, edit, trains) in doc.items():
        a = arms.ARMS[name]
        assert f"`{a.step_edit}`" in edit, (
            f"docs/arms.md {name}: edit column must name step edit `{a.step_edit}`")
        assert ("delta_S_hack" in trains) == a.quarantine, (
            f"docs/arms.md {name}: 'trains' column vs quarantine")
        if a.direction == "random":
            assert "random" in direction.lower(), f"docs/arms.md {name}: direction column must say random"
        if a.direction == "vhack":
            assert "v_hack" in direction, f"docs/arms.md {name}: direction column must say v_hack"


def test_random_placebo_directions_are_fresh_per_run_seed(tmp_path):
    """Two run seeds of erase-random, set on the command line as a user does (the preset was built with
    seed 0), get different directions (direction_seed = 1234 + seed in config.json); an explicit
    --direction-seed is kept."""
    import tyro

    import antipasto
    import train
    from tests.tiny_qwen import tiny_model

    def run(*flags):
        args = ["smoke", "--arm", "erase-random", "--steps", "1", "--out-dir", str(tmp_path),
                "--max-problems", "8", "--rollouts-per-step", "8", "--max-new-tokens", "8",
                "--no-eval-at-end", "--grader-workers", "2", "--teacher-pool-dir", "", "--mix-ratio", "0",
                "--run-name", "-".join(flags).replace("--", ""), *flags]
        cfg = tyro.extras.overridable_config_cli(train.PRESETS, args=args)
        assert "--direction-seed" in flags or cfg.direction_seed == -1, (
            "the preset must not resolve the direction seed with its own seed 0")
        return json.loads((train.main(cfg) / "config.json").read_text())["config"]["direction_seed"]

    s1, s2 = run("--seed", "1"), run("--seed", "2")
    assert (s1, s2) == (1235, 1236)
    ads = antipasto.wrap_model(tiny_model())
    d1, d2 = (antipasto.random_directions(ads, seed=s) for s in (s1, s2))
    assert all(abs(float((d1[k] * d2[k]).sum())) < 0.99 for k in ads)
    assert run("--seed", "3", "--direction-seed", "7") == 7
