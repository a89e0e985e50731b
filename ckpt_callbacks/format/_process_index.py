"""The "process" layout's compact records (pure): who wrote each chunk, and the index files.

In ``layout="process"`` every chunk a process writes goes into its own data files
(``<item>/pack.<process>-<n>``) and its chunk records (file, offset, size, crc32c, and a tag of
its leaf: ``leaf_tag``) into its own index file (``<item>/index.<process>``), checked as a
whole on reading (``check_records``). The manifest keeps per leaf only ``writers``: the
writing process of each chunk (in C order of the chunk grid) as a few blocks
``[p0, dp, run, reps]``, meaning ``reps`` runs of ``run`` chunks, run ``j`` written by
process ``p0 + j * dp``; an FSDP-sharded leaf over any number of hosts is one block.

>>> encode_writers([0, 0, 1, 1, 2, 2, 5])
[[0, 1, 2, 3], [5, 0, 1, 1]]
>>> decode_writers([[0, 1, 2, 3], [5, 0, 1, 1]])
[0, 0, 1, 1, 2, 2, 5]
>>> owner_and_rank([[0, 1, 2, 3]], 5)  # chunk 5 is process 2's second chunk of the leaf
(2, 1)
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import crc32c
import numpy as np

from ckpt_callbacks.errors import CheckpointFormatError, CorruptCheckpointError
from ckpt_callbacks.format import _records as fmt

Block = Sequence[int]  # [p0, dp, run, reps]
HEADER = struct.Struct("<8sII")  # magic, process, record count
# Version 2 (written): leaf, file number, chunk (linear, C order), offset, the chunk's bytes, its
# leaf's tag (``leaf_tag``), chunk crc32c, crc32c of the rest (with the process).
INDEX_MAGIC = b"CKPTIDX2"
RECORD = struct.Struct("<IIQQQQII")
# Version 1 (read): leaf, file number, chunk, offset, chunk crc32c, crc32c of the rest.
INDEX_MAGIC_V1 = b"CKPTIDX1"
RECORD_V1 = struct.Struct("<IIQQII")
RECORD_SIZES = {INDEX_MAGIC: RECORD.size, INDEX_MAGIC_V1: RECORD_V1.size}
_FIELDS = {
    RECORD.size: [("leaf", "<u4"), ("file", "<u4"), ("chunk", "<u8"), ("offset", "<u8"), ("nbytes", "<u8"),
                  ("tag", "<u8"), ("crc", "<u4"), ("own", "<u4")],
    RECORD_V1.size: [("leaf", "<u4"), ("file", "<u4"), ("chunk", "<u8"), ("offset", "<u8"), ("crc", "<u4"),
                     ("own", "<u4")],
}  # fmt: skip
MAX_PROCESSES = 1 << 20
MAX_LEAF_CHUNKS = 1 << 22  # a leaf's grid in this layout (nothing else bounds it: no per-chunk JSON)
MAX_CHUNKS = 1 << 26  # of one manifest


def encode_writers(owners: Sequence[int]) -> list[list[int]]:
    """The blocks of a per-chunk owner list (see the module docstring)."""
    runs: list[tuple[int, int]] = []  # (process, length)
    for p in owners:
        if runs and runs[-1][0] == p:
            runs[-1] = (p, runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    blocks: list[list[int]] = []
    i = 0
    while i < len(runs):
        p0, run = runs[i]
        reps, dp = 1, 0
        if i + 1 < len(runs) and runs[i + 1][1] == run:
            dp = runs[i + 1][0] - p0
            while i + reps < len(runs) and runs[i + reps] == (p0 + reps * dp, run):
                reps += 1
        blocks.append([p0, dp if reps > 1 else 0, run, reps])
        i += reps
    return blocks


def decode_writers(blocks: Sequence[Block]) -> list[int]:
    return [p0 + j * dp for p0, dp, run, reps in blocks for j in range(reps) for _ in range(run)]


def _starts(blocks: Sequence[Block]) -> list[int]:
    out, at = [], 0
    for _, _, run, reps in blocks:
        out.append(at)
        at += run * reps
    return out


def _count_in_block(block: Block, process: int, runs: int | None = None) -> int:
    """Chunks of ``process`` in the first ``runs`` runs of ``block`` (all if None)."""
    p0, dp, run, reps = block
    reps = reps if runs is None else runs
    if dp == 0:
        return run * reps if p0 == process else 0
    j, rem = divmod(process - p0, dp)
    return run if rem == 0 and 0 <= j < reps else 0


def count_of(blocks: Sequence[Block], process: int) -> int:
    """How many chunks of the leaf ``process`` wrote."""
    return sum(_count_in_block(b, process) for b in blocks)


def owner_and_rank(blocks: Sequence[Block], chunk: int) -> tuple[int, int]:
    """(writer of the chunk at linear index ``chunk``, its rank among that writer's chunks)."""
    starts = _starts(blocks)
    b = bisect.bisect_right(starts, chunk) - 1
    p0, dp, run, _ = blocks[b]
    j, within = divmod(chunk - starts[b], run)
    owner = p0 + j * dp
    rank = sum(_count_in_block(blk, owner) for blk in blocks[:b])
    return owner, rank + _count_in_block(blocks[b], owner, j) + within


def check_writers(value: Any, grid_size: int, field: str = "writers") -> list[list[int]]:
    """Refuses (``ValueError``) blocks that do not cover exactly ``grid_size`` chunks with
    processes in range."""
    bad = ValueError  # callers add the file and leaf
    if not isinstance(value, list) or len(value) > max(grid_size, 1):
        raise bad(f"field {field!r}: expected a list of at most {max(grid_size, 1)} blocks, found {str(value)[:80]}")
    total = 0
    for block in value:
        ok = isinstance(block, list) and len(block) == 4
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in block)
        if not ok or not (0 <= block[0] < MAX_PROCESSES and block[2] >= 1 and 1 <= block[3] <= MAX_PROCESSES):
            raise bad(f"field {field!r}: expected blocks [p0, dp, run >= 1, reps >= 1], found {str(block)[:80]}")
        last = block[0] + (block[3] - 1) * block[1]
        if not (0 <= last < MAX_PROCESSES and abs(block[1]) < MAX_PROCESSES):
            raise bad(f"field {field!r}: block {block} names processes outside [0, {MAX_PROCESSES})")
        total += block[2] * block[3]
        if total > grid_size:
            break
    if total != grid_size:
        raise bad(f"field {field!r}: blocks cover {total} chunks, the chunk grid has {grid_size}")
    return value


