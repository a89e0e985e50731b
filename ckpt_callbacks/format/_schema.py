"""Checks of ``manifest.json`` and ``metadata.json`` before any field of them is used.

The commit marker's crc32c catches damage; these checks catch files that are well-formed JSON
with a valid crc but describe something no save writes (a forged or buggy file): every
failure is a ``CheckpointFormatError`` naming the file, the leaf and the field.

>>> check_tree({"dict": [["w", {"leaf": 0}]]}, [("w",)], "m.json")
>>> check_tree({"dict": [["v", {"leaf": 0}]]}, [("w",)], "m.json")
Traceback (most recent call last):
...
ckpt_callbacks.errors.CheckpointFormatError: m.json: tree puts leaf 0 at 'v', but leaves[0] is 'w'
"""

from __future__ import annotations

import itertools
import math
import reprlib
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckpt_callbacks.errors import CheckpointFormatError
from ckpt_callbacks.format import _process_index as process_index
from ckpt_callbacks.format import _records as fmt

MAX_DEPTH = 100  # nesting of the tree structure and of metadata extras
MAX_STR = fmt.MAX_STR
MAX_DIM = 1 << 62
MAX_LEAF_BYTES = 1 << 50
# PRNG key implementations: (leaf dtype as saved, trailing key-data dims); key data is uint32.
KEY_IMPLS = {"threefry2x32": ("key<fry>", (2,)), "rbg": ("key<rbg>", (4,)), "unsafe_rbg": ("key<urbg>", (4,))}
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60


def _floating(dtype: np.dtype) -> bool:
    """numpy floats and ml_dtypes floats (bfloat16, float8_*), which numpy does not call floating."""
    return bool(np.issubdtype(dtype, np.floating)) or (dtype.kind == "V" and "float" in dtype.name)


class _Bad(ValueError):
    """One field of a record is wrong: (field, what was expected and found)."""


def show(value: Any) -> str:
    return _SHOW.repr(value)


def _int(value: Any, field: str, lo: int = 0, hi: int = MAX_DIM) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _Bad(field, f"expected an integer in [{lo}, {hi}], found {show(value)}")
    return value


def _str(value: Any, field: str, limit: int = MAX_STR) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _Bad(field, f"expected a string of at most {limit} characters, found {show(value)}")
    return value


def _ints(value: Any, field: str, hi: int = MAX_DIM) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DEPTH:
        raise _Bad(field, f"expected a list of at most {MAX_DEPTH} integers, found {show(value)}")
    return tuple(_int(x, f"{field}[{i}]", 0, hi) for i, x in enumerate(value))


def _dtype(value: Any, field: str) -> np.dtype:
    if not isinstance(value, str) or value not in fmt.NUMERIC_DTYPES:
        raise _Bad(field, f"dtype {show(value)} is not one of {sorted(fmt.NUMERIC_DTYPES)}")
    return fmt.dtype_from_name(value)


def _path(value: Any) -> fmt.KeyPath:
    if not isinstance(value, list) or len(value) > MAX_DEPTH:
        raise _Bad("path", f"expected a list of at most {MAX_DEPTH} keys, found {show(value)}")
    for i, key in enumerate(value):
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise _Bad(f"path[{i}]", f"expected a str or int key, found {show(key)}")
        if isinstance(key, str):
            _str(key, f"path[{i}]")
    return tuple(value)


def check_scalar(value: Any, value_type: Any) -> None:
    """Refuses a scalar whose JSON value does not fit its ``value_type``."""
    ok = {
        "none": value is None,
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": (isinstance(value, float) and math.isfinite(value)) or value in ("nan", "inf", "-inf"),
        "str": isinstance(value, str) and len(value) <= MAX_STR,
    }
    if not isinstance(value_type, str) or value_type not in ok:
        raise _Bad("value_type", f"expected one of {sorted(ok)}, found {show(value_type)}")
    if not ok[value_type]:
        raise _Bad("value", f"{show(value)} is not a value of type {value_type}")


