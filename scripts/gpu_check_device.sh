#!/bin/bash
# scripts/gpu_check.py on the lent GPU machine (docs/performance.md, "On the lent device"): after
# `just device-wheels` here, one device call from the repo root:
#   run(command="GIT_SHA=<the 40 hex digits of git rev-parse HEAD> bash scripts/gpu_check_device.sh",
#       carry=[".whl"], timeout_s=590)
# The image's python3 holds CUDA torch and transformers but not this repo's .venv or `just`; this installs the
# carried wheels into /tmp/site, checks imports and CUDA within seconds (exit 3 / 4), then runs the check with
# its record and log under $OUT (what comes back), rewritten after every phase.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "[device] no .whl/*.whl: run \`just device-wheels\` here and name .whl in the call's carry" >&2
fi
python3 - <<'PY' || exit 4
import platform, torch, transformers, tyro, beartype, loguru, jaxtyping  # noqa: F401  (gpu_check's imports)
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print(f"[device] python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, {torch.cuda.get_device_name()}", flush=True)
PY
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
timeout 550 python3 scripts/gpu_check.py --device cuda --json "$OUT/gpu-check.json" --git-sha "${GIT_SHA:-}" \
  --time-limit-s 420 "$@" 2>&1 | tee "$OUT/gpu-check.log"