def max_process(blocks: Sequence[Block]) -> int:
    return max((max(p0, p0 + (reps - 1) * dp) for p0, dp, _, reps in blocks), default=-1)


def check_layout(layout: Any, writers: Sequence[Sequence[Block]], where: str) -> None:
    """The manifest's ``layout`` block against its leaves' writers: processes in range, and
    each index file's size exactly the records its process wrote."""
    if (
        not isinstance(layout, dict)
        or layout.get("kind") != "process"
        or set(layout) != {"kind", "processes", "indexes"}
    ):
        raise CheckpointFormatError(
            f"{where}: field 'layout': expected {{'kind': 'process', 'processes': N, 'indexes': [...]}}, "
            f"found {str(layout)[:120]}"
        )
    n, indexes = layout["processes"], layout["indexes"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROCESSES:
        raise CheckpointFormatError(f"{where}: layout: processes {str(n)[:40]}; expected 1..{MAX_PROCESSES}")
    if not isinstance(indexes, list) or len(indexes) != n:
        raise CheckpointFormatError(f"{where}: layout: expected one index entry per process ({n})")
    for p, entry in enumerate(indexes):
        ok = isinstance(entry, list) and len(entry) == 3
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62 for x in entry)
        if not ok or entry[1] >= 2**32 or entry[2] > entry[0]:
            raise CheckpointFormatError(
                f"{where}: layout: index of process {p}: expected [size, crc32c, data files], found {str(entry)[:80]}"
            )
    top = max((max_process(w) for w in writers), default=-1)
    if top >= n:
        raise CheckpointFormatError(f"{where}: a leaf names writer process {top}; the layout has {n} processes")
    if sum(sum(run * reps for _, _, run, reps in w) for w in writers) > MAX_CHUNKS:
        raise CheckpointFormatError(f"{where}: more than {MAX_CHUNKS} chunks in one manifest")
    for p, entry in enumerate(indexes):
        records = sum(count_of(w, p) for w in writers)
        if entry[0] not in (index_size(records), index_size(records, RECORD_V1.size)):
            raise CheckpointFormatError(
                f"{where}: layout: index of process {p} is {entry[0]} bytes; its {records} chunks make "
                f"{index_size(records)} ({index_size(records, RECORD_V1.size)} in version 1)"
            )


def index_size(records: int, record_size: int = RECORD.size) -> int:
    return HEADER.size + record_size * records