def _check_dtypes(rec: dict[str, Any], kind: Any, source: Any) -> int:
    """The dtype fields of an array or PRNG key leaf; returns the stored itemsize."""
    if kind == "prng_key":
        impl = rec.get("key_impl")
        if not isinstance(impl, str) or impl not in KEY_IMPLS:
            raise _Bad("key_impl", f"expected one of {sorted(KEY_IMPLS)}, found {show(impl)}")
        dtype, tail = KEY_IMPLS[impl]
        if rec.get("dtype") != dtype or _ints(rec.get("key_tail"), "key_tail") != tail:
            raise _Bad("dtype", f"a {impl} key is dtype {dtype!r} with key_tail {list(tail)}")
        if source != "jax" or rec.get("stored_dtype") != "uint32" or rec.get("zarr_dtype") != "uint32":
            raise _Bad("stored_dtype", "a PRNG key is a jax leaf stored as uint32 key data")
        return 4
    if source not in ("jax", "numpy"):
        raise _Bad("source", f"expected 'jax' or 'numpy', found {show(source)}")
    if rec.get("key_impl", "") != "" or rec.get("key_tail", []) != []:
        raise _Bad("key_impl", "an array leaf has no key_impl or key_tail")
    original, stored = _dtype(rec.get("dtype"), "dtype"), _dtype(rec.get("stored_dtype"), "stored_dtype")
    floats = _floating(original) and _floating(stored)
    if original != stored and not floats:
        raise _Bad("stored_dtype", f"{stored.name} for a {original.name} leaf (only floating leaves are cast)")
    zarr = _dtype(rec.get("zarr_dtype"), "zarr_dtype")
    if zarr.itemsize != stored.itemsize:
        raise _Bad("zarr_dtype", f"{zarr.name} ({zarr.itemsize} bytes) stores {stored.name} ({stored.itemsize} bytes)")
    return stored.itemsize


