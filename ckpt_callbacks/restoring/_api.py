"""``restore``: a docstring, one look-up of the item, one call into the engine.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/restore", {"w": jnp.arange(4.0), "step": 7})
>>> tree = restore("memory://doc/restore")
>>> tree["step"], tree["w"].tolist()
(7, [0.0, 1.0, 2.0, 3.0])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from jax.sharding import Mesh

from ckpt_callbacks.restoring import _engine as engine
from ckpt_callbacks.restoring import _restructure as restructure
from ckpt_callbacks.restoring import _sources as sources
from ckpt_callbacks.restoring._reads import READ_WINDOW_BYTES
from ckpt_callbacks.restoring._rules import Rules, check_rules
from ckpt_callbacks.storage import StorageOptions


def restore(
    path: Any,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    template: Any = None,
    shardings: Any = None,
    dtype: Any = None,
    keys: Sequence[str] | str | None = None,
    strict: bool = True,
    item: str = "state",
    rename: Sequence[tuple[str, str]] = (),
    missing: Any = None,
    drop: bool | Sequence[str] = False,
    max_host_bytes: int | None = None,
    storage: StorageOptions | None = None,
) -> Any:
    """Restores a committed checkpoint.

    Args:
      path: checkpoint directory URL, or a ``Checkpoint`` from ``open_checkpoint`` (or
        ``CheckpointInfo.checkpoint``): its marker, metadata and manifests are not read again.
        A URL holding no committed checkpoint of ours may hold an orbax PyTree checkpoint (a
        step or item directory; see ``ckpt_callbacks.interop``), restored the same way, unchecksummed,
        or a directory of any other registered ``restoring.Source``.
      mesh: target mesh; with ``rules`` the specs come from the rules, otherwise from the
        partition specs saved in the manifest.
      rules: ``[(regex, PartitionSpec), ...]`` over '/'-joined key paths; first match wins.
      template: pytree giving the result's structure, leaf types and dtypes; leaves with a
        ``.sharding`` (jax arrays, ``ShapeDtypeStruct``) give the target sharding.
      shardings: one ``Sharding`` for every array leaf, or a pytree of them (None = default).
      dtype: cast floating leaves to this dtype (a template's dtypes take precedence).
      keys: restore only the leaves under these '/'-joined key prefixes, spelled as ``inspect``
        shows them: a '/' inside one key is %2F, a '%' is %25 (``"opt/a%2Fb"`` is the key
        ``"a/b"`` of ``opt``, ``"opt/a/b"`` is ``opt -> a -> b``).
      strict: with a template, fail on missing or unexpected keys and on shape, rank and kind
        mismatches (a scalar saved where the template has an array, a string where it has a
        float), naming every offending path. With ``strict=False`` such template leaves keep
        the template's value and unexpected ones are ignored; a template leaf that is a
        ``ShapeDtypeStruct`` has no value to keep, so it still raises ``RestoreMismatchError``.
      item: the item to restore.
      rename: ``[(regex, replacement)]`` applied to saved key paths before they are matched to
        the template (first match wins): renamed modules restore into the new names.
      missing: a tree with the template's structure (say, the freshly initialised state) that
        template leaves absent from the checkpoint are taken from (new heads, added layers);
        without it they raise. A leaf saved as ``None`` where the template has a value (not
        checkpointed, as Levanter and equinox filters save it) counts as absent, as does every
        template leaf under a subtree saved as ``None``.
      drop: saved leaves the template does not have are dropped (``True``), or those whose
        key matches one of these regexes; otherwise they raise. What was renamed, filled and
        dropped is logged (see ``restoring/_restructure.py``).
      max_host_bytes: bound on the bytes read into host memory and not yet handed to their
        devices (default 512 MiB): chunk reads of later leaves overlap the host-to-device
        transfers of earlier ones within it. A single leaf's share for this process larger
        than the bound is still read whole. On local disk chunks are read straight into the
        restored arrays (see ``layouts/_direct.py``), so nothing is staged beyond them.
      storage: retries of S3/GCS requests and the longest wait on any one read
        (``StorageOptions.op_timeout_s``): a store that stops answering fails the restore with
        ``StorageTimeoutError`` instead of hanging it.

    Returns:
      The template's structure if one is given, else nested dicts, lists and tuples.

    Raises:
      ValueError: before anything is read, for arguments no checkpoint could satisfy: a
        ``rename``/``drop`` regex that does not compile, ``rename``/``missing``/``drop``
        without a ``template``, a ``missing`` sharing no leaf with the template, a
        ``max_host_bytes`` below 1; ``ShardingRuleError`` (a ``ValueError``) for such ``rules``.
    """
    _check_arguments(rules, template, rename=rename, missing=missing, drop=drop, max_host_bytes=max_host_bytes)
    found = sources.locate(path, item, storage)
    return engine.restore_from(
        found,
        mesh=mesh,
        rules=rules,
        template=template,
        shardings=shardings,
        dtype=dtype,
        keys=keys,
        strict=strict,
        rename=rename,
        missing=missing,
        drop=drop,
        max_host_bytes=max_host_bytes,
    )


def _check_arguments(rules: Any, template: Any, *, rename: Any, missing: Any, drop: Any, max_host_bytes: Any) -> None:
    """Refuses what can never restore before any file is read: every restore, of any step,
    would fail the same way (a ``Checkpointer`` falls back past damage, never past these)."""
    check_rules(rules)
    restructure.check_arguments(template, rename, missing, drop)
    if max_host_bytes is None:
        return
    number = isinstance(max_host_bytes, numbers.Real) and not isinstance(max_host_bytes, bool)
    if not number or not math.isfinite(max_host_bytes) or max_host_bytes < 1:
        raise ValueError(
            f"max_host_bytes={max_host_bytes!r}: expected a number of bytes >= 1, or None for the default "
            f"({READ_WINDOW_BYTES >> 20} MiB)"
        )
