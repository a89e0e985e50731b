"""Format v1: tree structure, leaf records, manifests and metadata as plain JSON.

A checkpoint directory holds ``metadata.json``, one ``<item>/manifest.json`` per item, the
items' zarr3 arrays, small leaves packed into ``<item>/pack.<process>-<n>`` files (raw bytes at
offsets the manifest gives), and ``COMMITTED``, written last, which names the metadata file
and item directories of the committed version. Nothing here runs code on load: JSON only.

>>> escape_component("../x")
'%2E%2E%2Fx'
>>> key_string(("params", "Dense_0", "kernel"))
'params/Dense_0/kernel'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from collections.abc import Sequence
from typing import Any, Literal

import crc32c
import ml_dtypes
import numpy as np

from ckpt_callbacks.errors import CheckpointFormatError

# Key paths and tree structure live in ``trees``; callers reach them as ``format.<name>``.
from ckpt_callbacks.format._trees import (  # noqa: F401
    KeyPath,
    escape_component,
    flatten,
    key_string,
    leaf_dir,
    path_of,
    unflatten,
)

FORMAT_NAME = "ckpt_callbacks"
FORMAT_VERSION = 1
# Pack file names hold a '.', which no escaped key component (a leaf's directory) can.
PACK_NAME = re.compile(r"pack\.[0-9]+-[0-9]+")

METADATA_NAME = re.compile(r"metadata(\.ckpt-[0-9a-f]{8})?\.json")
LeafKind = Literal["array", "prng_key", "scalar"]
LeafSource = Literal["", "jax", "numpy"]  # "" for scalars
ITEM_NAME = re.compile(r"[A-Za-z0-9_-]+")
# The dtypes a leaf can be stored in (what ``leaves._check_dtype`` accepts): numeric numpy dtypes
# and the ml_dtypes ones. No other name is ever turned into a dtype (no 'O', 'U2', 'V8', 'M8').
_ML_DTYPES = (
    "bfloat16 float8_e3m4 float8_e4m3 float8_e4m3b11fnuz float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
    "float8_e5m2fnuz float8_e8m0fnu float6_e2m3fn float6_e3m2fn float4_e2m1fn int2 int4 uint2 uint4"
)
_NP_DTYPES = "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 complex64 complex128"
NUMERIC_DTYPES = frozenset(_NP_DTYPES.split() + [name for name in _ML_DTYPES.split() if hasattr(ml_dtypes, name)])
MAX_INT_DIGITS = 400  # of an integer in a JSON file we read (Python's own limit is 4300)
MAX_STR = 1 << 20  # characters of a string scalar


def crc32c_of(array: np.ndarray) -> int:
    """The crc32c of an array's bytes in C order, as stored (the per-chunk checksum)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return int(crc32c.crc32c(flat.data))


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


