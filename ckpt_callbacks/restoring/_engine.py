"""Restore a checkpoint onto any mesh: each process reads only the chunks its devices need.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/restore", {"w": jnp.arange(4.0), "step": 7})
>>> tree = restore("memory://doc/restore")
>>> tree["step"], tree["w"].tolist()
(7, [0.0, 1.0, 2.0, 3.0])

Target shardings come from, in order: ``shardings``; template leaves carrying ``.sharding``;
``mesh`` + ``rules``; ``mesh`` alone with the partition specs saved in the manifest. Without
any of them, jax leaves land on the first local device and numpy leaves come back as numpy.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from jax.sharding import Mesh

from ckpt_callbacks import directory as layout
from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks import interop as orbax_format
from ckpt_callbacks import layouts as direct_reads
from ckpt_callbacks import layouts as process_files
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RestoreMismatchError,
)
from ckpt_callbacks.layouts import DirectRead, LeafRead, PackFiles, settle
from ckpt_callbacks.restoring import _restructure as restructure
from ckpt_callbacks.restoring._rules import Rules
from ckpt_callbacks.restoring._targets import (
    Target,
    check_representable,
    data_sharding,
    scalar_into,
    sharding_map,
    target_dtype,
    target_sharding,
    warn_if_gathered,
    weak_like,
)
from ckpt_callbacks.storage import StorageOptions

log = logging.getLogger("ckpt_callbacks")

# Bytes of chunk reads in flight at once: bounds host memory beyond the restored arrays.
READ_WINDOW_BYTES = 512 << 20
Opener = Callable[[fmt.LeafRecord], Any]  # a leaf's array -> its TensorStore open future


def _finish_leaf(record: fmt.LeafRecord, target: Target, regions: dict[planning.Region, np.ndarray]) -> Any:
    dtype = target.dtype
    if record.kind == "array" and dtype is not None:
        regions = {r: (a if a.dtype == dtype else a.astype(dtype)) for r, a in regions.items()}
    if target.sharding is None:
        return regions[tuple((0, n) for n in record.data_shape)]
    sharding = data_sharding(record, target.sharding)
    shape = record.data_shape

    def region_of(index: Any) -> np.ndarray:
        return regions[planning.normalize_index(index, shape)]

    array = jax.make_array_from_callback(shape, sharding, region_of)
    if record.kind == "prng_key":
        return jax.random.wrap_key_data(array, impl=record.key_impl)
    return array


def _open_array(kvstore: dict[str, Any], record: fmt.LeafRecord, where: str, unchecked: Opener | None = None) -> Any:
    """The open future of a leaf's zarr3 array, with the manifest's metadata (zarr.json unread)."""
    try:
        if unchecked is not None:
            return unchecked(record)
        return ts.open(fmt.zarr_spec(kvstore, record), open=True, assume_metadata=True, context=paths.context())
    except Exception as e:  # a spec TensorStore refuses at once (a dtype or grid it lacks)
        raise CorruptCheckpointError(f"{where}: leaf {record.key!r}: cannot open its array: {e}") from e


def read_leaves(
    loc: paths.Location,
    records: Sequence[fmt.LeafRecord],
    targets: Sequence[Target],
    window: int = READ_WINDOW_BYTES,
    packs: PackFiles | None = None,
    *,
    open_unchecked: Opener | None = None,
) -> list[Any]:
    """Reads array leaves onto their targets, a bounded number of bytes in flight.

    ``packs`` shares pack files already read between calls on the same item directory.
    ``open_unchecked`` opens the arrays of a format that records no chunk checksums (an orbax
    checkpoint): their reads are not checked.
    """
    kvstore = paths.kvstore_spec(loc)
    packs = PackFiles(loc) if packs is None else packs
    direct = [open_unchecked is None and direct_reads.applies(loc, r) for r in records]
    opened = [
        None if r.pack or d else _open_array(kvstore, r, loc.url, open_unchecked)
        for r, d in zip(records, direct, strict=True)
    ]
    out: list[Any] = [None] * len(records)
    inflight: collections.deque[tuple[int, LeafRead | DirectRead]] = collections.deque()
    pending = 0

    def drain_one() -> None:
        nonlocal pending
        i, read = inflight.popleft()
        out[i] = _finish_leaf(records[i], targets[i], read.result())
        pending -= read.nbytes

    try:
        for i, (record, target) in enumerate(zip(records, targets, strict=True)):
            shape = record.data_shape
            if target.sharding is None:
                regions = [tuple((0, n) for n in shape)]
            else:
                index_map = data_sharding(record, target.sharding).addressable_devices_indices_map(shape)
                regions = sorted({planning.normalize_index(x, shape) for x in index_map.values() if x is not None})
            read: LeafRead | DirectRead
            if direct[i]:
                read = DirectRead(loc, record, regions, loc.url)
            else:
                source: ts.TensorStore | PackFiles = packs
                future = opened[i]
                if future is not None:
                    try:
                        source = future.result()
                    except Exception as e:
                        raise CorruptCheckpointError(
                            f"{loc.url}: leaf {record.key!r}: cannot open its array: {e}"
                        ) from e
                read = LeafRead(
                    source, record, regions, loc.url, checksums=open_unchecked is None, timeout=loc.options.op_timeout_s
                )
            inflight.append((i, read))
            pending += read.nbytes
            while pending > window and len(inflight) > 1:
                drain_one()
        while inflight:
            drain_one()
    except BaseException:  # no read outlives a failed restore
        for _, read in inflight:
            read.cancel()
        for future in opened:
            settle(future)
        packs.cancel()
        raise
    return out


def _select(records: Sequence[fmt.LeafRecord], keys: Sequence[str] | None, where: str) -> list[int]:
    if keys is None:
        return list(range(len(records)))
    if isinstance(keys, str):
        keys = [keys]
    chosen: list[int] = []
    for key in keys:
        parts = [p for p in key.split("/") if p]
        hits = [i for i, r in enumerate(records) if [str(k) for k in r.path[: len(parts)]] == parts]
        if not hits:
            top = sorted({str(r.path[0]) for r in records if r.path})
            raise RestoreMismatchError(f"{where}: no leaf under key {key!r}; top-level keys: {top}")
        chosen.extend(i for i in hits if i not in chosen)
    return sorted(chosen)


def _template_problem(record: fmt.LeafRecord, leaf: Any) -> str | None:
    """Why the leaf saved as ``record`` cannot come back as template leaf ``leaf`` (None: it can)."""
    at = repr(record.key)
    saved = f"a {record.value_type} scalar" if record.kind == "scalar" else f"{record.kind} of shape {record.shape}"
    if leaf is None:
        return None
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # jax.Array, ShapeDtypeStruct, numpy array
        shape = tuple(leaf.shape)
        is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        wanted = f"{'a PRNG key' if is_key else 'an array'} of shape {shape}"
        if record.kind == "scalar":
            numeric = record.value_type in ("bool", "int", "float") and not is_key
            return None if numeric and shape == () else f"kind mismatch at {at}: {saved} on disk, {wanted} in template"
        if is_key != (record.kind == "prng_key"):
            return f"kind mismatch at {at}: {saved} on disk, {wanted} in template"
        if shape != record.shape:
            rank = (
                f" (rank {len(shape)} in template, {len(record.shape)} on disk)"
                if len(shape) != len(record.shape)
                else ""
            )
            return f"shape mismatch at {at}: {shape} in template, {record.shape} on disk{rank}"
        return None
    if isinstance(leaf, bool | int | float | str):
        wanted = f"a {type(leaf).__name__} in template"
        if record.kind == "scalar":
            return (
                None
                if record.value_type == type(leaf).__name__
                else f"kind mismatch at {at}: {saved} on disk, {wanted}"
            )
        if record.kind == "array" and record.shape == () and not isinstance(leaf, str):
            return None
        return f"kind mismatch at {at}: {saved} on disk, {wanted}"
    return None


def _match_template(
    records: Sequence[fmt.LeafRecord],
    chosen: list[int],
    template: Any,
    strict: bool,
    *,
    where: str,
    reshape: dict[str, Any],
) -> tuple[list[tuple[fmt.KeyPath, Any]], Any, dict[fmt.KeyPath, int]]:
    """(template leaves, treedef, {path: record index} of the leaves restored from disk).

    ``reshape``: ``rename``, ``missing`` and ``drop`` (see ``restructure``); filled leaves
    come back in the template leaves, taken from ``missing``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=lambda x: x is None)
    t_leaves = [(fmt.path_of(p), leaf) for p, leaf in flat]
    by_key = {restructure.match_key(path): path for path, _ in t_leaves}
    missing = reshape.get("missing")
    fill = restructure.flat_values(missing) if missing is not None else None
    changes = restructure.plan(
        [restructure.match_key(records[i].path) for i in chosen],
        list(by_key),
        rename=reshape.get("rename") or (),
        missing=fill,
        drop=reshape.get("drop", False),
        where=where,
    )
    changes.log(where)
    index = {restructure.match_key(records[i].path): i for i in chosen}
    on_disk = {by_key[new]: index[old] for old, new in changes.target.items()}
    problems = [f"missing on disk: {key!r}" for key in changes.missing]
    usable: dict[fmt.KeyPath, int] = {}
    for path, i in on_disk.items():
        problem = _template_problem(records[i], dict(t_leaves)[path])
        if problem is None:
            usable[path] = i
        else:
            problems.append(problem)
    problems += [f"unexpected on disk (not in template): {key!r}" for key in changes.unexpected]
    if problems and strict:
        raise RestoreMismatchError(
            f"{where}: checkpoint and template disagree ({len(problems)}):\n  " + "\n  ".join(problems)
        )
    if fill is not None:
        filled = set(changes.filled)
        t_leaves = [(p, fill[k] if (k := restructure.match_key(p)) in filled else v) for p, v in t_leaves]
    placeholders = [
        fmt.key_string(p) for p, leaf in t_leaves if p not in usable and isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if placeholders:
        raise RestoreMismatchError(
            f"{where}: strict=False keeps the template's value where the checkpoint cannot give one, but these "
            f"template leaves are ShapeDtypeStruct placeholders, not values: {placeholders}"
        )
    return t_leaves, treedef, usable


def _source(
    path: Any, item: str, storage: StorageOptions | None = None
) -> tuple[paths.Location, fmt.Manifest, Callable[..., list[Any]]]:
    """(where, manifest, reader of array leaves) of our checkpoint at ``path``, or else of an
    orbax PyTree checkpoint there (read without orbax; see ``orbax_format``)."""
    try:
        ckpt = layout.open_checkpoint(path, storage=storage)
    except CheckpointNotFoundError:
        found = (
            None if isinstance(path, layout.Checkpoint) else orbax_format.open_item(paths.parse(path, storage), item)
        )
        if found is None:
            raise
        return found.loc, found.manifest, functools.partial(read_leaves, found.loc, open_unchecked=found.open_array)
    manifest = ckpt.manifest(item)
    if manifest.layout is not None:  # layout "process": chunks located through the writers' indexes
        return (
            ckpt.loc,
            manifest,
            functools.partial(process_files.read_leaves, ckpt.item_loc(item), manifest, read=read_leaves),
        )
    return ckpt.loc, manifest, functools.partial(read_leaves, ckpt.item_loc(item))


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
      path: checkpoint directory URL, or a ``Checkpoint`` from ``layout.open_checkpoint`` (or
        ``CheckpointInfo.checkpoint``): its marker, metadata and manifests are not read again.
        A URL holding no committed checkpoint of ours may hold an orbax PyTree checkpoint (a
        step or item directory; see ``orbax_format``), restored the same way, unchecksummed.
      mesh: target mesh; with ``rules`` the specs come from the rules, otherwise from the
        partition specs saved in the manifest.
      rules: ``[(regex, PartitionSpec), ...]`` over '/'-joined key paths; first match wins.
      template: pytree giving the result's structure, leaf types and dtypes; leaves with a
        ``.sharding`` (jax arrays, ``ShapeDtypeStruct``) give the target sharding.
      shardings: one ``Sharding`` for every array leaf, or a pytree of them (None = default).
      dtype: cast floating leaves to this dtype (a template's dtypes take precedence).
      keys: restore only the leaves under these '/'-joined key prefixes.
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
        without it they raise.
      drop: saved leaves the template does not have are dropped (``True``), or those whose
        key matches one of these regexes; otherwise they raise. What was renamed, filled and
        dropped is logged (see ``restructure``).
      max_host_bytes: bound on the bytes read into host memory and not yet handed to their
        devices (default 512 MiB): chunk reads of later leaves overlap the host-to-device
        transfers of earlier ones within it. A single leaf's share for this process larger
        than the bound is still read whole. On local disk chunks are read straight into the
        restored arrays (see ``direct_reads``), so nothing is staged beyond them.
      storage: retries of S3/GCS requests and the longest wait on any one read
        (``StorageOptions.op_timeout_s``): a store that stops answering fails the restore with
        ``StorageTimeoutError`` instead of hanging it.

    Returns:
      The template's structure if one is given, else nested dicts, lists and tuples.
    """
    loc, manifest, read = _source(path, item, storage)
    records = manifest.leaves
    chosen = _select(records, keys, loc.url)
    given = sharding_map(shardings)
    if template is not None:
        reshape = {"rename": rename, "missing": missing, "drop": drop}
        t_leaves, treedef, on_disk = _match_template(records, chosen, template, strict, where=loc.url, reshape=reshape)
        pairs = [(on_disk[p], leaf) for p, leaf in t_leaves if p in on_disk]
    else:
        pairs = [(i, None) for i in chosen]
    arrays = [(i, leaf) for i, leaf in pairs if records[i].kind != "scalar"]
    places = [
        Target(target_sharding(records[i], leaf, given, mesh, rules), target_dtype(records[i], leaf, dtype))
        for i, leaf in arrays
    ]
    for (i, _), place in zip(arrays, places, strict=True):
        check_representable(records[i], place, loc.url)
    warn_if_gathered(records, arrays, places, loc.url)
    window = READ_WINDOW_BYTES if max_host_bytes is None else max(1, int(max_host_bytes))
    values = dict(zip((i for i, _ in arrays), read([records[i] for i, _ in arrays], places, window), strict=True))
    for i, leaf in pairs:
        if records[i].kind == "scalar":
            values[i] = scalar_into(fmt.decode_scalar(records[i].value, records[i].value_type), leaf)
        elif leaf is not None and isinstance(leaf, bool | int | float) and not hasattr(leaf, "shape"):
            values[i] = type(leaf)(np.asarray(values[i]).item())
    if template is None:
        leaves = [values.get(i) for i in range(len(records))]
        return fmt.unflatten(manifest.tree, leaves, keep=None if keys is None else set(chosen))
    result = [
        weak_like(values[on_disk[p]], leaf) if p in on_disk and on_disk[p] in values else leaf for p, leaf in t_leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, result)
