"""Writes the golden format-v1 checkpoints under ``tests/golden/v1`` (run once, then committed).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python tests/golden/make_golden.py

They were written by the code of commit 501a061 (before the package was layered) and must never
be regenerated to make a failing test pass: a reader that cannot restore them has broken format
v1. ``SHA256SUMS`` pins every byte; ``tests/format/test_golden.py`` checks it first.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from golden import state  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ckpt_callbacks as cc  # noqa: E402

OUT = HERE / "v1"


def _sharded_items() -> dict:
    """``items()`` with the model's kernel and embedding sharded over a 4x2 mesh of 8 devices."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    tree = state.items()
    params = tree["state"]["params"]
    params["dense"]["kernel"] = jax.device_put(params["dense"]["kernel"], NamedSharding(mesh, P("data", "model")))
    params["embed"] = jax.device_put(params["embed"], NamedSharding(mesh, P(None, "model")))
    return tree


def one_process() -> None:
    cases = {
        # small arrays packed into shared files, several chunks each
        "zarr3-packed": {"layout": "zarr3", "max_host_bytes": 2048},
        # every array its own zarr3 array, several chunks each
        "zarr3-arrays": {"layout": "zarr3", "pack_bytes": 0, "max_host_bytes": 2048},
        "process-1p": {"layout": "process", "max_host_bytes": 2048},
    }
    for name, options in cases.items():
        cc.save_items(OUT / name, _sharded_items(), step=900, extras={"loss": 0.25, "tag": name}, **options)


def two_processes() -> None:
    import multihost

    for layout in ("process", "zarr3"):
        path = OUT / f"{layout}-2p"
        multihost.run("save_golden", 2, 4, path=str(path), layout=layout)


def sums() -> None:
    lines = []
    for file in sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file.relative_to(OUT).as_posix()}")
    (OUT / "SHA256SUMS").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    one_process()
    two_processes()
    sums()
    print(f"wrote {sum(1 for _ in OUT.rglob('*'))} entries under {OUT}")
