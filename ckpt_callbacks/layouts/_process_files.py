"""The "process" layout on storage: per-process data files and index files, written and read.

``save(..., layout="process")`` puts every chunk a process writes into its own data files
(``<item>/pack.<process>-<n>``, at most ``file_bytes`` each) and its chunk records into
``<item>/index.<process>`` (see ``process_index``), so a checkpoint holds about
``processes x (1 + bytes / file_bytes)`` objects whatever the number of leaves and shards.
The manifest records per leaf which process wrote each chunk (a few integers), and per
process its index file's size and crc32c; the commit marker covers the manifest, so it
covers the indexes too. A restore reads the index of each writer it needs, checks every record
in it (each bound to its leaf and chunk, none overlapping another), then reads only the bytes
of the chunks it needs (byte ranges).

>>> import jax.numpy as jnp, ckpt_callbacks as cc
>>> cc.save("memory://doc/process", {"w": jnp.arange(4.0)}, layout="process")
>>> cc.restore("memory://doc/process")["w"].tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

import numpy as np

from ckpt_callbacks import distributed, storage
from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as pidx
from ckpt_callbacks import format as planning
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CorruptCheckpointError, MissingFileError, StorageTimeoutError
from ckpt_callbacks.layouts._base import register_layout
from ckpt_callbacks.layouts._reads import PackFiles, read_value, settle
from ckpt_callbacks.layouts._regions import chunk_regions, data_sharding

FILE_BYTES = 1 << 30  # a data file closes before it would grow past this
EVERY_LEAF = 1 << 62  # pack_bytes that packs every array leaf


def file_bytes(max_host_bytes: int | None) -> int:
    """Data file size cap: on an object store a file is assembled in host memory and copied
    twice by TensorStore as it is written, so a host budget caps it at an eighth of the budget
    (the largest chunk the budget allows; on local disk files are written in place)."""
    return FILE_BYTES if max_host_bytes is None else max(1, min(FILE_BYTES, max_host_bytes // 8))


def index_name(process: int) -> str:
    return f"index.{process}"


def _process_of(pack_name: str) -> int:
    return int(pack_name[len("pack.") :].split("-", maxsplit=1)[0])


def grid_of(record: fmt.LeafRecord) -> tuple[int, ...]:
    return tuple(-(-n // c) for n, c in zip(record.data_shape, record.chunks, strict=True))


def linear(key: str, grid: Sequence[int]) -> int:
    """A chunk key ('i.j') as its C-order position in the grid."""
    if not grid:
        return 0
    return int(np.ravel_multi_index(tuple(int(p) for p in key.split(".")), tuple(grid)))


def key_of(chunk: int, grid: Sequence[int]) -> str:
    """The chunk key of the chunk at C-order position ``chunk``."""
    return fmt.chunk_key(tuple(int(i) for i in np.unravel_index(chunk, tuple(grid)))) if grid else "0"


# ------------------------------------------------------------------------------------------ saving
def write_indexes(
    item_locs: Mapping[str, paths.Location], leaves_of: Mapping[str, Sequence[Any]], crcs: Any
) -> dict[str, Any]:
    """Each process: its index file per item; returns per item [size, crc32c, data files],
    all process 0 needs of it (``crcs``: item -> leaf index -> chunk key -> crc32c)."""
    me = distributed.process_index()
    out = {}
    for item, loc in item_locs.items():
        rows, files = [], 0
        for leaf in leaves_of[item]:
            grid, tag = grid_of(leaf.record), pidx.leaf_tag(leaf.record)
            written = crcs.get(item, {}).get(leaf.index, {})
            chunks = np.asarray([linear(key, grid) for key in written], np.int64)
            sizes = pidx.chunk_bytes(leaf.record, chunks).tolist() if written else []
            for (key, crc), chunk, size in zip(written.items(), chunks.tolist(), sizes, strict=True):
                name, offset = leaf.record.pack[key]
                number = int(name.rsplit("-", 1)[1])
                files = max(files, number + 1)
                rows.append((leaf.index, number, chunk, offset, size, tag, crc))
        data = pidx.encode_index(me, rows)
        paths.write_bytes(loc, index_name(me), data)
        out[item] = [len(data), pidx.index_checksum(data), files]
    return out


def manifests(
    structures: Mapping[str, Any], leaves_of: Mapping[str, Sequence[Any]], gathered: Sequence[Any]
) -> dict[str, Any]:
    """Process 0: each item's manifest, per leaf its writers instead of per-chunk records."""
    out = {}
    for item, leaves in leaves_of.items():
        records = []
        for leaf in leaves:
            record = leaf.record
            if record.kind == "scalar":
                records.append(record)
                continue
            grid = grid_of(record)
            owners = [0] * math.prod(grid) if record.pack else []
            for key, (name, _) in record.pack.items():
                owners[linear(key, grid)] = _process_of(name)
            writers = tuple(tuple(b) for b in pidx.encode_writers(owners))
            records.append(dataclasses.replace(record, crc32c={}, pack={}, writers=writers))
        layout = {"kind": "process", "processes": len(gathered), "indexes": [g[item] for g in gathered]}
        out[item] = fmt.Manifest(tree=structures[item], leaves=tuple(records), layout=layout)
    return out


