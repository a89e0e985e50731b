"""Bench cases that need a fresh process per measurement (run.py starts them; runnable alone):

    python benchmarks/fresh.py first-save ours|orbax LEAVES MIB DIR
    python benchmarks/fresh.py restore ours-same|ours-other|orbax PATH GIB

``first-save``: blocking seconds of the first async save of a new tree structure in a fresh
process (no plan or cache from an earlier save), then of two repeats of the same save.
``restore``: seconds and peak extra RSS of one restore of workload (a) in a fresh process, and
the bytes restored (the tree's logical size): in a process that saved or restored before, the
allocator's leftovers hide what a restore takes. Each prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
HERE = os.path.dirname(os.path.abspath(__file__))


def first_save(lib: str, leaves: int, mib: float, root: str) -> dict[str, Any]:
    import run

    tree = run.small_tree(leaves, int(mib * 2**20))
    blocking = []
    if lib == "ours":
        import ckpt_callbacks as cc

        for i in range(3):
            handle = cc.save_async(os.path.join(root, f"ours-{i}"), tree)
            blocking.append(handle.blocking_s)
            handle.wait()
    else:
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        for i in range(3):
            start = time.perf_counter()
            ckptr.save(os.path.join(root, f"orbax-{i}"), tree)
            blocking.append(time.perf_counter() - start)
            ckptr.wait_until_finished()
        ckptr.close()
    return {"first_s": blocking[0], "repeat_s": statistics.median(blocking[1:])}


def restore(case: str, path: str, gib: float) -> dict[str, Any]:
    import jax
    import numpy as np
    import run
    from jax.sharding import Mesh, NamedSharding

    shape = (4, 2) if case != "ours-other" else (2, 4)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("x", "y"))
    layout = run.model_layout(gib)
    if case == "orbax":
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        targets = {n: jax.ShapeDtypeStruct(s, np.float32, sharding=NamedSharding(mesh, p)) for n, s, p in layout}
        measured = run.measure(lambda: jax.block_until_ready(ckptr.restore(path, targets)))
        ckptr.close()
    else:
        import ckpt_callbacks as cc

        measured = run.measure(lambda: jax.block_until_ready(cc.restore(path, mesh=mesh)))
    restored = sum(int(np.prod(s)) * 4 for _, s, _ in layout)
    return {"seconds": measured["seconds"], "peak_rss": measured["peak_rss"], "restored": restored}


def spawn(*args: str) -> dict[str, Any]:
    """Runs this script in a fresh process; its JSON line."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "fresh.py"), *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"fresh.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    sys.path.insert(0, HERE)
    if argv[0] == "first-save":
        result = first_save(argv[1], int(argv[2]), float(argv[3]), argv[4])
    else:
        result = restore(argv[1], argv[2], float(argv[3]))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
