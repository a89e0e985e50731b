"""Real multi-process JAX for tests: N processes on 127.0.0.1, gloo CPU collectives.

``run(task, n, local_devices, **kwargs)`` starts ``n`` Python processes that each call
``jax.distributed.initialize`` and then ``mh_tasks.<task>(**kwargs)``; each prints its
JSON result on a ``RESULT`` line. Processes are always torn down: on success, on a failure of
any of them, and on timeout (then every survivor is killed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Outcome:
    pid: int
    returncode: int | None
    result: Any
    output: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    task: str, n: int, local_devices: int, *, timeout: float = 120.0, expect_ok: bool = True, **kwargs: Any
) -> list[Outcome]:
    port = free_port()
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "tests", "mh_worker.py"),
                task,
                str(i),
                str(n),
                str(port),
                json.dumps(kwargs),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + timeout
    outputs: list[str | None] = [None] * n
    try:
        for i, proc in enumerate(procs):
            try:
                outputs[i], _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for i, proc in enumerate(procs):
            if outputs[i] is None:  # timed out, or not waited for yet: kill it and collect what it said
                if proc.poll() is None:
                    proc.kill()
                outputs[i], _ = proc.communicate()
    outcomes = []
    for i, proc in enumerate(procs):
        text = outputs[i] or ""
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][len("RESULT ") :]) if lines else None
        outcomes.append(Outcome(i, proc.returncode, result, text))
    if expect_ok:
        for o in outcomes:
            assert o.returncode == 0 and o.result is not None, f"process {o.pid} failed:\n{o.output[-4000:]}"
    return outcomes
