"""The "process" layout on storage: per-process data files and index files, written and read.

``save(..., layout="process")`` puts every chunk a process writes into its own data files
(``<item>/pack.<process>-<n>``, at most ``file_bytes`` each) and its chunk records into
``<item>/index.<process>`` (see ``process_index``), so a checkpoint holds about
``processes x (1 + bytes / file_bytes)`` objects whatever the number of leaves and shards.
The manifest records per leaf which process wrote each chunk (a few integers), and per
process its index file's size and crc32c; the commit marker covers the manifest, so it
covers the indexes too. A restore reads, from each writer it needs, only the index records
of the chunks it reads (byte ranges), then only those chunks' bytes.

>>> import jax.numpy as jnp, ckpt_callbacks as cc
>>> cc.save("memory://doc/process", {"w": jnp.arange(4.0)}, layout="process")
>>> cc.restore("memory://doc/process")["w"].tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import distributed, paths, planning, storage
from ckpt_callbacks import format as fmt
from ckpt_callbacks import process_index as pidx
from ckpt_callbacks.chunk_reads import PackFiles, chunk_regions, settle
from ckpt_callbacks.errors import CheckpointFormatError, CorruptCheckpointError, StorageTimeoutError

FILE_BYTES = 1 << 30  # a data file closes before it would grow past this
LAYOUTS = ("zarr3", "process")
EVERY_LEAF = 1 << 62  # pack_bytes that packs every array leaf


def file_bytes(max_host_bytes: int | None) -> int:
    """Data file size cap: a file is assembled in host memory before its one write, so a host
    budget caps it at a quarter of the budget."""
    return FILE_BYTES if max_host_bytes is None else max(1, min(FILE_BYTES, max_host_bytes // 4))


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
def write_indexes(item_locs: dict[str, paths.Location], leaves_of: dict[str, list[Any]], crcs: Any) -> dict[str, Any]:
    """Each process: its index file per item; returns per item [size, crc32c, data files],
    all process 0 needs of it (``crcs``: item -> leaf index -> chunk key -> crc32c)."""
    me = distributed.process_index()
    out = {}
    for item, loc in item_locs.items():
        rows, files = [], 0
        for leaf in leaves_of[item]:
            grid = grid_of(leaf.record)
            for key, crc in crcs.get(item, {}).get(leaf.index, {}).items():
                name, offset = leaf.record.pack[key]
                number = int(name.rsplit("-", 1)[1])
                files = max(files, number + 1)
                rows.append((leaf.index, number, linear(key, grid), offset, crc))
        data = pidx.encode_index(me, rows)
        paths.write_bytes(loc, index_name(me), data)
        out[item] = [len(data), pidx.index_checksum(data), files]
    return out


def manifests(structures: dict[str, Any], leaves_of: dict[str, list[Any]], gathered: list[Any]) -> dict[str, Any]:
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
def _index_bytes(future: Any, loc: paths.Location, where: str) -> bytes:
    """An index read's bytes, within ``op_timeout_s``; a failed or missing read is corruption."""
    try:
        result = storage.wait(future, loc.options, where, "index read")
    except StorageTimeoutError:
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: cannot be read: {e}") from e
    if result.state != "value":
        raise CorruptCheckpointError(f"{where}: named by the manifest but missing")
    return bytes(result.value)


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
        result = self.future.result(timeout=timeout)
        if result.state != "value":
            raise CorruptCheckpointError(f"{self.where}: data file is missing")
        if len(result.value) != count * self.dtype.itemsize:
            raise CorruptCheckpointError(
                f"{self.where}: {len(result.value)} bytes read, the chunk is {count * self.dtype.itemsize}"
            )
        return np.frombuffer(result.value, self.dtype, count=count).reshape(self.shape)


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
        if self.kvstore is None:
            self.kvstore = ts.KvStore.open(paths.kvstore_spec(self.loc), context=paths.context()).result()
        future = self.kvstore.read(name, byte_range=slice(offset, offset + nbytes))
        self.pending.append(future)
        return _RangedChunk(future, where, shape, dtype)

    def cancel(self) -> None:
        for future in self.pending:
            settle(future)


def _needed_chunks(record: fmt.LeafRecord, target: Any) -> set[tuple[int, ...]]:
    from ckpt_callbacks.targets import data_sharding  # the read side only

    shape = record.data_shape
    if target.sharding is None:
        regions = {tuple((0, n) for n in shape)}
    else:
        index_map = data_sharding(record, target.sharding).addressable_devices_indices_map(shape)
        regions = {planning.normalize_index(x, shape) for x in index_map.values() if x is not None}
    return {idx for region in regions for idx, _ in chunk_regions(region, record.chunks, shape)}


def _starts(manifest: fmt.Manifest, process: int) -> list[int]:
    """Where each leaf's records begin in ``process``'s index (records are sorted by leaf)."""
    out, at = [], 0
    for record in manifest.leaves:
        out.append(at)
        at += pidx.count_of(record.writers, process)
    return out


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for pos in sorted(set(positions)):
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


