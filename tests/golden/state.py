"""The deterministic trees the golden v1 checkpoints hold; the test rebuilds them to compare.

Nothing here reads a checkpoint: the expected values come only from this code, so a reader that
decodes the committed bytes differently fails ``tests/format/test_golden.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_dtypes
import numpy as np

# Small enough to commit (a few KiB each), big enough that a leaf spans several chunks.
CHUNK_BYTES = 256


def model() -> dict[str, Any]:
    return {
        "dense": {
            "kernel": (np.arange(12 * 8, dtype=np.float32).reshape(12, 8) / 7.0),
            "bias": np.linspace(-1.0, 1.0, 8, dtype=np.float32),
        },
        "embed": (np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 3.0).astype(ml_dtypes.bfloat16),
        "counts": np.arange(-5, 5, dtype=np.int64),
        "mask": np.array([True, False, True, True]),
        "zero_d": np.float64(2.5),
    }


def optimizer() -> dict[str, Any]:
    return {"mu": np.full((6, 5), 0.125, dtype=np.float32), "count": 41, "lr": 3e-4, "name": "adamw"}


def loader() -> dict[str, Any]:
    return {"epoch": 3, "seed": 1234, "files": ["a.tfrecord", "b.tfrecord"], "done": False, "note": None}


def key_data() -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.split(jax.random.key(7), 4)))


def items() -> dict[str, Any]:
    """Several items committed together: arrays of four dtypes, scalars, strings, None, PRNG keys."""
    state = {"params": model(), "rng": jax.random.wrap_key_data(key_data(), impl="threefry2x32"), "step": 900}
    return {"state": state, "optimizer": optimizer(), "loader": loader()}


def sharded_values() -> dict[str, np.ndarray]:
    """The global values of the 2-process save (each process holds half of ``w`` and ``part``)."""
    return {
        "w": (np.arange(8 * 12, dtype=np.float32).reshape(8, 12) - 20.0) / 4.0,
        "part": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
        "rep": np.arange(10, dtype=np.float32).astype(ml_dtypes.bfloat16),
    }
