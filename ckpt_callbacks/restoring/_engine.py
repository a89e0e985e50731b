"""The restore engine: select leaves, match a template, place each leaf, read, rebuild the tree.

Target shardings come from, in order: ``shardings``; template leaves carrying ``.sharding``;
``mesh`` + ``rules``; ``mesh`` alone with the partition specs saved in the manifest. Without
any of them, jax leaves land on the first local device and numpy leaves come back as numpy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import (
    RestoreMismatchError,
)
from ckpt_callbacks.restoring import _reads as reads
from ckpt_callbacks.restoring import _restructure as restructure
from ckpt_callbacks.restoring._rules import Rules
from ckpt_callbacks.restoring._sources import Located
from ckpt_callbacks.restoring._targets import (
    Target,
    check_representable,
    scalar_into,
    sharding_map,
    target_dtype,
    target_sharding,
    warn_if_gathered,
    weak_like,
)

log = logging.getLogger("ckpt_callbacks")

_UNSAVED = " (saved as None, not checkpointed: pass missing= to fill it, e.g. the fresh init)"


def _select(records: Sequence[fmt.LeafRecord], keys: Sequence[str] | None, where: str) -> list[int]:
    if keys is None:
        return list(range(len(records)))
    if isinstance(keys, str):
        keys = [keys]
    chosen: list[int] = []
    for key in keys:
        try:
            parts = fmt.parse_key_string(key)
        except ValueError as e:
            raise RestoreMismatchError(f"{where}: keys: {e}") from None
        hits = [i for i, r in enumerate(records) if tuple(str(k) for k in r.path[: len(parts)]) == parts]
        if not hits:
            top = sorted({fmt.key_string(r.path[:1]) for r in records if r.path})
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
        unsaved=[restructure.match_key(records[i].path) for i in chosen if restructure.saved_none(records[i])],
        empty=[key for key, (_, leaf) in zip(by_key, t_leaves, strict=True) if leaf is None],
    )
    changes.log(where)
    index = {restructure.match_key(records[i].path): i for i in chosen}
    on_disk = {by_key[new]: index[old] for old, new in changes.target.items()}
    unsaved = set(changes.unsaved)
    problems = [f"missing on disk: {key!r}" + (_UNSAVED if key in unsaved else "") for key in changes.missing]
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


def restore_from(
    found: Located,
    *,
    mesh: Mesh | None,
    rules: Rules | None,
    template: Any,
    shardings: Any,
    dtype: Any,
    keys: Sequence[str] | str | None,
    strict: bool,
    rename: Sequence[tuple[str, str]],
    missing: Any,
    drop: bool | Sequence[str],
    max_host_bytes: int | None,
) -> Any:
    """``restore`` of an item a source found (see ``restore`` for the arguments)."""
    loc, manifest, read = found.loc, found.manifest, found.read
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
    window = reads.READ_WINDOW_BYTES if max_host_bytes is None else max(1, int(max_host_bytes))
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