# ----------------------------------------------------------------------------------------- reading
def _index_bytes(future: Any, loc: paths.Location, where: str) -> bytes | bytearray:
    """An index read's bytes, within ``op_timeout_s``; a failed or missing read is corruption."""
    try:
        result = (
            future.result() if isinstance(future, Future) else storage.wait(future, loc.options, where, "index read")
        )
    except (StorageTimeoutError, CorruptCheckpointError):
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: cannot be read: {e}") from e
    value = read_value(result)
    if value is None:
        raise MissingFileError(f"{where}: named by the manifest but missing")
    return value


def _indexes(loc: paths.Location, manifest: fmt.Manifest, processes: Sequence[int]) -> dict[int, np.ndarray]:
    """The records of each of ``processes``' index files, read whole and checked: size and
    crc32c as the manifest says, each record's own crc32c, and ``check_records``."""
    entries = (manifest.layout or {})["indexes"]
    files = PackFiles(loc)
    futures = {p: files.start(index_name(p), size=entries[p][0]) for p in processes}
    out = {}
    try:
        for process, future in futures.items():
            where = loc.join(index_name(process)).url
            size, crc, count = entries[process]
            data = bytes(_index_bytes(future, loc, where))
            record_size = pidx.check_header(data, process, size, where) if len(data) == size else 0
            found = pidx.index_checksum(data, record_size) if record_size else None
            if found != crc:
                shown = "?" if found is None else f"{found:#010x}"
                raise CorruptCheckpointError(
                    f"{where}: {len(data)} bytes with crc32c {shown}; the manifest says {size} bytes with crc32c "
                    f"{crc:#010x}"
                )
            out[process] = pidx.decode_index(data, process, where)
            pidx.check_records(out[process], process, manifest.leaves, count, where)
    except BaseException:
        for future in futures.values():
            settle(future)
        raise
    return out


def _located(
    loc: paths.Location, manifest: fmt.Manifest, wanted: dict[int, np.ndarray | None], *, every: bool = False
) -> dict[int, dict[str, tuple[str, int, int]]]:
    """leaf -> chunk key -> (data file, offset, crc32c) of the ``wanted`` chunks of each leaf
    (C-order positions; None: all of them), from the index of each process that wrote one
    (``every``: of every process).

    An index is read whole, though a restore may need few of its records: only all of them
    show that no two records claim the same bytes (about 48 bytes per chunk)."""
    chosen = {}
    for leaf, chunks in wanted.items():
        count = math.prod(grid_of(manifest.leaves[leaf]))
        chosen[leaf] = np.arange(count, dtype=np.int64) if chunks is None else chunks
    owners = {leaf: pidx.writers_of(manifest.leaves[leaf].writers, c) for leaf, c in chosen.items() if len(c)}
    processes = sorted({int(p) for o in owners.values() for p in np.unique(o)})
    if every:
        processes = list(range(len((manifest.layout or {})["indexes"])))
    records = _indexes(loc, manifest, processes)
    out: dict[int, dict[str, tuple[str, int, int]]] = collections.defaultdict(dict)
    for process, recs in records.items():
        keys = pidx.keys(recs)
        for leaf, found in owners.items():
            chunks = chosen[leaf][found == process]
            if not len(chunks):
                continue
            grid = grid_of(manifest.leaves[leaf])
            picked = recs[pidx.positions(keys, leaf, chunks)]
            names = [f"pack.{process}-{n}" for n in picked["file"].tolist()]
            for chunk, name, offset, crc in zip(
                chunks.tolist(), names, picked["offset"].tolist(), picked["crc"].tolist(), strict=True
            ):
                out[leaf][key_of(chunk, grid)] = (name, offset, crc)
    return out


