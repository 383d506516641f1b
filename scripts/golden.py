"""Golden outputs of `just smoke` for refactors: record a digest of every arm's run, then compare two digests.

    python scripts/golden.py record out/golden/before.json              # fresh pool + v_hack, smoke, digest
    python scripts/golden.py record out/golden/after.json
    python scripts/golden.py compare out/golden/before.json out/golden/after.json   # exit 1 on any difference

A digest holds, per arm: log.tsv without the timing / memory columns, the sha256 of every tensor of the final
checkpoint's adapter, eval.json, and every rollout row (grade minus its `seconds`). The synthetic pool and the
smoke v_hack are rebuilt first and hashed too, so a change to their builders shows. A refactor must leave the
digest identical; a behaviour change shows exactly which arm and field moved.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent
TIMING_COLUMNS = {"t_gen", "t_grade", "t_train", "t_step", "peak_mem_gb"}
POOL = ROOT / "out/pools/synthetic-tiny-random"
VHACK = ROOT / "out/vhack/smoke-tiny-random.safetensors"


@dataclass
class GoldenConfig:
    """Record or compare golden smoke digests."""

    action: tyro.conf.Positional[Literal["record", "compare"]]
    """record: run smoke and write a digest; compare: diff two digests"""
    paths: tyro.conf.Positional[tuple[str, ...]]
    """record: the digest to write; compare: the two digests"""
    arms: tuple[str, ...] = ()
    """arms to run (empty = every arm smoke runs)"""
    steps: int = 3
    """smoke steps per arm"""
    smoke_args: tuple[str, ...] = ()
    """extra scripts/smoke.py flags, e.g. --smoke-args --surgery-on grad"""


def tensor_hashes(path: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(load_file(str(path)).items())}


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl.gz with each grade's timing (`seconds`) dropped."""
    rows = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            r = json.loads(line)
            r.get("grade", {}).pop("seconds", None)
            rows.append(r)
    return rows


def pool_hash(pool: Path) -> str:
    rows = [r for f in sorted(pool.glob("*.jsonl.gz")) for r in read_rows(f)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def digest_run(run: Path) -> dict:
    with (run / "log.tsv").open() as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS}
                for r in csv.DictReader(f, delimiter="\t")]
    latest = (run / "ckpt" / "latest").read_text().strip()
    rollouts = [r for f in sorted((run / "rollouts").glob("step_*.jsonl.gz")) for r in read_rows(f)]
    return {"log": rows, "adapter": tensor_hashes(run / "ckpt" / latest / "adapter.safetensors"),
            "eval": json.loads((run / "eval.json").read_text()),
            "rollouts_sha": hashlib.sha256(json.dumps(rollouts, sort_keys=True).encode()).hexdigest(),
            "rollouts_first": rollouts[:2]}


def record(out: Path, arms: tuple[str, ...], steps: int, smoke_args: tuple[str, ...] = ()) -> None:
    shutil.rmtree(POOL, ignore_errors=True)
    VHACK.unlink(missing_ok=True)
    name = f"golden-{out.stem}"
    shutil.rmtree(ROOT / "out/runs" / name, ignore_errors=True)
    cmd = [sys.executable, "scripts/smoke.py", "--name", name, "--steps", str(steps)]
    if arms:
        cmd += ["--arms", *arms]
    cmd += list(smoke_args)
    subprocess.run(cmd, check=True, cwd=ROOT)
    digest = {"pool": pool_hash(POOL), "vhack": tensor_hashes(VHACK),
              "arms": {d.name: digest_run(d) for d in sorted((ROOT / "out/runs" / name).iterdir())
                       if d.is_dir()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(digest, indent=1, sort_keys=True))
    print(f"[golden] {len(digest['arms'])} arms -> {out}")


def diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in {'first' if k in a else 'second'}" for k in sorted(a.keys() ^ b.keys())]
        for k in sorted(a.keys() & b.keys()):
            out += diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [f"{path}: {str(a)[:80]!r} != {str(b)[:80]!r}"]


def main(cfg: GoldenConfig) -> None:
    if cfg.action == "record":
        assert len(cfg.paths) == 1, "record takes one path: the digest to write"
        record(Path(cfg.paths[0]), cfg.arms, cfg.steps, cfg.smoke_args)
        return
    assert len(cfg.paths) == 2, "compare takes two digests"
    missing = [p for p in cfg.paths if not Path(p).exists()]
    if missing:
        sys.exit(f"golden: {missing[0]} does not exist; "
                 "record it first (python scripts/golden.py record PATH)")
    a, b = (json.loads(Path(p).read_text()) for p in cfg.paths)
    d = diff(a, b)
    print("\n".join(d[:60]) or "[golden] identical")
    sys.exit(1 if d else 0)


if __name__ == "__main__":
    main(tyro.cli(GoldenConfig))
