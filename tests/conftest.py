"""Fixtures shared by the train.py end-to-end tests (test_train_run.py, test_gate_arms.py)."""

import sys
from pathlib import Path

import pytest

import antipasto
import models


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """A synthetic teacher pool for tiny-random (scripts/make_synthetic_pool.py, real grader), 8 problems."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import make_synthetic_pool

    out = tmp_path_factory.mktemp("pool")
    make_synthetic_pool.build(make_synthetic_pool.PoolConfig(model="tiny-random", n_problems=8,
                                                             copies=1, out=str(out)))
    return out


@pytest.fixture(scope="module")
def vhack_file(tmp_path_factory) -> str:
    """A planted direction file for tiny-random: Haar-random unit vectors with valid metadata."""
    m, _ = models.load_model("tiny-random")
    antipasto.wrap_model(m)
    dirs = antipasto.random_directions(antipasto.get_adapters(m), seed=99)
    p = tmp_path_factory.mktemp("vhack") / "planted.safetensors"
    meta = antipasto.adapter_meta(m, models.model_id("tiny-random"))
    meta.update(pair_set="planted", n_pairs="0", method="random")
    antipasto.save_directions(p, dirs, meta)
    return str(p)
