"""User errors and progress lines for the entry scripts (train.py, extract_vhack_grad.py, probe_distill.py,
scripts/*.py).

    if __name__ == "__main__":
        cli.run(lambda: main(tyro.extras.overridable_config_cli(PRESETS)))

- `UserError` (a ValueError): something the user fixes (a flag out of range, a missing or corrupt file, a run
  directory in the wrong state). Its message names the field or file and the fix, in one line. `run()` prints
  it as `error: <message>` on stderr and exits 2. Any other exception is a programming error and keeps its
  traceback; library code that meets a user error converts it where it knows it is one (e.g. train.validate).
- `Progress`: throttled loguru lines `<desc> k/N (elapsed, eta)` for long phases.
- `StepEta`: a training run's remaining time from step times only, plus the evals still to come.
"""

from __future__ import annotations

import gzip
import re
import socket
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from loguru import logger


class UserError(ValueError):
    """A user-facing error: the message names the field or file and the fix, on one line."""


def run(fn: Callable[[], object]) -> None:
    """Call fn(); a UserError becomes one stderr line and exit status 2; an int result is the exit status."""
    try:
        rc = fn()
    except UserError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    if isinstance(rc, int) and not isinstance(rc, bool):
        sys.exit(rc)


def check_gz(path: str | Path, field: str) -> None:
    """UserError naming `field` and the file unless `path` exists and (for .gz) decompresses to the end."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{field}: {path} does not exist")
    if not path.name.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    # truncated (EOFError), not gzip (BadGzipFile), bad CRC (zlib)
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{field}: {path} does not decompress ({type(e).__name__}: {e or 'truncated'}); "
                        "re-download or regenerate it") from None


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout_s: float = 3.0) -> bool:
    """True if a TCP connection to host:port opens within timeout_s (DNS included)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def cpu_s() -> float:
    """CPU seconds (user + sys) of this process and its reaped children (e.g. the grader's sandboxes) so
    far."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _fmt_s(s: float) -> str:
    s = max(0.0, s)
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f}min" if s < 5400 else f"{s / 3600:.1f}h"


class Progress:
    """`<desc> k/N (elapsed, eta)` as loguru INFO lines: at most one per `every_s` seconds, plus the last one.
    total=None: count and rate only."""

    def __init__(self, desc: str, total: int | None = None, every_s: float = 10.0):
        self.desc, self.total, self.every_s = desc, total, every_s
        self.n, self.t0 = 0, time.time()
        self.t_last = self.t0  # the first line after every_s (every_s=0: one line per item)

    def line(self) -> str:
        el = time.time() - self.t0
        if self.total:
            eta = el / self.n * (self.total - self.n) if self.n else float("nan")
            return (f"{self.desc} {self.n}/{self.total} ({_fmt_s(el)} elapsed, "
                    f"eta {_fmt_s(eta) if self.n else '?'})")
        return f"{self.desc} {self.n} ({_fmt_s(el)} elapsed, {self.n / max(el, 1e-9):.1f}/s)"

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.time()
        if now - self.t_last >= self.every_s or (self.total is not None and self.n >= self.total):
            self.t_last = now
            logger.info(self.line())

    def tick(self, x):
        """Count one item and return x (e.g. `prog.tick(future.result())`)."""
        self.update()
        return x

    def counted(self, fn: Callable) -> Callable:
        """fn wrapped so that every call counts one item."""

        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            self.update()
            return out

        return wrapped


class StepEta:
    """Remaining seconds of a training run: mean step time (the steps this process ran, start-up excluded) x
    steps left, plus the evals still due (eval_every, eval_at_end). An eval's cost is the measured one once a
    periodic eval has run (the wall time between two step updates minus the step's own t_step), else
    estimated from this run's generation + grading seconds per live sequence x the eval's sequences."""

    def __init__(self, steps: int, eval_every: int, eval_at_end: bool, eval_seqs: int):
        (self.steps, self.eval_every, self.eval_at_end,
         self.eval_seqs) = steps, eval_every, eval_at_end, eval_seqs
        self.t_steps: list[float] = []
        self.gen_per_seq: list[float] = []
        self.t_eval: float | None = None
        self.t_last: float | None = None
        self.last_done: int | None = None

    def evals_left(self, done: int) -> int:
        n = sum(1 for k in range(done + 1, self.steps) if self.eval_every and k % self.eval_every == 0)
        return n + int(self.eval_at_end)

    def eval_seconds(self) -> float:
        if self.t_eval is not None:
            return self.t_eval
        return (sum(self.gen_per_seq) / len(self.gen_per_seq) if self.gen_per_seq else 0.0) * self.eval_seqs

    def update(self, done: int, t_step: float, t_gen_grade: float, n_live: int,
               now: float | None = None) -> float:
        """Record step `done` (1-based, finished); returns the remaining seconds."""
        now = time.time() if now is None else now
        if (self.t_last is not None and self.eval_every and self.last_done is not None
                and self.last_done % self.eval_every == 0):
            self.t_eval = max(0.0, now - self.t_last - t_step)  # the gap held the previous step's eval
        self.t_last, self.last_done = now, done
        self.t_steps.append(t_step)
        if n_live:
            self.gen_per_seq.append(t_gen_grade / n_live)
        mean = sum(self.t_steps) / len(self.t_steps)
        return mean * (self.steps - done) + self.evals_left(done) * self.eval_seconds()


def in_range(v: float, spec: str) -> bool:
    """v against a range spec: ">= 1", "> 0", "[0, 1)", "(0, 1]" (bounds as floats)."""
    spec = spec.replace(" ", "")
    if spec[0] in "<>":
        op, bound = (spec[:2], spec[2:]) if spec[1] == "=" else (spec[:1], spec[1:])
        b = float(bound)
        return {">": v > b, ">=": v >= b, "<": v < b, "<=": v <= b}[op]
    assert spec[0] in "[(" and spec[-1] in "])" and "," in spec, f"bad range spec {spec!r}"
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (v >= lo if spec[0] == "[" else v > lo) and (v <= hi if spec[-1] == "]" else v < hi)


def check_ranges(cfg, ranges: dict[str, str], allowed: dict[str, tuple] | None = None) -> None:
    """UserError naming the first field of cfg outside its range (`ranges`: field -> in_range spec, applied to
    every element of a tuple field) or not among its `allowed` values, with the value and the range (not a
    default: a preset has its own, which the parsed config no longer knows)."""
    for field, spec in ranges.items():
        v = getattr(cfg, field)
        if not all(in_range(x, spec) for x in (v if isinstance(v, tuple | list) else (v,))):
            want = re.sub(r"^([<>]=?)", r"\1 ", spec) if spec[0] in "<>" else f"in {spec}"
            raise UserError(f"--{field.replace('_', '-')}={v!r} is out of range: need {field} {want}")
    for field, values in (allowed or {}).items():
        v = getattr(cfg, field)
        if v not in values:
            raise UserError(f"--{field.replace('_', '-')}={v!r}: need one of {list(values)}")


def check_vhack_file(path: str | Path, flag: str, model_id: str, dtype: str | None = None,
                     weights_hash: str | None = None) -> dict:
    """The v_hack file exists, its safetensors header reads and its metadata names `model_id` (and `dtype`,
    and the build's `weights_hash` when given and the file records one); reads the header only. Returns
    the metadata."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}={str(path)!r} does not exist; make it with `just extract-vhack <preset>` "
                        "(out/vhack/<name>.safetensors)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:  # noqa: BLE001 -- not a safetensors file, a truncated header, non-JSON metadata
        raise UserError(f"{flag}={str(path)!r} is not a readable v_hack file ({type(e).__name__}); "
                        "re-extract it with `just extract-vhack <preset>`") from None
    want = {"model_id": model_id, **({"dtype": dtype} if dtype else {}),
            **({"weights_hash": weights_hash} if weights_hash and "weights_hash" in meta else {})}
    for k, v in want.items():
        if meta.get(k) != v:
            raise UserError(f"{flag}={str(path)!r} was extracted with {k}={meta.get(k)!r}, "
                            f"this run has {k}={v!r}; extract one for this model "
                            "(`just extract-vhack <preset>`) or pass its file")
    return meta


def check_pool_dir(pool_dir: str | Path, flag: str) -> None:
    """The teacher pool folder holds step_*.jsonl.gz files and every one decompresses."""
    files = sorted(Path(pool_dir).glob("step_*.jsonl.gz"))
    if not files:
        raise UserError(f"{flag}={str(pool_dir)!r} has no step_*.jsonl.gz files; generate one with `just "
                        "pregen-teacher` (or `python scripts/make_synthetic_pool.py` for smoke)")
    for f in files:
        check_gz(f, flag)


def check_data(data_path: str, default_train: Path, test_file: Path) -> None:
    """The train split (data_path, or with data_path empty default_train or its uncompressed twin) and the
    benchmark test file exist and decompress."""
    if data_path:
        if not Path(data_path).is_file():
            raise UserError(f"--data-path={data_path!r} does not exist; run `just prepare-data` "
                            "(or pass --data-path '' to load LeetCode on the fly)")
        check_gz(data_path, "--data-path")
    else:
        found = [f for f in (default_train, default_train.with_suffix("")) if f.is_file()]
        if not found:
            raise UserError(f"--data-path '' loads {default_train}, which does not exist; set PGRPO_DATA_DIR "
                            "to the LeetCode data folder or pass --data-path out/data/train.jsonl "
                            "(`just prepare-data`)")
        check_gz(found[0], "LeetCode train data (--data-path '' / PGRPO_DATA_DIR)")
    if not test_file.is_file():
        raise UserError(f"benchmark test set {test_file} does not exist; "
                        "set PGRPO_DATA_DIR to the folder holding it")
    check_gz(test_file, "benchmark test set (PGRPO_DATA_DIR)")