def _located(
    loc: paths.Location, manifest: fmt.Manifest, wanted: dict[int, set[tuple[int, ...]]]
) -> dict[int, dict[str, tuple[str, int, int]]]:
    """leaf -> chunk key -> (data file, offset, crc32c), from byte-range reads of the index
    records of exactly those chunks."""
    layout = manifest.layout or {}
    at: dict[int, dict[tuple[int, int], int]] = collections.defaultdict(dict)  # process -> (leaf, chunk) -> rank
    for leaf, chunks in wanted.items():
        record, grid = manifest.leaves[leaf], grid_of(manifest.leaves[leaf])
        for idx in chunks:
            chunk = linear(fmt.chunk_key(idx), grid)
            owner, rank = pidx.owner_and_rank(record.writers, chunk)
            at[owner][(leaf, chunk)] = rank
    kv = ts.KvStore.open(paths.kvstore_spec(loc), context=paths.context()).result()
    reads: list[tuple[int, list[tuple[int, int]] | None, Any]] = []
    for process, ranked in at.items():
        header = slice(0, pidx.HEADER.size)
        reads.append((process, None, kv.read(index_name(process), byte_range=header)))
        starts = _starts(manifest, process)
        positions = {starts[leaf] + rank: (leaf, chunk) for (leaf, chunk), rank in ranked.items()}
        for a, b in _runs(list(positions)):
            span = slice(pidx.HEADER.size + a * pidx.RECORD.size, pidx.HEADER.size + b * pidx.RECORD.size)
            reads.append((process, [positions[p] for p in range(a, b)], kv.read(index_name(process), byte_range=span)))
    out: dict[int, dict[str, tuple[str, int, int]]] = collections.defaultdict(dict)
    try:
        for process, expected, future in reads:
            where = loc.join(index_name(process)).url
            data = _index_bytes(future, loc, where)
            if expected is None:
                pidx.check_header(data, process, layout["indexes"][process][0], where)
                continue
            records = pidx.decode_records(data, process, where)
            if len(records) != len(expected):
                raise CorruptCheckpointError(f"{where}: {len(records)} records read, {len(expected)} expected")
            files = layout["indexes"][process][2]
            for (leaf, chunk), (found_leaf, number, found_chunk, offset, crc) in zip(expected, records, strict=True):
                if (found_leaf, found_chunk) != (leaf, chunk) or number >= files:
                    raise CorruptCheckpointError(
                        f"{where}: record of leaf {found_leaf} chunk {found_chunk} in data file {number}; expected "
                        f"leaf {leaf} chunk {chunk} in one of {files} files"
                    )
                out[leaf][key_of(chunk, grid_of(manifest.leaves[leaf]))] = (f"pack.{process}-{number}", offset, crc)
    except BaseException:
        for _, _, future in reads:
            settle(future)
        raise
    return out


def _with_chunks(record: fmt.LeafRecord, found: dict[str, tuple[str, int, int]]) -> fmt.LeafRecord:
    """The record as the zarr3 layout's read path takes it: these chunks' files and crc32c."""
    return dataclasses.replace(
        record,
        pack={k: (name, offset) for k, (name, offset, _) in found.items()},
        crc32c={k: crc for k, (_, _, crc) in found.items()},
    )


def read_leaves(
    loc: paths.Location,
    manifest: fmt.Manifest,
    records: Sequence[fmt.LeafRecord],
    targets: Sequence[Any],
    window: int,
    *,
    read: Callable[..., list[Any]],
) -> list[Any]:
    """``restore.read_leaves`` (``read``) for a manifest in the process layout."""
    position = {id(r): i for i, r in enumerate(manifest.leaves)}
    wanted = {position[id(r)]: _needed_chunks(r, t) for r, t in zip(records, targets, strict=True)}
    found = _located(loc, manifest, wanted)
    chunked = [_with_chunks(r, found[position[id(r)]]) for r in records]
    return read(loc, chunked, targets, window, packs=RangedFiles(loc))


def item_source(loc: paths.Location, manifest: fmt.Manifest) -> tuple[list[fmt.LeafRecord], PackFiles]:
    """Every leaf record of an item with every chunk's file and crc32c, and the files to read
    them from: for ``verify``, which reads whole index files (each checked against the
    manifest's size and crc32c) and every chunk."""
    if manifest.layout is None:
        return list(manifest.leaves), PackFiles(loc)
    kv = ts.KvStore.open(paths.kvstore_spec(loc), context=paths.context()).result()
    entries = manifest.layout["indexes"]
    futures = [kv.read(index_name(p)) for p in range(len(entries))]
    found: dict[int, dict[str, tuple[str, int, int]]] = collections.defaultdict(dict)
    for process, (future, (size, crc, files)) in enumerate(zip(futures, entries, strict=True)):
        where = loc.join(index_name(process)).url
        data = _index_bytes(future, loc, where)
        if len(data) != size or pidx.index_checksum(data) != crc:
            raise CorruptCheckpointError(
                f"{where}: {len(data)} bytes with crc32c {pidx.index_checksum(data):#010x}; the manifest says {size} "
                f"bytes with crc32c {crc:#010x}"
            )
        for leaf, number, chunk, offset, chunk_crc in pidx.decode_index(data, process, where):
            record = manifest.leaves[leaf] if leaf < len(manifest.leaves) else None
            grid = grid_of(record) if record is not None and record.kind != "scalar" else None
            if grid is None or chunk >= math.prod(grid) or number >= files:
                raise CheckpointFormatError(f"{where}: a record names leaf {leaf} chunk {chunk} file {number}")
            if pidx.owner_and_rank(record.writers, chunk)[0] != process:  # type: ignore[union-attr]
                raise CheckpointFormatError(f"{where}: leaf {leaf} chunk {chunk} was not written by process {process}")
            found[leaf][key_of(chunk, grid)] = (f"pack.{process}-{number}", offset, chunk_crc)
    records = [r if r.kind == "scalar" else _with_chunks(r, found[i]) for i, r in enumerate(manifest.leaves)]
    return records, RangedFiles(loc)