def _check_grid(rec: dict[str, Any], data_shape: tuple[int, ...]) -> None:
    """Chunk grid, checksums and pack entries: exactly the chunks the grid has."""
    chunks = _ints(rec.get("chunks"), "chunks")
    if len(chunks) != len(data_shape) or any(not 1 <= c <= max(n, 1) for c, n in zip(chunks, data_shape, strict=False)):
        raise _Bad("chunks", f"{list(chunks)} for stored shape {list(data_shape)} (each in [1, dim])")
    grid = [-(-n // c) for n, c in zip(data_shape, chunks, strict=True)]
    crcs = rec.get("crc32c")
    if "writers" in rec:  # layout "process": the chunks' records are in the writers' index files
        _check_writers(rec, math.prod(grid))
        return
    if not isinstance(crcs, dict) or len(crcs) != math.prod(grid):
        found = f"{len(crcs)} entries" if isinstance(crcs, dict) else show(crcs)
        raise _Bad("crc32c", f"expected one checksum per chunk of grid {grid} ({math.prod(grid)}), found {found}")
    for key, crc in crcs.items():
        parts = key.split(".") if grid else [key]
        bounds = grid or [1]
        if len(parts) != len(bounds) or not all(p.isdigit() and str(int(p)) == p for p in parts):
            raise _Bad("crc32c", f"key {show(key)} is not a chunk of grid {grid}")
        if any(int(p) >= g for p, g in zip(parts, bounds, strict=True)):
            raise _Bad("crc32c", f"key {show(key)} is outside grid {grid}")
        _int(crc, f"crc32c[{key!r}]", 0, 2**32 - 1)
    pack = rec.get("pack", {})
    if not isinstance(pack, dict) or (pack and pack.keys() != crcs.keys()):
        raise _Bad("pack", f"expected an entry for each chunk of grid {grid} or none, found {show(pack)}")
    for key, where in pack.items():
        if not isinstance(where, list) or len(where) != 2 or not fmt.PACK_NAME.fullmatch(str(where[0])):
            raise _Bad(f"pack[{key!r}]", f"expected ['pack.<process>-<n>', offset], found {show(where)}")
        _int(where[1], f"pack[{key!r}] offset", 0, MAX_LEAF_BYTES)


def _check_writers(rec: dict[str, Any], chunks: int) -> None:
    if chunks > process_index.MAX_LEAF_CHUNKS:
        raise _Bad(
            "chunks", f"{chunks} chunks; a leaf in the process layout has at most {process_index.MAX_LEAF_CHUNKS}"
        )
    if rec.get("crc32c") != {} or "pack" in rec:
        raise _Bad("crc32c", "a leaf with writers keeps its chunks' records in index files: expected {} and no pack")
    try:
        process_index.check_writers(rec["writers"], chunks)
    except ValueError as e:
        raise _Bad("writers", str(e)) from None


def _check_sharding(rec: dict[str, Any], rank: int) -> None:
    spec = rec.get("partition_spec")
    if spec is not None:
        if not isinstance(spec, list) or len(spec) != rank:
            raise _Bad("partition_spec", f"expected null or a list of {rank} entries, found {show(spec)}")
        for i, entry in enumerate(spec):
            names = entry if isinstance(entry, list) else [entry]
            if not all(isinstance(n, str) and len(n) <= 200 for n in names) and entry is not None:
                raise _Bad(
                    f"partition_spec[{i}]", f"expected null, a mesh axis name or a list of them, found {show(entry)}"
                )
    mesh = rec.get("mesh")
    if mesh is not None:
        axis_names = mesh.get("axis_names") if isinstance(mesh, dict) else None
        if not isinstance(axis_names, list) or not all(isinstance(n, str) for n in axis_names):
            raise _Bad("mesh", f"expected {{'axis_names': [str, ...], 'axis_sizes': [int, ...]}}, found {show(mesh)}")
        sizes = _ints(mesh.get("axis_sizes"), "mesh.axis_sizes")
        if len(sizes) != len(axis_names):
            raise _Bad("mesh", f"{len(axis_names)} axis names but {len(sizes)} axis sizes")


def _check_array(rec: dict[str, Any], path: fmt.KeyPath, kind: Any) -> None:
    itemsize = _check_dtypes(rec, kind, rec.get("source"))
    shape = _ints(rec.get("shape"), "shape")
    data_shape = shape + _ints(rec.get("key_tail", []), "key_tail")
    if len(data_shape) > MAX_DEPTH or math.prod(data_shape) * itemsize > MAX_LEAF_BYTES:
        raise _Bad("shape", f"{list(shape)}: more than {MAX_LEAF_BYTES} bytes, more than any leaf a save writes")
    _check_grid(rec, data_shape)
    _check_sharding(rec, len(shape))
    if rec.get("array") != fmt.leaf_dir(path):
        raise _Bad("array", f"expected {fmt.leaf_dir(path)!r} (the leaf's directory), found {show(rec.get('array'))}")


def check_record(rec: Any, index: int, where: str) -> None:
    """Refuses a leaf record (raw JSON) that no save writes, naming leaf and field."""
    name = f"leaves[{index}]"
    try:
        if not isinstance(rec, dict):
            raise _Bad("record", f"expected a JSON object, found {show(rec)}")
        path = _path(rec.get("path"))
        name = f"leaf {fmt.key_string(path)!r}"
        kind = rec.get("kind")
        if kind == "scalar":
            check_scalar(rec.get("value"), rec.get("value_type"))
        elif kind in typing.get_args(fmt.LeafKind):
            _check_array(rec, path, kind)
        else:
            raise _Bad("kind", f"expected one of {typing.get_args(fmt.LeafKind)}, found {show(kind)}")
    except _Bad as e:
        field, problem = e.args
        raise CheckpointFormatError(f"{where}: {name}: field {field!r}: {problem}") from None


def check_tree(tree: Any, leaf_paths: Sequence[fmt.KeyPath], where: str) -> None:
    """Refuses a tree structure that is not nested dict/list/tuple nodes of at most ``MAX_DEPTH``
    levels using each leaf exactly once, at the path its record names."""
    seen = [False] * len(leaf_paths)
    stack: list[tuple[Any, fmt.KeyPath]] = [(tree, ())]
    while stack:
        node, path = stack.pop()
        at = f"{where}: tree at {fmt.key_string(path)!r}"
        if len(path) > MAX_DEPTH:
            raise CheckpointFormatError(f"{at}: nested deeper than {MAX_DEPTH} levels")
        kinds = [k for k in ("leaf", "dict", "list", "tuple") if isinstance(node, dict) and k in node]
        if len(kinds) != 1 or set(node) - {kinds[0], "node"} or ("node" in node and kinds != ["dict"]):
            raise CheckpointFormatError(f"{at}: expected a leaf, dict, list or tuple node, found {show(node)}")
        if "node" in node and not (isinstance(node["node"], str) and len(node["node"]) <= 200):
            raise CheckpointFormatError(f"{at}: field 'node': expected a type name, found {show(node['node'])}")
        body = node[kinds[0]]
        if kinds == ["leaf"]:
            _check_leaf_use(body, path, leaf_paths, seen, where)
        elif kinds == ["dict"]:
            stack.extend((child, (*path, key)) for key, child in _entries(body, at))
        elif not isinstance(body, list):
            raise CheckpointFormatError(f"{at}: field {kinds[0]!r}: expected a list of nodes, found {show(body)}")
        else:
            stack.extend((child, (*path, i)) for i, child in enumerate(body))
    unused = [i for i, used in enumerate(seen) if not used]
    if unused:
        raise CheckpointFormatError(f"{where}: tree: leaves {unused[:10]} are in no tree node")


def _check_leaf_use(
    index: Any, path: fmt.KeyPath, leaf_paths: Sequence[fmt.KeyPath], seen: list[bool], at: str
) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(leaf_paths):
        raise CheckpointFormatError(f"{at}: field 'leaf': {show(index)} is no index of the {len(leaf_paths)} leaves")
    if seen[index]:
        raise CheckpointFormatError(f"{at}: field 'leaf': leaf {index} is used twice")
    seen[index] = True
    if leaf_paths[index] != path:
        raise CheckpointFormatError(
            f"{at.split(': tree at', maxsplit=1)[0]}: tree puts leaf {index} at {fmt.key_string(path)!r}, "
            f"but leaves[{index}] is {fmt.key_string(leaf_paths[index])!r}"
        )


def _entries(body: Any, at: str) -> list[tuple[str | int, Any]]:
    if not isinstance(body, list):
        raise CheckpointFormatError(f"{at}: field 'dict': expected a list of [key, node], found {show(body)}")
    out: list[tuple[str | int, Any]] = []
    for entry in body:
        ok = isinstance(entry, list) and len(entry) == 2 and not isinstance(entry[0], bool)
        if not ok or not isinstance(entry[0], str | int) or (isinstance(entry[0], str) and len(entry[0]) > MAX_STR):
            raise CheckpointFormatError(f"{at}: field 'dict': expected [str or int key, node], found {show(entry)}")
        out.append((entry[0], entry[1]))
    if len({k for k, _ in out}) != len(out):
        raise CheckpointFormatError(f"{at}: field 'dict': a key appears twice")
    return out


# What a format-v1 manifest may record as its layout: none ("zarr3"), or the process layout's
# block (checked by ``process_index.check_layout``). A new layout is added here first.
LAYOUT_KINDS = ("zarr3", "process")


def check_manifest(data: dict[str, Any], where: str) -> None:
    """Every leaf record, then the tree structure (``data`` is a JSON object of format v1)."""
    leaves = data.get("leaves")
    if not isinstance(leaves, list):
        raise CheckpointFormatError(f"{where}: field 'leaves': expected a list, found {show(leaves)}")
    if "tree" not in data:
        raise CheckpointFormatError(f"{where}: manifest lacks 'tree'")
    for i, rec in enumerate(leaves):
        check_record(rec, i, where)
    check_tree(data["tree"], [tuple(rec["path"]) for rec in leaves], where)
    writers = [rec["writers"] for rec in leaves if "writers" in rec]
    if "layout" in data:
        if any(rec["kind"] != "scalar" and rec["crc32c"] for rec in leaves):
            raise CheckpointFormatError(f"{where}: a manifest with a 'layout' keeps no chunk checksums in its leaves")
        process_index.check_layout(data["layout"], writers, where)
    elif writers:
        raise CheckpointFormatError(f"{where}: leaves name writers, but the manifest has no 'layout'")


def check_pack_overlap(records: Sequence[fmt.LeafRecord], where: str) -> None:
    """Refuses packed chunks that overlap in a pack file, so that together they claim no more
    bytes than the pack files hold (each is checked against its file's length on read)."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for record in records:
        itemsize = fmt.dtype_from_name(record.zarr_dtype).itemsize if record.pack else 0
        for key, (name, offset) in record.pack.items():
            index = [int(p) for p in key.split(".")] if record.chunks else []
            dims = [min(c, n - i * c) for i, c, n in zip(index, record.chunks, record.data_shape, strict=True)]
            spans.setdefault(name, []).append(
                (offset, offset + math.prod(dims) * itemsize, f"leaf {record.key!r} chunk {key}")
            )
    for name, found in spans.items():
        found.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(found):
            if start < end:
                raise CheckpointFormatError(
                    f"{where}: field 'pack': {first} and {second} overlap in {name} (bytes {start}-{end})"
                )


def check_json_value(value: Any, field: str, where: str) -> None:
    """Refuses a JSON value nested deeper than ``MAX_DEPTH`` or holding an oversized integer."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CheckpointFormatError(f"{where}: field {field!r}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif item is not None and not isinstance(item, str | int | float):
            raise CheckpointFormatError(f"{where}: field {field!r}: {show(item)} is no JSON value")


def check_metadata(data: dict[str, Any], where: str) -> None:
    """The fields of ``metadata.json`` (``data`` is a JSON object of format v1)."""
    try:
        if "step" not in data:
            raise _Bad("step", "missing (expected an integer or null)")
        if data["step"] is not None:
            _int(data.get("step"), "step", -(2**63), 2**63 - 1)
        stamp = data.get("timestamp")
        if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
            raise _Bad("timestamp", f"expected a finite number, found {show(stamp)}")
        if not isinstance(data.get("is_temporary", False), bool):
            raise _Bad("is_temporary", f"expected true or false, found {show(data.get('is_temporary'))}")
        if not isinstance(data.get("extras") or {}, dict):
            raise _Bad("extras", f"expected an object, found {show(data.get('extras'))}")
        items = data.get("items", ["state"])
        if not isinstance(items, list) or not items or len(set(map(str, items))) != len(items):
            raise _Bad("items", f"expected a list of distinct item names, found {show(items)}")
        for item in items:
            if not isinstance(item, str) or not fmt.ITEM_NAME.fullmatch(item):
                raise _Bad("items", f"item name {show(item)}: expected letters, digits, '_' and '-'")
    except _Bad as e:
        field, problem = e.args
        raise CheckpointFormatError(f"{where}: field {field!r}: {problem}") from None
    check_json_value(data.get("extras"), "extras", where)


def parse_manifest(data: dict[str, Any], where: str) -> fmt.Manifest:
    """The manifest in ``data``, checked first: nothing unchecked is used."""
    fmt.check_version(data, where)
    check_manifest(data, where)
    leaves = tuple(fmt.LeafRecord.from_json(x) for x in data["leaves"])
    manifest = fmt.Manifest(tree=data["tree"], leaves=leaves, layout=data.get("layout"))
    check_pack_overlap(manifest.leaves, where)
    return manifest


def parse_metadata(data: dict[str, Any], where: str) -> fmt.Metadata:
    """The metadata in ``data``, checked first."""
    fmt.check_version(data, where)
    check_metadata(data, where)
    return fmt.Metadata(
        step=data["step"],
        timestamp=float(data["timestamp"]),
        is_temporary=data.get("is_temporary", False),
        extras=dict(data.get("extras") or {}),
        items=tuple(data.get("items", ("state",))),
    )
