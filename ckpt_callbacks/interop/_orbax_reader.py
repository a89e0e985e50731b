"""Orbax PyTree checkpoints, read without importing orbax: ``restore`` falls back to them.

    tree = cc.restore("ckpts/1000", mesh=mesh)             # a CheckpointManager step directory
    tree = cc.restore("ckpts/1000/state", mesh=mesh, rules=rules, keys=["params"])  # one item

``restore`` and ``ckpt-callbacks inspect`` accept what orbax-checkpoint's ``StandardCheckpointer``,
``PyTreeCheckpointer`` and ``CheckpointManager`` write: an item directory holding ``_METADATA``
(the tree: key paths and value types), or a step directory (``_CHECKPOINT_METADATA``) whose
items are subdirectories (``default/``, ``state/``). Arrays are zarr (v2) or zarr3, inside one
OCDBT database over the item directory (orbax's default) or one directory per array
(``use_ocdbt=False``), named by their '.'-joined key path. Orbax records no chunk checksums,
so nothing is checked beyond TensorStore's own decoding.

>>> param_name(("params", 0, "kernel"))
'params.0.kernel'
>>> array_kvstore({"driver": "file", "path": "/c/default/"}, "params.w", ocdbt=True)
{'driver': 'ocdbt', 'base': {'driver': 'file', 'path': '/c/default/'}, 'path': 'params.w/'}
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import re
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointFormatError, CheckpointNotFoundError, CorruptCheckpointError
from ckpt_callbacks.format import MAX_DEPTH, check_json_value, show
from ckpt_callbacks.interop._orbax_metadata import (
    ARRAY_TYPES,
    NONE_TYPES,
    Entry,
    build_tree,
    check_array_metadata,
    entry_of,
    flag,
)

METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
SHARDING = "_sharding"
STRINGS = "_strings.json"
COMMIT_SUCCESS = "commit_success.txt"
TMP_MARK = ".orbax-checkpoint-tmp"
DEFAULT_ITEM = "default"  # orbax's name of an unnamed item
RESTORED_BY_DEFAULT = "state"  # the item ``restore`` and a ``Checkpointer`` read unless told
MAX_JSON = 256 << 20  # bytes of _METADATA, _sharding or _strings.json
MAX_ARRAY_JSON = 1 << 20  # bytes of one array's .zarray or zarr.json
# orbax's ``step_from_checkpoint_name``: digits, or any prefix, '_' and digits (ASCII, as its regex)
_STEP_NAME = re.compile(r"(?:.+_)?([0-9]+)")
_TMP_NAME = re.compile(r"(?:.*_)?([0-9]+)\.orbax-checkpoint-tmp")  # orbax's TMP_DIR_STEP_PATTERN


@functools.cache
def context() -> ts.Context:
    """Reads of OCDBT share a cache of its B-tree nodes (within the process-wide context)."""
    return ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": 64 << 20}}), paths.context())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Storage:
    """How an orbax item stores its arrays (flags in its ``_METADATA``)."""

    ocdbt: bool  # one OCDBT database over the item directory, else a directory per array
    zarr3: bool  # zarr3 arrays, else zarr (v2)
    fill: bool  # a missing chunk reads as the fill value (orbax before it stored every chunk)

    def __str__(self) -> str:
        return ("OCDBT" if self.ocdbt else "a directory per array") + (", zarr3" if self.zarr3 else ", zarr v2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrbaxItem:
    """An orbax PyTree item, read: our records of its leaves and each array's TensorStore spec."""

    loc: paths.Location
    manifest: fmt.Manifest
    specs: dict[fmt.KeyPath, dict[str, Any]]
    storage: Storage

    def open_array(self, record: fmt.LeafRecord) -> Any:
        """The open future of an array leaf, with the metadata read and checked here."""
        return ts.open(self.specs[record.path], open=True, assume_metadata=True, context=context())


def param_name(path: Sequence[str | int]) -> str:
    """Orbax's name of a leaf's array: its key path joined by '.'."""
    return ".".join(str(k) for k in path)


def array_kvstore(item_kvstore: dict[str, Any], name: str, *, ocdbt: bool) -> dict[str, Any]:
    """The kvstore of array ``name``: a path in the item's OCDBT database, or its own directory."""
    if ocdbt:
        return {"driver": "ocdbt", "base": item_kvstore, "path": f"{name}/"}
    return {**item_kvstore, "path": f"{item_kvstore.get('path', '')}{name}/"}


