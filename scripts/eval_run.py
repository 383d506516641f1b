"""Evaluate a run's newest sound checkpoint with the run's own config (its config.json): no flags to repeat.

    python scripts/eval_run.py out/runs/<run>                                # what `just eval <run>` runs
    python scripts/eval_run.py <run> --eval-problems 8 --eval-samples 2      # a name under out/runs works too

Flags after the run are train.py flags applied on top of the saved config; only the evaluation fields
(train.EVAL_FIELDS) may differ from it without --force-resume. Writes
out/runs/<run>/evals/eval-<YYYYmmdd-HHMMSS>.json; the run's eval.json, eval.tsv and evals/step_*.json are left
as they are.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402


def run_dir_of(arg: str) -> Path:
    """An existing directory as given, else out/runs/<arg>; UserError unless it holds a config.json."""
    for d in (Path(arg), ROOT / "out" / "runs" / arg):
        if (d / "config.json").is_file():
            return d
    raise cli.UserError(f"run {arg!r}: neither {arg} nor out/runs/{arg} holds a config.json; "
                        "pass a run directory (ls out/runs/)")


def main(argv: list[str]) -> Path:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return Path()
    run_dir = run_dir_of(argv[0])
    import runs
    import train
    import tyro

    saved = runs.config_from_run(run_dir, train.TrainConfig)
    cfg = tyro.cli(train.TrainConfig, default=saved, args=argv[1:])
    cfg = dataclasses.replace(cfg, eval_only=True, resume=str(run_dir), run_name="")
    return train.main(cfg)


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
