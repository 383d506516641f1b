"""Every tracked Python file keeps its lines within 110 characters (issue 14), checked with ruff's E501.

    .venv/bin/python -m pytest tests/test_style.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 110


def test_no_line_over_the_limit():
    files = [f for f in subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT,
                                       capture_output=True, text=True, check=True).stdout.split() if f]
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.exists(), f"{ruff} missing: run `bash scripts/setup.sh` (ruff is in the dev extra)"
    p = subprocess.run([str(ruff), "check", "--no-cache", "--isolated", "--select", "E501",
                        f"--line-length={LIMIT}", "--output-format", "concise", *files], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, (f"lines over {LIMIT} characters (wrap them):\n"
                               f"{p.stdout[-4000:]}{p.stderr[-1000:]}")