def array_spec(kvstore: dict[str, Any], metadata: dict[str, Any], *, zarr3: bool, fill: bool) -> dict[str, Any]:
    """The TensorStore spec of an orbax array (pure); ``fill``: missing chunks read as fill value."""
    driver = "zarr3" if zarr3 else "zarr"
    return {"driver": driver, "kvstore": kvstore, "metadata": metadata, "fill_missing_data_reads": fill}


def _read(loc: paths.Location, name: str, limit: int) -> bytes | None:
    try:
        raw = paths.read_bytes(loc, name)
    except ValueError as e:  # TensorStore: the storage refused the read
        raise CorruptCheckpointError(f"{loc.join(name).url}: cannot read: {e}") from e
    if raw is not None and len(raw) > limit:
        raise CheckpointFormatError(f"{loc.join(name).url}: {len(raw)} bytes, more than {limit} orbax writes")
    return raw


def _json_object(raw: bytes, where: str) -> dict[str, Any]:
    data = fmt.loads(raw, where)
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{where}: expected a JSON object, found {show(data)}")
    return data


def has_commit_success(loc: paths.Location) -> bool:
    """Whether ``loc`` holds orbax's ``commit_success.txt`` (the commit of a step on GCS)."""
    return _read(loc, COMMIT_SUCCESS, MAX_JSON) is not None


def finalized(loc: paths.Location) -> bool:
    """Whether orbax counts the directory ``loc`` as finalized (its ``is_path_finalized``):
    not a temporary, and on GCS (where orbax commits with a file, not a rename) holding
    ``commit_success.txt``."""
    if TMP_MARK in loc.name:
        return False
    return not loc.url.startswith("gs://") or has_commit_success(loc)  # orbax: gcs_utils.is_gcs_path, on the URL


def _check_finalized(loc: paths.Location) -> None:
    """Refuses what orbax itself would not restore (not ``finalized``)."""
    if not finalized(loc):
        raise CheckpointNotFoundError(f"{loc.url} is an orbax checkpoint whose save did not finish")


def step_of_name(name: str) -> int | None:
    """The step of a directory name orbax's ``CheckpointManager`` lists: ``<step>`` or
    ``<prefix>_<step>`` (zero-padded or not); None for any other name, its temporaries too.

    >>> [step_of_name(n) for n in ("1000", "ckpt_00042", "7.orbax-checkpoint-tmp-1", "run-3")]
    [1000, 42, None, None]
    """
    match = _STEP_NAME.fullmatch(name)
    return None if match is None or TMP_MARK in name else int(match.group(1))


def unfinished_step(name: str) -> int | None:
    """The step of an orbax save that has not finished (``<name>.orbax-checkpoint-tmp-<time>``).

    >>> unfinished_step("ckpt_0042.orbax-checkpoint-tmp-17"), unfinished_step("42")
    (42, None)
    """
    match = _TMP_NAME.match(name)
    return None if match is None else int(match.group(1))


def step_metadata(loc: paths.Location) -> dict[str, Any] | None:
    """The ``_CHECKPOINT_METADATA`` object of an orbax step directory (None: it has none)."""
    raw = _read(loc, CHECKPOINT_METADATA, MAX_JSON)
    return None if raw is None else _json_object(raw, loc.join(CHECKPOINT_METADATA).url)


def _legacy_items(loc: paths.Location) -> dict[str, paths.Location]:
    """The items of a step directory of an orbax that wrote no ``_CHECKPOINT_METADATA``: under
    a step's name, its subdirectories, if one is a PyTree item (``_METADATA``)."""
    if step_of_name(loc.name) is None:
        return {}
    items = {name: loc.join(name) for name in paths.list_dirs(loc) if fmt.ITEM_NAME.fullmatch(name)}
    if len(items) > 10_000 or not any(_read(i, METADATA, MAX_JSON) is not None for i in items.values()):
        return {}
    return items


