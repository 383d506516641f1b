"""Trainable / frozen parameter counts of the SVD adapter, from model configs only (no weights).

    .venv/bin/python scripts/count_params.py                 # full rank, default targets
    .venv/bin/python scripts/count_params.py --rank 256      # top-256 singular directions
    .venv/bin/python scripts/count_params.py --json out/param_counts.json

Builds each model on the meta device from its published config and counts the Linear shapes that
antipasto.wrap_model would wrap (antipasto.count_adapter_params). Qwen3-4B is also checked against
the hand formula layers * (5 * hidden + 2 * kv_heads * head_dim) at full rank.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import antipasto  # noqa: E402

# published configs (Qwen/Qwen3-4B and HuggingFaceTB/SmolLM2-135M-Instruct config.json)
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
# the test-file tiny model (tests/test_antipasto.py); models.py's tiny-random has the same shape
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def meta_model(cls, cfg: dict):
    with torch.device("meta"):
        return cls(cls.config_class(**cfg))


def tiny_random_config() -> tuple[str, dict]:
    """models.py's tiny-random config if models.py provides it, else the test-file tiny shape."""
    try:
        import models

        m, _ = models.load_model("tiny-random")
        c = m.config
        cfg = {k: getattr(c, k) for k in TINY}
        return "tiny-random (models.py)", cfg
    except Exception as e:  # models.py not there yet or failed: say so, fall back
        print(f"[note] models.load_model('tiny-random') unavailable ({type(e).__name__}: {e}); "
              "using the test-file tiny shape")
        return "tiny (test file)", TINY


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--rank", type=int, default=None, help="top-r singular directions (default: full rank)")
    ap_.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = ap_.parse_args()

    tiny_name, tiny_cfg = tiny_random_config()
    specs = [("Qwen3-4B", transformers.Qwen3ForCausalLM, QWEN3_4B),
             ("SmolLM2-135M", transformers.LlamaForCausalLM, SMOLLM2_135M),
             (tiny_name, transformers.Qwen3ForCausalLM, tiny_cfg)]
    rows = {}
    hdr = (f"{'model':<26}{'modules':>8}{'delta_S':>12}{'route (x2)':>12}{'model params':>15}"
           f"{'U,S,Vh elems':>15}{'/ wrapped W':>12}")
    print(f"rank = {'full' if args.rank is None else args.rank}, targets = "
          f"{','.join(antipasto.DEFAULT_TARGETS)}")
    print(hdr)
    for name, cls, cfg in specs:
        m = meta_model(cls, cfg)
        c = antipasto.count_adapter_params(m, rank=args.rank)
        n_model = sum(p.numel() for p in m.parameters())
        c["model_params"] = n_model
        rows[name] = c
        print(f"{name:<26}{c['n_modules']:>8}{c['delta_S']:>12,}{c['trainable_route']:>12,}{n_model:>15,}"
              f"{c['frozen_buffers']:>15,}{c['frozen_buffers'] / c['base_linear']:>12.2f}")
    if args.rank is None:
        q = QWEN3_4B
        hand = q["num_hidden_layers"] * (5 * q["hidden_size"] + 2 * q["num_key_value_heads"] * q["head_dim"])
        assert rows["Qwen3-4B"]["delta_S"] == hand, (rows["Qwen3-4B"]["delta_S"], hand)
        print(f"Qwen3-4B hand formula 36 * (5 * 2560 + 2 * 8 * 128) = {hand:,}: matches")
    gb = rows["Qwen3-4B"]["frozen_buffers"] * 2 / 1e9
    print(f"Qwen3-4B frozen U/S/Vh in bf16: {gb:.2f} GB (on top of the "
          f"{rows['Qwen3-4B']['model_params'] * 2 / 1e9:.2f} GB model)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rank": args.rank, "counts": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
