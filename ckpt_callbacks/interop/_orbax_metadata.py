"""Orbax's ``_METADATA`` and array metadata, checked before use (pure: JSON in, records out).

>>> build_tree([Entry(path=("w",), value_type="jax.Array")], "_METADATA")[0]
{'dict': [['w', {'leaf': 0}]]}
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import CheckpointFormatError
from ckpt_callbacks.format import MAX_DEPTH, MAX_DIM, MAX_LEAF_BYTES, show
from ckpt_callbacks.layouts import host_memory

ARRAY_TYPES: dict[str, fmt.LeafSource] = {"jax.Array": "jax", "np.ndarray": "numpy"}
EMPTY_NODES: dict[str, dict[str, list[Any]]] = {"Dict": {"dict": []}, "List": {"list": []}, "Tuple": {"tuple": []}}
NONE_TYPES = ("None", "NamedTuple")  # orbax restores an empty NamedTuple as None
VALUE_TYPES = (*ARRAY_TYPES, "scalar", "string", *EMPTY_NODES, *NONE_TYPES)
_ZARR2_DTYPE = re.compile(r"[<>|]([biufc][0-9]{1,2})")
_INDEX = re.compile(r"[0-9]{1,18}")
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a JSON string, but no file or array name


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entry:
    """One leaf of ``_METADATA``: its key path and orbax value type."""

    path: fmt.KeyPath
    value_type: str


def _key(raw: Any, at: str) -> str | int:
    """One key: a dict key or attribute name (key_type 2, a string), or a sequence index (1)."""
    kind, key = (raw.get("key_type"), raw.get("key")) if isinstance(raw, dict) else (None, None)
    if kind == 2 and isinstance(key, str) and len(key) <= fmt.MAX_STR and not _SURROGATE.search(key):
        return key
    if kind == 1 and isinstance(key, str | int) and not isinstance(key, bool) and _INDEX.fullmatch(str(key)):
        return int(key)
    raise CheckpointFormatError(f"{at}: expected a string key (key_type 2) or an index (key_type 1), found {show(raw)}")


def entry_of(name: str, raw: Any, where: str) -> Entry:
    at = f"{where}: tree_metadata[{show(name)}]"
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{at}: expected an object, found {show(raw)}")
    keys, value = raw.get("key_metadata"), raw.get("value_metadata")
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_DEPTH:
        raise CheckpointFormatError(f"{at}: key_metadata: expected a list of 1 to {MAX_DEPTH} keys, found {show(keys)}")
    path = tuple(_key(k, f"{at}: key_metadata[{i}]") for i, k in enumerate(keys))
    value_type = value.get("value_type") if isinstance(value, dict) else None
    if value_type not in VALUE_TYPES:
        raise CheckpointFormatError(
            f"{at}: leaf {fmt.key_string(path)!r}: value_type {show(value_type)}; this reader supports {VALUE_TYPES}"
        )
    return Entry(path=path, value_type=value_type)


def flag(data: dict[str, Any], name: str, default: bool | None, where: str) -> bool | None:
    value = data.get(name, default)
    if value is not None and not isinstance(value, bool):
        raise CheckpointFormatError(f"{where}: {name}: expected true or false, found {show(value)}")
    return value


def build_tree(entries: Sequence[Entry], where: str) -> tuple[dict[str, Any], list[Entry]]:
    """Our tree structure JSON from orbax's flat key paths, and its leaves in tree order.

    >>> tree, leaves = build_tree([Entry(path=("a", 1), value_type="scalar"),
    ...                            Entry(path=("a", 0), value_type="Dict")], "m")
    >>> tree, [e.path for e in leaves]
    ({'dict': [['a', {'list': [{'dict': []}, {'leaf': 0}]}]]}, [('a', 1)])
    """
    root: dict[Any, Any] = {}
    for e in entries:
        node = root
        for depth, key in enumerate(e.path):
            if key in node and (depth == len(e.path) - 1 or not isinstance(node[key], dict)):
                raise CheckpointFormatError(
                    f"{where}: key path {fmt.key_string(e.path)!r} is named twice, or in a leaf"
                )
            node = node.setdefault(key, e if depth == len(e.path) - 1 else {})
    leaves: list[Entry] = []

    def walk(node: dict[Any, Any] | Entry, path: fmt.KeyPath) -> dict[str, Any]:
        if isinstance(node, Entry):
            if node.value_type in EMPTY_NODES:
                return EMPTY_NODES[node.value_type]
            leaves.append(node)
            return {"leaf": len(leaves) - 1}
        kinds = {isinstance(k, int) for k in node}
        if kinds == {True}:
            if sorted(node) != list(range(len(node))):
                raise CheckpointFormatError(f"{where}: sequence {fmt.key_string(path)!r} has indices {sorted(node)}")
            return {"list": [walk(node[i], (*path, i)) for i in range(len(node))]}
        if len(kinds) > 1:
            raise CheckpointFormatError(f"{where}: node {fmt.key_string(path)!r} mixes dict keys and sequence indices")
        return {"dict": [[k, walk(child, (*path, k))] for k, child in node.items()]}

    return walk(root, ()), leaves


def _zarr2_dtype(text: Any) -> str | None:
    if isinstance(text, str) and text in fmt.NUMERIC_DTYPES and not hasattr(np, text):
        return text  # bfloat16, float8_*, int4: TensorStore's zarr names of the ml_dtypes
    match = _ZARR2_DTYPE.fullmatch(text) if isinstance(text, str) else None
    try:
        name = np.dtype(match.group(1)).name if match else None
    except TypeError:  # 'f3', 'i5'
        return None
    return name if name in fmt.NUMERIC_DTYPES else None


def _dims(value: Any, lo: int) -> tuple[int, ...] | None:
    ok = isinstance(value, list) and len(value) <= MAX_DEPTH
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= MAX_DIM for x in value)
    return tuple(value) if ok else None


def _inner_chunks(codecs: Any) -> tuple[int, ...] | None:
    """The chunk shape inside the shards of a sharded zarr3 array (None: not sharded)."""
    inner = None
    for _ in range(4):  # sharding nests: each level's codecs hold the next one's
        config = next((c.get("configuration") for c in codecs if c.get("name") == "sharding_indexed"), None)
        if not isinstance(config, dict):
            return inner
        inner, codecs = _dims(config.get("chunk_shape"), 1), config.get("codecs")
        if inner is None or not isinstance(codecs, list) or not all(isinstance(c, dict) for c in codecs):
            raise ValueError(f"sharding_indexed: expected a chunk_shape and codecs, found {show(config)}")
    raise ValueError("sharding_indexed nested more than 4 levels")


def check_array_metadata(meta: Any, zarr3: bool) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """(shape, chunk shape, dtype) of a zarr (v2) or zarr3 array's metadata, with the bytes they
    claim bounded; raises ValueError. TensorStore checks the rest (codecs, fill value).

    >>> check_array_metadata({"zarr_format": 2, "shape": [8], "chunks": [4], "dtype": "<f4"}, False)
    ((8,), (4,), 'float32')
    """
    if not isinstance(meta, dict) or meta.get("zarr_format") != (3 if zarr3 else 2):
        raise ValueError(f"expected zarr{3 if zarr3 else ' v2'} array metadata, found {show(meta)}")
    shape = _dims(meta.get("shape"), 0)
    if shape is None:
        raise ValueError(f"shape: expected a list of at most {MAX_DEPTH} sizes, found {show(meta.get('shape'))}")
    if zarr3:
        dtype = meta["data_type"] if meta.get("data_type") in fmt.NUMERIC_DTYPES else None
        grid = meta.get("chunk_grid")
        config = grid.get("configuration") if isinstance(grid, dict) and grid.get("name") == "regular" else None
        chunks = _dims(config.get("chunk_shape"), 1) if isinstance(config, dict) else None
        codecs = meta.get("codecs")
        if not isinstance(codecs, list) or not all(isinstance(c, dict) for c in codecs):
            raise ValueError(f"codecs: expected a list of codecs, found {show(codecs)}")
        inner = _inner_chunks(codecs) or chunks
    else:
        dtype, chunks = _zarr2_dtype(meta.get("dtype")), _dims(meta.get("chunks"), 1)
        inner = chunks
    if dtype is None:
        raise ValueError(f"dtype {show(meta.get('data_type' if zarr3 else 'dtype'))} is not a numeric dtype")
    if chunks is None or len(chunks) != len(shape) or any(c > max(n, 1) for c, n in zip(chunks, shape, strict=True)):
        raise ValueError(
            f"chunk shape: expected {len(shape)} sizes in [1, dim] for {list(shape)}, found {show(chunks)}"
        )
    if inner is None or len(inner) != len(shape):
        raise ValueError(f"inner chunk shape {show(inner)} for shape {list(shape)}")
    itemsize = fmt.dtype_from_name(dtype).itemsize
    per_shard = math.prod(-(-c // i) for c, i in zip(chunks, inner, strict=True))  # entries of a shard's index
    if math.prod(shape) * itemsize > MAX_LEAF_BYTES or max(math.prod(inner) * itemsize, 16 * per_shard) > host_memory():
        raise ValueError(f"shape {list(shape)} chunks {list(inner)}: more bytes than this host can read")
    return shape, chunks, dtype