@dataclasses.dataclass(frozen=True)
class _RangedChunk:
    future: Any
    where: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def cancel(self) -> None:
        self.future.cancel()

    def result(self, timeout: float | None = None) -> np.ndarray:
        count = math.prod(self.shape)
        value = read_value(self.future.result(timeout=timeout))
        if value is None:
            raise MissingFileError(f"{self.where}: data file is missing")
        if len(value) != count * self.dtype.itemsize:
            raise CorruptCheckpointError(
                f"{self.where}: {len(value)} bytes read, the chunk is {count * self.dtype.itemsize}"
            )
        return np.frombuffer(value, self.dtype, count=count).reshape(self.shape)


class RangedFiles(PackFiles):
    """Data files read chunk by chunk as byte ranges (a part of a 1 GiB file costs its part)."""

    def __init__(self, loc: paths.Location) -> None:
        super().__init__(loc)
        self.pending: list[Any] = []

    def chunk(self, name: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        nbytes = math.prod(shape) * dtype.itemsize
        where = f"{self.loc.join(name).url} bytes {offset}-{offset + nbytes}"
        if offset + nbytes >= 1 << 62:
            raise CorruptCheckpointError(f"{where}: beyond any file a save writes")
        future = self.start(name, (offset, offset + nbytes))
        self.pending.append(future)
        return _RangedChunk(future, where, shape, dtype)

    def cancel(self) -> None:
        for future in self.pending:
            settle(future)


def _needed_chunks(record: fmt.LeafRecord, target: Any) -> np.ndarray:
    """The C-order positions of the chunks a target's devices need."""
    shape = record.data_shape
    if target.sharding is None:
        regions = {tuple((0, n) for n in shape)}
    else:
        index_map = data_sharding(record, target.sharding).addressable_devices_indices_map(shape)
        regions = {planning.normalize_index(x, shape) for x in index_map.values() if x is not None}
    needed = {idx for region in regions for idx, _ in chunk_regions(region, record.chunks, shape)}
    return np.asarray(sorted(linear(fmt.chunk_key(idx), grid_of(record)) for idx in needed), np.int64)


def _with_chunks(record: fmt.LeafRecord, found: dict[str, tuple[str, int, int]]) -> fmt.LeafRecord:
    """The record as the zarr3 layout's read path takes it: these chunks' files and crc32c."""
    return dataclasses.replace(
        record,
        pack={k: (name, offset) for k, (name, offset, _) in found.items()},
        crc32c={k: crc for k, (_, _, crc) in found.items()},
    )


def item_source(loc: paths.Location, manifest: fmt.Manifest) -> tuple[list[fmt.LeafRecord], PackFiles]:
    """Every leaf record of an item with every chunk's file and crc32c, and the files to read
    them from: for ``verify``, which reads every index file (checked as a restore checks the
    ones it reads) and every chunk."""
    arrays = [i for i, r in enumerate(manifest.leaves) if r.kind != "scalar"]
    found = _located(loc, manifest, dict.fromkeys(arrays), every=True)  # processes that wrote no chunk too
    records = [r if r.kind == "scalar" else _with_chunks(r, found[i]) for i, r in enumerate(manifest.leaves)]
    return records, RangedFiles(loc)


class ProcessLayout:
    """Each process's chunks in its own data files plus one checked index file per process
    (the module docstring); the manifest records per leaf only who wrote each chunk."""

    kind: ClassVar[str] = "process"

    def file_bytes(self, max_host_bytes: int | None) -> int | None:
        return file_bytes(max_host_bytes)

    def report(self, item_locs: Mapping[str, paths.Location], leaves_of: Mapping[str, Sequence[Any]], crcs: Any) -> Any:
        return write_indexes(item_locs, leaves_of, crcs)

    def manifests(
        self, structures: Mapping[str, Any], leaves_of: Mapping[str, Sequence[Any]], gathered: Sequence[Any]
    ) -> dict[str, fmt.Manifest]:
        return manifests(structures, leaves_of, gathered)

    def index_sizes(self, chunks_per_process: Sequence[int]) -> list[int] | None:
        return [pidx.index_size(c) for c in chunks_per_process]

    def locate(
        self,
        loc: paths.Location,
        manifest: fmt.Manifest,
        records: Sequence[fmt.LeafRecord] | None,
        targets: Sequence[Any] | None,
    ) -> tuple[list[fmt.LeafRecord], PackFiles]:
        if records is None or targets is None:
            return item_source(loc, manifest)
        position = {id(r): i for i, r in enumerate(manifest.leaves)}
        wanted: dict[int, np.ndarray | None] = {
            position[id(r)]: _needed_chunks(r, t) for r, t in zip(records, targets, strict=True)
        }
        found = _located(loc, manifest, wanted)
        return [_with_chunks(r, found[position[id(r)]]) for r in records], RangedFiles(loc)


register_layout(ProcessLayout())
