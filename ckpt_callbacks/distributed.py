"""The few multi-host primitives: who is primary, barriers, and small JSON exchanges.

They go through the ``jax.distributed`` coordination service (its key-value store), not
device collectives, so they are safe from a background thread while the training loop keeps
dispatching steps. With one process every call returns at once, without communication.

>>> is_primary()
True
>>> broadcast_json("doc-example", {"step": 3})
{'step': 3}
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import jax

DEFAULT_TIMEOUT_S = 600.0


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Process 0 writes shared files (manifests, metadata, the commit marker) and deletes."""
    return process_index() == 0


def _client() -> Any:
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            "several JAX processes but no jax.distributed client; call jax.distributed.initialize() first"
        )
    return client


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Blocks until every process reaches ``name``; raises after ``timeout_s``."""
    if process_count() == 1:
        return
    try:
        _client().wait_at_barrier(f"ckpt_callbacks/{name}", int(timeout_s * 1000))
    except Exception as e:
        raise TimeoutError(
            f"barrier {name!r}: not every process arrived within {timeout_s:.0f}s (a process may have died): {e}"
        ) from e


def broadcast_json(name: str, value: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Process 0's ``value`` on every process."""
    if process_count() == 1:
        return value
    key = f"ckpt_callbacks/bcast/{name}"
    if is_primary():
        _client().key_value_set(key, json.dumps(value))
        return value
    try:
        return json.loads(_client().blocking_key_value_get(key, int(timeout_s * 1000)))
    except Exception as e:
        raise TimeoutError(f"broadcast {name!r}: no value from process 0 within {timeout_s:.0f}s: {e}") from e


def gather_json(name: str, value: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any] | None:
    """Every process's ``value``, in process order, on process 0; None elsewhere."""
    if process_count() == 1:
        return [value]
    client = _client()
    client.key_value_set(f"ckpt_callbacks/gather/{name}/{process_index()}", json.dumps(value))
    if not is_primary():
        return None
    out = []
    for pid in range(process_count()):
        try:
            raw = client.blocking_key_value_get(f"ckpt_callbacks/gather/{name}/{pid}", int(timeout_s * 1000))
        except Exception as e:
            raise TimeoutError(f"gather {name!r}: process {pid} sent nothing within {timeout_s:.0f}s: {e}") from e
        out.append(json.loads(raw))
    return out


_PUBLISHED: dict[str, set[int]] = {}  # with one process: what ``publish`` recorded


def publish(name: str, process: int) -> None:
    """Records that ``process`` reached ``name`` (thread-safe; never waits for anyone)."""
    if process_count() == 1:
        _PUBLISHED.setdefault(name, set()).add(process)
        return
    _client().key_value_set(f"ckpt_callbacks/pub/{name}/{process}", "1", allow_overwrite=True)


def published(prefix: str) -> dict[str, list[int]]:
    """What ``publish`` recorded under ``prefix/``: {the next name part: processes}."""
    found: dict[str, set[int]] = {}
    if process_count() == 1:
        for name, procs in _PUBLISHED.items():
            if name.startswith(f"{prefix}/"):
                found.setdefault(name[len(prefix) + 1 :].split("/")[0], set()).update(procs)
    else:
        root = f"ckpt_callbacks/pub/{prefix}/"
        for key, _ in _client().key_value_dir_get(root):
            rest = key[len(root) :].split("/") if key.startswith(root) else []
            if len(rest) == 2 and rest[1].isdigit():
                found.setdefault(rest[0], set()).add(int(rest[1]))
    return {k: sorted(v) for k, v in found.items()}


def unpublish(name: str, process: int) -> None:
    """Drops ``publish(name, process)``'s record (records of old steps are not kept forever)."""
    if process_count() == 1:
        _PUBLISHED.get(name, set()).discard(process)
        return
    with contextlib.suppress(Exception):  # nothing recorded there: nothing to drop
        _client().key_value_delete(f"ckpt_callbacks/pub/{name}/{process}")