def _step_items(loc: paths.Location) -> dict[str, paths.Location]:
    """The items of an orbax step directory by name ({} if ``loc`` is none)."""
    data = step_metadata(loc)
    if data is None:
        return _legacy_items(loc)
    where = loc.join(CHECKPOINT_METADATA).url
    handlers = data.get("item_handlers")
    if isinstance(handlers, str):
        raise CheckpointFormatError(f"{where}: an orbax checkpoint of {handlers[:200]!r}, not a PyTree (no {METADATA})")
    if not isinstance(handlers, dict):  # no item names recorded: the subdirectories are the items
        handlers = {name: None for name in paths.list_dirs(loc) if fmt.ITEM_NAME.fullmatch(name)}
    if len(handlers) > 10_000 or not all(fmt.ITEM_NAME.fullmatch(name) for name in handlers):
        raise CheckpointFormatError(f"{where}: item names {show(list(handlers))}; expected names of [A-Za-z0-9_-]")
    return {name: loc.join(name) for name in handlers}


def find_items(loc: paths.Location) -> dict[str, paths.Location]:
    """The orbax items at ``loc`` by name ({} if it holds no orbax checkpoint); a bare item
    directory (``StandardCheckpointer.save(path)``) is one item named ``default``."""
    items = {DEFAULT_ITEM: loc} if _read(loc, METADATA, MAX_JSON) is not None else _step_items(loc)
    if items:
        _check_finalized(loc)
    return items


def open_item(loc: paths.Location, item: str) -> OrbaxItem | None:
    """The orbax PyTree item at ``loc`` (None: no orbax checkpoint there).

    ``loc`` is an item directory, or a step directory: then its item ``item`` (``pick_item``).
    """
    raw = _read(loc, METADATA, MAX_JSON)
    if raw is not None:
        _check_finalized(loc)
        return read_item(loc, raw)  # not None: the item is ``raw``
    items = _step_items(loc)
    if not items:
        return None
    _check_finalized(loc)
    name = pick_item(items, item, loc.url)
    found = read_item(items[name])
    if found is None:
        raise CheckpointFormatError(f"{items[name].url}: orbax item {name!r} is not a PyTree (no {METADATA})")
    return found


def pick_item(items: Collection[str], item: str, where: str) -> str:
    """The item of an orbax step a restore of ``item`` reads, as orbax's ``CheckpointManager``
    picks it: ``item`` itself, else its unnamed item ``default``, else the only one.

    >>> pick_item(["default"], "state", "ckpts/5"), pick_item(["params"], "state", "ckpts/5")
    ('default', 'params')
    """
    if item in items:
        return item
    if DEFAULT_ITEM in items:
        return DEFAULT_ITEM
    if len(items) == 1:
        return next(iter(items))
    if item == RESTORED_BY_DEFAULT:  # most likely named by no one: restore's default
        raise CheckpointNotFoundError(
            f"{where} holds orbax items {sorted(items)}, none of them {RESTORED_BY_DEFAULT!r} (the item restored "
            f"by default) or {DEFAULT_ITEM!r} (orbax's unnamed item): pass item= to pick one"
        )
    raise CheckpointNotFoundError(
        f"{where} has no orbax item {item!r}; items: {sorted(items)} (and no {DEFAULT_ITEM!r} item, which "
        "orbax restores when none is named): pass item= one of them"
    )


