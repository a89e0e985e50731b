"""Entry point of one test process: initialize jax.distributed, run a task, print its result."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    task, pid, n, port, kwargs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid, initialization_timeout=60
    )
    import mh_tasks  # beside this file

    result = getattr(mh_tasks, task)(**json.loads(kwargs))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: a logging thread cannot split it
    sys.stdout.flush()
    if isinstance(result, dict) and result.get("peer_died"):
        os._exit(0)  # a clean shutdown would wait for the dead process
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
