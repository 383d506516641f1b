"""The 2-layer random Qwen3 the adapter tests build in memory (no tokenizer, no files), and its helpers.
Shared by tests/test_antipasto.py and tests/test_antipasto_variants.py."""

from __future__ import annotations

import torch
import transformers

VOCAB = 512


def tiny_model(seed: int = 0, dtype=torch.float32, layers: int = 2) -> transformers.PreTrainedModel:
    """Qwen3 with `layers` layers and random weights (deterministic per seed)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return transformers.Qwen3ForCausalLM(cfg).eval().to(dtype)


def ids(B=2, T=10, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)  # (B, T)


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits  # (B, T, V)
