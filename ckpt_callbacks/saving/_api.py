"""``save``, ``save_async``, ``save_items`` and ``save_items_async``: each a docstring, its
checks (the step, JSON extras, the options) and one call into the engine.

>>> import jax.numpy as jnp
>>> save("memory://doc/saving", {"w": jnp.arange(3.0)}, step=1)
>>> handle = save_async("memory://doc/saving-async", {"w": jnp.ones(2)})
>>> handle.wait().bytes_written
8
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from ckpt_callbacks import directory
from ckpt_callbacks import format as fmt
from ckpt_callbacks.format import as_step
from ckpt_callbacks.saving._engine import start_save as _start_save
from ckpt_callbacks.saving._options import SaveHandle, SaveOptions


def _metadata(items: Mapping[str, Any], step: Any, extras: dict[str, Any] | None, temporary: bool) -> fmt.Metadata:
    """The save's ``metadata.json``, checked before anything is written (item names, step, JSON extras)."""
    for item in items:
        directory.check_item_name(item)
    metadata = fmt.Metadata(
        step=None if step is None else as_step(step),
        timestamp=time.time(),
        is_temporary=temporary,
        extras=dict(extras or {}),
        items=tuple(items),
    )
    try:
        fmt.parse_metadata(fmt.loads(fmt.dumps(metadata.to_json()), "extras"), "extras")  # what a reader refuses
    except (TypeError, ValueError) as e:
        raise TypeError(f"extras must be JSON-serializable (finite floats, str keys): {e}") from e
    return metadata


def _options(options: SaveOptions | None, overrides: dict[str, Any]) -> SaveOptions:
    base = SaveOptions() if options is None else options
    return dataclasses.replace(base, **overrides) if overrides else base


def save_async(
    path: Any,
    tree: Any,
    *,
    step: int | None = None,
    extras: dict[str, Any] | None = None,
    item: str = "state",
    is_temporary: bool = False,
    options: SaveOptions | None = None,
    **option_overrides: Any,
) -> SaveHandle:
    """Starts saving ``tree`` to the checkpoint directory ``path``; returns after the snapshot.

    Args:
      path: checkpoint directory URL (local path, ``file://``, ``memory://``, ``s3://``, ``gs://``).
        A base holding committed ``run-<step>`` checkpoints, or a directory inside a committed
        checkpoint, is refused (``CheckpointPathError``) before anything is written.
      tree: pytree of jax arrays (any sharding), numpy arrays, typed PRNG keys, Python scalars,
        strings and None.
      step: recorded in ``metadata.json``. None for a ``run-<N>`` directory is step N (what
        listings, ``find_latest_checkpoint`` and a resume go by); another step there is refused.
      extras: JSON-serializable dict recorded in ``metadata.json``.
      item: name of the item directory.
      is_temporary: recorded in ``metadata.json`` (retention deletes superseded temporaries).
      options: a ``SaveOptions``; any of its fields may also be given as keywords
        (``dtype=``, ``overwrite=``, ``max_host_bytes=``, ``timeout_s=``, ``pack_bytes=``),
        which override it.

    Returns:
      A ``SaveHandle``; ``wait()`` returns ``SaveStats`` once committed or raises the failure.
    """
    opts = _options(options, option_overrides)
    return _start_save(path, {item: tree}, _metadata({item: tree}, step, extras, is_temporary), opts)


def save(
    path: Any,
    tree: Any,
    *,
    step: int | None = None,
    extras: dict[str, Any] | None = None,
    item: str = "state",
    is_temporary: bool = False,
    options: SaveOptions | None = None,
    **option_overrides: Any,
) -> None:
    """Saves ``tree`` to ``path`` and returns once it is committed; arguments as ``save_async``.

    The caller waits anyway, so the shards are written straight from its buffers: no
    snapshot copy, and no host memory beyond the writes in flight.
    """
    opts = _options(options, option_overrides)
    metadata = _metadata({item: tree}, step, extras, is_temporary)
    _start_save(path, {item: tree}, metadata, opts, copy=False).wait()


def save_items_async(
    path: Any,
    items: Mapping[str, Any],
    *,
    step: int | None = None,
    extras: dict[str, Any] | None = None,
    is_temporary: bool = False,
    add: bool = False,
    options: SaveOptions | None = None,
    **option_overrides: Any,
) -> SaveHandle:
    """Saves several named items (``{"model": ..., "optimizer": ..., "loader": {...}}``) as one
    checkpoint, committed together; returns after the snapshot, like ``save_async``.

    With ``add=True`` the items join the checkpoint already committed at ``path`` (its other
    items are kept; an item it already has needs ``overwrite=True``), or start a new one: one
    call per item into the same step, each committed on its own. A reader never sees a
    half-written item: until the marker is rewritten, the checkpoint is what it was.
    JSON items (a data loader's position) are plain pytrees of Python scalars and strings.
    """
    if not items:
        raise ValueError("save_items needs at least one item")
    opts = _options(options, option_overrides)
    return _start_save(path, dict(items), _metadata(items, step, extras, is_temporary), opts, add=add)


def save_items(path: Any, items: Mapping[str, Any], **kwargs: Any) -> None:
    """``save_items_async(...).wait()``: blocking, arguments as ``save_items_async``."""
    save_items_async(path, items, **kwargs).wait()
