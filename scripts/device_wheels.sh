#!/bin/bash
# Download, into .whl/ (ignored by git), the pure-Python wheels that the lent GPU machine's image lacks and
# scripts/gpu_check.py imports, at the versions this repo's .venv holds (so the device runs what the tests ran):
#   bash scripts/device_wheels.sh        (just device-wheels; needs PyPI, as every set-up here does)
# The image already has torch (CUDA), transformers, jaxtyping, numpy, safetensors, tqdm, scipy
# (/work/.library/device/KINDS.md). scripts/gpu_check_device.sh installs these on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
PKGS="tyro docstring_parser typeguard typing_extensions beartype loguru"  # typeguard/tyro need a newer
# typing_extensions than the image may hold
pins=$(.venv/bin/python - $PKGS <<'PY'
import importlib.metadata as m, sys
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))
PY
)
tmp=$(mktemp -d)
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$tmp" $pins
rm -rf .whl && mv "$tmp" .whl  # (a failed download leaves the previous .whl/)
echo "[device-wheels] $pins -> .whl/ ($(du -sh .whl | cut -f1)); carry [\".whl\"] in the device call"