def leaf_tag(record: fmt.LeafRecord) -> int:
    """What binds an index record to its leaf: a hash of the leaf's key path and of everything
    that says where its bytes go (shape, chunk grid, dtypes), so that a manifest saying other
    things of a leaf than the save did no longer matches the records the save wrote."""
    fields: list[Any] = [list(record.path), record.kind, list(record.data_shape), list(record.chunks)]
    fields += [record.dtype, record.stored_dtype, record.zarr_dtype, record.key_impl]
    digest = hashlib.blake2b(json.dumps(fields).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def chunk_bytes(record: fmt.LeafRecord, chunks: np.ndarray) -> np.ndarray:
    """The stored bytes of each chunk (C-order positions ``chunks``): a chunk at the grid's edge
    holds only its part of the leaf."""
    shape, sizes = record.data_shape, record.chunks
    grid = tuple(-(-n // c) for n, c in zip(shape, sizes, strict=True))
    out = np.full(len(chunks), fmt.dtype_from_name(record.zarr_dtype).itemsize, np.uint64)
    for at, n, c in zip(np.unravel_index(chunks, grid) if grid else (), shape, sizes, strict=True):
        out *= np.minimum(c, n - at * c).astype(np.uint64)
    return out


def _record_crc(process: int, body: bytes | memoryview) -> int:
    """A record's own crc32c: over the process and the record's other fields."""
    return int(crc32c.crc32c(body, crc32c.crc32c(struct.pack("<I", process))))


def index_checksum(data: bytes, record_size: int = RECORD.size) -> int:
    """The crc32c the manifest records of an index file: over its header and its records' fields,
    without each record's own crc32c (a crc32c over bytes followed by their own crc32c is the
    same whatever the bytes are, so the whole file's would vouch for nothing)."""
    view = memoryview(data)
    crc = crc32c.crc32c(view[: HEADER.size])
    for at in range(HEADER.size, len(data), record_size):
        crc = crc32c.crc32c(view[at : min(at + record_size - 4, len(data))], crc)
    return int(crc)


def encode_index(process: int, records: Sequence[tuple[int, int, int, int, int, int, int]]) -> bytes:
    """An index file: header, then (leaf, file, chunk, offset, bytes, leaf tag, crc32c) records
    sorted by (leaf, chunk)."""
    ordered = sorted(records, key=lambda r: (r[0], r[2]))
    return b"".join([HEADER.pack(INDEX_MAGIC, process, len(ordered)), *(pack_record(process, r) for r in ordered)])


def pack_record(process: int, fields: Sequence[int]) -> bytes:
    """One version 2 record of ``process``'s index: its fields (see ``RECORD``) and own crc32c."""
    body = RECORD.pack(*fields, 0)[:-4]
    return body + struct.pack("<I", _record_crc(process, body))


def check_header(data: bytes, process: int, size: int, where: str) -> int:
    """Refuses an index header that is not this process's, or not ``size`` bytes of records;
    returns the size of its records (its version's)."""
    if len(data) < HEADER.size:
        raise CorruptCheckpointError(f"{where}: {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, found, count = HEADER.unpack_from(data)
    record_size = RECORD_SIZES.get(magic, 0)
    if not record_size or found != process or size != index_size(count, record_size):
        raise CorruptCheckpointError(
            f"{where}: header {magic!r} of process {found} with {count} records; expected {INDEX_MAGIC!r} or "
            f"{INDEX_MAGIC_V1!r} of process {process} in {size} bytes"
        )
    return record_size


def decode_index(data: bytes, process: int, where: str) -> np.ndarray:
    """A whole index file's records (after its size and crc32c were checked against the manifest),
    each one's own crc32c checked, as a structured array (fields ``leaf``, ``file``, ``chunk``,
    ``offset``, ``crc``; version 2 also ``nbytes`` and ``tag``)."""
    record_size = check_header(data, process, len(data), where)
    view = memoryview(data)
    for at in range(HEADER.size, len(data), record_size):
        own = int.from_bytes(view[at + record_size - 4 : at + record_size], "little")
        if _record_crc(process, view[at : at + record_size - 4]) != own:
            raise CorruptCheckpointError(f"{where}: index record at byte {at} fails its crc32c")
    return np.frombuffer(data, np.dtype(_FIELDS[record_size]), offset=HEADER.size)


def writers_of(blocks: Sequence[Block], chunks: np.ndarray) -> np.ndarray:
    """The writer of each chunk (C-order positions ``chunks``, all inside the grid)."""
    table = np.asarray(blocks, np.int64).reshape(-1, 4)
    starts = np.concatenate([[0], np.cumsum(table[:, 2] * table[:, 3])[:-1]])
    b = np.searchsorted(starts, chunks, side="right") - 1
    return table[b, 0] + (chunks - starts[b]) // table[b, 2] * table[b, 1]


def _check_leaf(recs: np.ndarray, record: fmt.LeafRecord, process: int, nbytes: np.ndarray, where: str) -> None:
    """One leaf's records of an index: its chunks, written by ``process``, of its chunks' sizes
    and (version 2) bound to it; fills in ``nbytes``."""
    chunks = recs["chunk"].astype(np.int64)
    grid = math.prod(-(-n // c) for n, c in zip(record.data_shape, record.chunks, strict=True))
    what = f"{where}: leaf {record.key!r}"
    if record.kind == "scalar" or not record.writers or int(recs["chunk"][-1]) >= grid:
        raise CheckpointFormatError(f"{what}: a record names chunk {int(recs['chunk'][-1])}; the leaf has {grid}")
    owners = writers_of(record.writers, chunks)
    if np.any(owners != process):
        at = int(np.argmax(owners != process))
        raise CheckpointFormatError(
            f"{what}: chunk {chunks[at]} is in the index of process {process}; the manifest says process "
            f"{owners[at]} wrote it"
        )
    nbytes[:] = chunk_bytes(record, chunks)
    if "tag" not in (recs.dtype.names or ()):  # version 1 records carry neither
        return
    expected = {"tag": np.full(len(recs), leaf_tag(record), np.uint64), "nbytes": nbytes}
    for field, meaning in (("tag", "tag"), ("nbytes", "size in bytes")):
        wrong = recs[field] != expected[field]
        if np.any(wrong):
            at = int(np.argmax(wrong))
            raise CheckpointFormatError(
                f"{what} chunk {chunks[at]}: {meaning} {int(recs[field][at])} in its record, "
                f"{int(expected[field][at])} from the manifest (which does not describe the leaf the save wrote)"
            )


def check_records(
    recs: np.ndarray, process: int, leaves: Sequence[fmt.LeafRecord], files: int, where: str
) -> np.ndarray:
    """Refuses the records of ``process``'s index unless they are exactly the chunks the manifest
    says it wrote, each once, in data files ``0..files-1``, each the size of its chunk and bound
    to its leaf (version 2), no two claiming the same bytes. Returns each record's byte count.

    Together with the header's record count (the manifest's), this leaves a forger who edits the
    manifest, or an index's fields and all their checksums, nothing but whole different data."""
    leaf, chunk = recs["leaf"].astype(np.int64), recs["chunk"]
    later = (leaf[1:] > leaf[:-1]) | ((leaf[1:] == leaf[:-1]) & (chunk[1:] > chunk[:-1]))
    if not np.all(later):
        at = int(np.argmin(later)) + 1
        raise CheckpointFormatError(
            f"{where}: record {at} (leaf {leaf[at]} chunk {chunk[at]}) is not after record {at - 1} (leaf "
            f"{leaf[at - 1]} chunk {chunk[at - 1]}): records are sorted by (leaf, chunk), each chunk once"
        )
    if len(recs) and (leaf[-1] >= len(leaves) or int(recs["file"].max()) >= files):
        raise CheckpointFormatError(
            f"{where}: a record names leaf {leaf[-1]} or data file {int(recs['file'].max())}; expected one of "
            f"{len(leaves)} leaves and {files} data files"
        )
    nbytes = np.zeros(len(recs), np.uint64)
    bounds = np.searchsorted(leaf, np.arange(len(leaves) + 1))
    for i in np.unique(leaf):
        a, b = bounds[i], bounds[i + 1]
        _check_leaf(recs[a:b], leaves[i], process, nbytes[a:b], where)
    _check_ranges(recs, nbytes, leaves, where)
    return nbytes


def _check_ranges(recs: np.ndarray, nbytes: np.ndarray, leaves: Sequence[fmt.LeafRecord], where: str) -> None:
    """No record's bytes beyond any file a save writes, and no two records' bytes overlapping."""
    if np.any(recs["offset"] >= 1 << 62) or np.any(recs["offset"] + nbytes >= 1 << 62):
        raise CheckpointFormatError(f"{where}: a record's bytes lie beyond any data file a save writes")
    order = np.lexsort((recs["offset"], recs["file"]))
    files, starts = recs["file"][order], recs["offset"][order]
    ends = starts + nbytes[order]
    clash = (files[1:] == files[:-1]) & (starts[1:] < ends[:-1])
    if np.any(clash):
        at = int(np.argmax(clash))
        first, second = (recs[order[i]] for i in (at, at + 1))
        one, other = (f"leaf {leaves[r['leaf']].key!r} chunk {r['chunk']}" for r in (first, second))
        raise CheckpointFormatError(
            f"{where}: the records of {one} (bytes {starts[at]}-{ends[at]}) and {other} (from byte "
            f"{starts[at + 1]}) overlap in data file {files[at]}"
        )


def keys(recs: np.ndarray) -> np.ndarray:
    """Each checked record's (leaf, chunk) as one sorted integer (see ``positions``)."""
    return recs["leaf"].astype(np.int64) * MAX_LEAF_CHUNKS + recs["chunk"].astype(np.int64)


def positions(keys: np.ndarray, leaf: int, chunks: np.ndarray) -> np.ndarray:
    """Where the records of ``chunks`` of ``leaf`` are among checked records with ``keys``."""
    return np.searchsorted(keys, leaf * MAX_LEAF_CHUNKS + chunks)