@functools.cache
def dtype_from_name(name: str) -> np.dtype:
    """A numpy dtype from its name, one of ``NUMERIC_DTYPES`` (bfloat16, float8_*, int4 included)."""
    if name not in NUMERIC_DTYPES:
        raise CheckpointFormatError(f"unknown dtype {name!r} in manifest; expected one of {sorted(NUMERIC_DTYPES)}")
    candidate = getattr(ml_dtypes, name, None)
    return np.dtype(candidate if isinstance(candidate, type) else name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeafRecord:
    """What the manifest says of one leaf."""

    path: KeyPath
    kind: LeafKind
    source: LeafSource = ""
    shape: tuple[int, ...] = ()
    dtype: str = ""  # dtype of the leaf in the saved tree
    stored_dtype: str = ""  # dtype of the stored values (after a ``dtype=`` cast)
    zarr_dtype: str = ""  # zarr3 data_type on disk
    key_impl: str = ""
    key_tail: tuple[int, ...] = ()  # trailing key-data dims of a PRNG key leaf
    partition_spec: tuple[Any, ...] | None = None
    mesh: dict[str, Any] | None = None
    array: str = ""
    chunks: tuple[int, ...] = ()
    crc32c: dict[str, int] = dataclasses.field(default_factory=dict)
    value: Any = None
    value_type: str = ""
    # A small leaf's chunks live in pack files in the item directory, not in a zarr3 array:
    # chunk key -> (pack file, byte offset of the chunk's C-order little-endian bytes).
    pack: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    # Layout "process": the writer of each chunk as blocks [p0, dp, run, reps] (see process_index);
    # the chunks' files and crc32c are in the writers' index files, not here.
    writers: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in typing.get_args(LeafKind):
            raise CheckpointFormatError(f"leaf {key_string(self.path)!r}: unknown kind {self.kind!r}")
        if self.source not in typing.get_args(LeafSource):
            raise CheckpointFormatError(f"leaf {key_string(self.path)!r}: unknown source {self.source!r}")
        for chunk, (name, offset) in self.pack.items():
            if not PACK_NAME.fullmatch(name) or offset < 0:
                raise CheckpointFormatError(
                    f"leaf {key_string(self.path)!r} chunk {chunk}: pack {name!r} at offset {offset}; expected "
                    "a name like 'pack.0-0' (a file in the item directory) and an offset >= 0"
                )

    @functools.cached_property
    def key(self) -> str:
        return key_string(self.path)

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of the stored array (a PRNG key array stores its key data)."""
        return (*self.shape, *self.key_tail)

    @property
    def nbytes(self) -> int:
        return math.prod(self.data_shape) * dtype_from_name(self.zarr_dtype).itemsize if self.zarr_dtype else 0

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.kind == "scalar":
            return {k: out[k] for k in ("path", "kind", "value", "value_type")}
        out.pop("value")
        out.pop("value_type")
        if self.pack:
            out["pack"] = {k: list(v) for k, v in self.pack.items()}
        else:
            out.pop("pack")
        if self.writers:
            out["writers"] = [list(b) for b in self.writers]
        else:
            out.pop("writers")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LeafRecord:
        """A record from JSON that ``validate.check_record`` accepted (fields it does not read dropped)."""
        path = tuple(data["path"])
        if data["kind"] == "scalar":
            return cls(path=path, kind="scalar", value=data.get("value"), value_type=data["value_type"])
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data and f.name != "value"}
        fields.update({name: tuple(data.get(name, ())) for name in ("path", "shape", "chunks", "key_tail")})
        spec = data.get("partition_spec")
        fields["partition_spec"] = None if spec is None else tuple(tuple(p) if isinstance(p, list) else p for p in spec)
        fields["crc32c"] = dict(data["crc32c"])
        fields["pack"] = {k: (v[0], v[1]) for k, v in data.get("pack", {}).items()}
        fields["writers"] = tuple(tuple(b) for b in data.get("writers", ()))
        return cls(**fields)


def encode_scalar(value: Any) -> tuple[Any, str]:
    """A Python scalar as (JSON value, type name); non-finite floats as strings."""
    if value is None:
        return None, "none"
    if isinstance(value, bool):
        return value, "bool"
    if isinstance(value, int):
        if abs(value) >= 10**MAX_INT_DIGITS:
            raise ValueError(f"int scalar of {len(str(abs(value)))} digits; at most {MAX_INT_DIGITS} can be saved")
        return value, "int"
    if isinstance(value, float):
        return (value if math.isfinite(value) else repr(value)), "float"
    if isinstance(value, str):
        if len(value) > MAX_STR:
            raise ValueError(f"str scalar of {len(value)} characters; at most {MAX_STR} can be saved")
        return value, "str"
    raise TypeError(f"unsupported scalar type {type(value).__name__}")


def decode_scalar(value: Any, value_type: str) -> Any:
    match value_type:
        case "none":
            return None
        case "bool":
            return bool(value)
        case "int":
            return int(value)
        case "float":
            return float(value)
        case "str":
            return str(value)
    raise CheckpointFormatError(f"unknown scalar type {value_type!r} in manifest")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """One item: its tree structure and its leaves."""

    tree: dict[str, Any]
    leaves: tuple[LeafRecord, ...]
    layout: dict[str, Any] | None = None  # layout "process": its processes and index files

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tree": self.tree,
            "leaves": [leaf.to_json() for leaf in self.leaves],
        }
        return out if self.layout is None else {**out, "layout": self.layout}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Metadata:
    """``metadata.json``: seed-compatible keys plus format name and version."""

    step: int | None
    timestamp: float
    is_temporary: bool = False
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    items: tuple[str, ...] = ("state",)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "timestamp": self.timestamp,
            "is_temporary": self.is_temporary,
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "extras": self.extras,
            "items": list(self.items),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Commit:
    """The commit marker: which metadata file and item directories form the checkpoint.

    ``checksums``: the crc32c of every JSON file it commits (metadata, manifests), by path
    relative to the checkpoint directory.
    """

    metadata: str = "metadata.json"
    items: dict[str, str] = dataclasses.field(default_factory=lambda: {"state": "state"})
    checksums: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "metadata": self.metadata,
            "items": self.items,
            "checksums": self.checksums,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Commit:
        check_version(data, where)
        try:
            metadata = _plain_str(data["metadata"])
            items = {_plain_str(k): _plain_str(v) for k, v in data["items"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointFormatError(f"{where}: malformed commit marker: {e}") from e
        for name in (metadata, *items.values()):
            if not name or "/" in name or name in (".", ".."):
                raise CheckpointFormatError(f"{where}: commit marker names {name!r}, not a plain entry")
        # Only names a save writes: a forged marker cannot make a later save delete a user's file.
        if not METADATA_NAME.fullmatch(metadata):
            raise CheckpointFormatError(f"{where}: metadata {metadata!r}; expected metadata[.ckpt-<nonce>].json")
        for item, name in items.items():
            if name != item and not re.fullmatch(rf"{re.escape(item)}\.ckpt-[0-9a-f]{{8}}", name):
                raise CheckpointFormatError(
                    f"{where}: item {item!r} in {name!r}; expected {item!r} or {item}.ckpt-<nonce>"
                )
        if not items or not all(ITEM_NAME.fullmatch(item) for item in items):
            raise CheckpointFormatError(
                f"{where}: commit marker items {sorted(items)}; expected names of [A-Za-z0-9_-]"
            )
        try:
            checksums = {_plain_str(k): _crc(v) for k, v in data["checksums"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointFormatError(f"{where}: malformed commit marker checksums: {e}") from e
        expected = {metadata, *(f"{d}/manifest.json" for d in items.values())}
        if set(checksums) != expected:
            raise CheckpointFormatError(
                f"{where}: commit marker has checksums of {sorted(checksums)}, expected exactly {sorted(expected)}"
            )
        return cls(metadata=metadata, items=items, checksums=checksums)


def _plain_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, found {type(value).__name__} {str(value)[:40]!r}")
    return value


def _crc(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"expected a crc32c (an integer in [0, 2**32)), found {str(value)[:40]!r}")
    return value


def check_version(data: Any, where: str) -> None:
    """Refuses other formats and unknown major versions with a clear error."""
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{where}: expected a JSON object, found {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{where}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointFormatError(f"{where}: format version {version!r} is not an integer")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where}: format version {version}; this reader supports version {FORMAT_VERSION}"
            + (" (upgrade ckpt_callbacks to read it)" if version > FORMAT_VERSION else "")
        )


def dumps(data: Any) -> bytes:
    return json.dumps(data, indent=1, allow_nan=False).encode()


class OversizedInt:
    """What ``loads`` reads for an integer literal of more than ``MAX_INT_DIGITS`` digits: no
    int, so every check of an integer field refuses it, naming the field."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits, more than {MAX_INT_DIGITS}>"


def _parse_int(text: str) -> int | OversizedInt:
    digits = len(text.lstrip("-"))
    return OversizedInt(digits) if digits > MAX_INT_DIGITS else int(text)


def loads(raw: bytes, where: str) -> Any:
    """Parses a JSON file we read; huge integers become ``OversizedInt``, never a Python int."""
    try:
        return json.loads(raw, parse_int=_parse_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointFormatError(f"{where}: not valid JSON: {str(e)[:200]}") from e


def zarr_spec(kvstore: dict[str, Any], record: LeafRecord) -> dict[str, Any]:
    """The TensorStore spec of a leaf's zarr3 array under its item's kvstore (pure)."""
    item_path = kvstore.get("path", "")
    return {
        "driver": "zarr3",
        "kvstore": {**kvstore, "path": f"{item_path}{record.array}/"},
        "metadata": {
            "shape": list(record.data_shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(record.chunks)}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": record.zarr_dtype,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        },
    }


def chunk_key(chunk: Sequence[int]) -> str:
    """The manifest key of a chunk's checksum: grid indices joined by '.' ('0' for 0-d)."""
    return ".".join(str(i) for i in chunk) or "0"