def _partition_specs(loc: paths.Location, names: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """The saved partition spec of each NamedSharding array by name, from ``_sharding``."""
    raw = _read(loc, SHARDING, MAX_JSON) if names else None
    if raw is None:
        return {}
    where = loc.join(SHARDING).url
    data, out = _json_object(raw, where), {}
    for name in names:
        value = data.get(base64.urlsafe_b64encode(name.encode()).decode())
        sharding = fmt.loads(value.encode(), f"{where} ({name})") if isinstance(value, str) else None
        if not isinstance(sharding, dict) or sharding.get("sharding_type") != "NamedSharding":
            continue  # a single device, or no record: restored replicated with mesh=
        spec = sharding.get("partition_spec")
        ok = isinstance(spec, list) and len(spec) <= MAX_DEPTH
        spec = spec if isinstance(spec, list) else []
        for entry in spec:
            axes = entry if isinstance(entry, list) else [entry]
            ok = ok and (entry is None or all(isinstance(a, str) and 0 < len(a) <= 200 for a in axes))
        if not ok:
            raise CheckpointFormatError(
                f"{where}: array {name!r}: partition_spec {show(sharding['partition_spec'])}; expected axis names"
            )
        out[name] = tuple(tuple(e) if isinstance(e, list) else e for e in spec)
    return out


def _array_metadata(
    item_kvstore: dict[str, Any], names: Sequence[str], ocdbt: bool, zarr3: bool, where: str
) -> list[Any]:
    """Each array's ``.zarray`` / ``zarr.json``, parsed (read concurrently, bounded in size)."""
    kv_spec = {"driver": "ocdbt", "base": item_kvstore} if ocdbt else item_kvstore
    file = "zarr.json" if zarr3 else ".zarray"
    try:
        kv = ts.KvStore.open(kv_spec, context=context()).result()
        results = [future.result() for future in [kv.read(f"{name}/{file}") for name in names]]
    except ValueError as e:  # TensorStore: storage refused, or an OCDBT database it cannot decode
        raise CorruptCheckpointError(f"{where}: cannot read the arrays' metadata: {e}") from e
    out = []
    for name, result in zip(names, results, strict=True):
        at = f"{where}/{name}/{file}" + (" (in the OCDBT database)" if ocdbt else "")
        if result.state != "value":
            raise CheckpointFormatError(f"{at}: missing: {METADATA} names array {name!r}, the checkpoint lacks it")
        if len(result.value) > MAX_ARRAY_JSON:
            raise CheckpointFormatError(f"{at}: {len(result.value)} bytes, more than {MAX_ARRAY_JSON}")
        out.append(fmt.loads(bytes(result.value), at))
        check_json_value(out[-1], "metadata", at)  # no oversized integers, nothing nested deeper than JSON allows
    return out


def _check_declared_scalar(record: fmt.LeafRecord, where: str) -> None:
    """A scalar leaf's zarr metadata declares one number: checked before the read, which would
    allocate whatever shape it declares (a forged one of GiBs aborted the process)."""
    if record.shape != () or fmt.dtype_from_name(record.dtype).kind not in "biuf":
        raise CheckpointFormatError(
            f"{where}/{record.array}: leaf {record.key!r}: orbax names it a scalar, its zarr metadata "
            f"declares {record.dtype} {list(record.shape)}; expected one number (shape [])"
        )


def _scalar_value(array: np.ndarray, key: str, where: str) -> tuple[Any, str]:
    if array.shape != () or array.dtype.kind not in "biuf":
        raise CheckpointFormatError(f"{where}: leaf {key!r}: a scalar stored as {array.dtype} {list(array.shape)}")
    value = array.item()
    return value, {"b": "bool", "f": "float"}.get(array.dtype.kind, "int")


def _strings(loc: paths.Location, leaves: Sequence[Entry]) -> dict[fmt.KeyPath, str]:
    names = {e.path: param_name(e.path) for e in leaves if e.value_type == "string"}
    raw = _read(loc, STRINGS, MAX_JSON) if names else None
    if names and raw is None:
        raise CheckpointFormatError(f"{loc.join(STRINGS).url}: missing, but {METADATA} names string leaves")
    data = _json_object(raw, loc.join(STRINGS).url) if raw is not None else {}
    for path, name in names.items():
        if not isinstance(data.get(name), str) or len(data[name]) > fmt.MAX_STR:
            raise CheckpointFormatError(f"{loc.join(STRINGS).url}: leaf {fmt.key_string(path)!r}: no string {name!r}")
    return {path: data[name] for path, name in names.items()}


def _safe_name(entry: Entry, where: str) -> str:
    name = param_name(entry.path)
    if len(name) > 4096 or any(part in ("", ".", "..") for part in name.split("/")):
        raise CheckpointFormatError(f"{where}: leaf {show(entry.path)}: array name {show(name)} is not a relative path")
    return name


def _array_records(
    item: paths.Location, stored: Sequence[Entry], storage: Storage
) -> tuple[dict[fmt.KeyPath, fmt.LeafRecord], dict[fmt.KeyPath, dict[str, Any]]]:
    """The record and TensorStore spec of each leaf stored as an array (scalars too)."""
    where = item.join(METADATA).url
    names = [_safe_name(e, where) for e in stored]
    if len(set(names)) != len(names):
        raise CheckpointFormatError(f"{where}: two leaves share an array name (keys joined by '.')")
    item_kv = paths.kvstore_spec(item)
    metas = _array_metadata(item_kv, names, storage.ocdbt, storage.zarr3, item.url)
    partition = _partition_specs(item, [n for e, n in zip(stored, names, strict=True) if e.value_type == "jax.Array"])
    specs, records = {}, {}
    for entry, name, meta in zip(stored, names, metas, strict=True):
        key = fmt.key_string(entry.path)
        try:
            shape, chunks, dtype = check_array_metadata(meta, storage.zarr3)
            kvstore = array_kvstore(item_kv, name, ocdbt=storage.ocdbt)
            spec = array_spec(kvstore, meta, zarr3=storage.zarr3, fill=storage.fill)
            ts.Spec(spec)  # TensorStore's own checks of codecs, fill value and the rest
        except ValueError as e:
            raise CheckpointFormatError(f"{item.url}/{name}: leaf {key!r}: {str(e)[:400]}") from None
        saved = partition.get(name)
        if saved is not None and len(saved) > len(shape):
            raise CheckpointFormatError(f"{item.join(SHARDING).url}: leaf {key!r}: spec {saved} for shape {shape}")
        specs[entry.path] = spec
        records[entry.path] = fmt.LeafRecord(
            path=entry.path, kind="array", source=ARRAY_TYPES.get(entry.value_type, "numpy"), shape=shape,
            dtype=dtype, stored_dtype=dtype, zarr_dtype=dtype, chunks=chunks, array=name,
            partition_spec=None if saved is None else saved + (None,) * (len(shape) - len(saved)),
        )  # fmt: skip
    return records, specs


def _records(
    item: paths.Location, leaves: Sequence[Entry], storage: Storage
) -> tuple[list[fmt.LeafRecord], dict[fmt.KeyPath, dict[str, Any]]]:
    """Our record of each leaf (scalars and strings read now), and each array leaf's spec."""
    records, specs = _array_records(item, [e for e in leaves if e.value_type in (*ARRAY_TYPES, "scalar")], storage)
    scalars = [e.path for e in leaves if e.value_type == "scalar"]
    for path in scalars:
        _check_declared_scalar(records[path], item.url)
    opened = [ts.open(specs.pop(p), open=True, assume_metadata=True, context=context()) for p in scalars]
    try:
        values = [future.result().read().result() for future in opened]
    except ValueError as err:
        raise CorruptCheckpointError(f"{item.url}: cannot read a scalar leaf: {err}") from err
    for path, array in zip(scalars, values, strict=True):
        value, value_type = _scalar_value(array, fmt.key_string(path), item.url)
        records[path] = fmt.LeafRecord(path=path, kind="scalar", value=value, value_type=value_type)
    for path, text in _strings(item, leaves).items():
        records[path] = fmt.LeafRecord(path=path, kind="scalar", value=text, value_type="str")
    for e in leaves:
        if e.value_type in NONE_TYPES:
            records[e.path] = fmt.LeafRecord(path=e.path, kind="scalar", value=None, value_type="none")
    return [records[e.path] for e in leaves], specs


def read_item(loc: paths.Location, raw: bytes | None = None) -> OrbaxItem | None:
    """Reads and checks the orbax PyTree item directory ``loc`` (None: it holds no ``_METADATA``,
    another kind of item): ``_METADATA`` (``raw``, if read already), each array's zarr
    metadata, scalar and string values, saved partition specs."""
    where = loc.join(METADATA).url
    raw = _read(loc, METADATA, MAX_JSON) if raw is None else raw
    if raw is None:
        return None
    data = _json_object(raw, where)
    tree_metadata = data.get("tree_metadata")
    if not isinstance(tree_metadata, dict):
        raise CheckpointFormatError(f"{where}: tree_metadata: expected an object, found {show(tree_metadata)}")
    tree, leaves = build_tree([entry_of(k, v, where) for k, v in tree_metadata.items()], where)
    ocdbt = flag(data, "use_ocdbt", None, where)
    if ocdbt is None:  # older orbax: OCDBT iff its manifest is there
        ocdbt = _read(loc, "manifest.ocdbt", MAX_JSON) is not None
    storage = Storage(
        ocdbt=ocdbt,
        zarr3=bool(flag(data, "use_zarr3", False, where)),
        fill=not flag(data, "store_array_data_equal_to_fill_value", False, where),
    )
    records, specs = _records(loc, leaves, storage)
    return OrbaxItem(loc=loc, manifest=fmt.Manifest(tree=tree, leaves=tuple(records)), specs=specs, storage=storage)
