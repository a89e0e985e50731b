"""The "process" layout's compact records (pure): who wrote each chunk, and the index files.

In ``layout="process"`` every chunk a process writes goes into its own data files
(``<item>/pack.<process>-<n>``) and its chunk records (file, offset, crc32c) into its own
index file (``<item>/index.<process>``). The manifest keeps per leaf only ``writers``: the
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
import struct
from collections.abc import Sequence
from typing import Any

import crc32c

from ckpt_callbacks.errors import CheckpointFormatError, CorruptCheckpointError

Block = Sequence[int]  # [p0, dp, run, reps]
INDEX_MAGIC = b"CKPTIDX1"
HEADER = struct.Struct("<8sII")  # magic, process, record count
# leaf, file number, chunk (linear, C order), offset, chunk crc32c, crc32c of the rest (with the process)
RECORD = struct.Struct("<IIQQII")
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
        if entry[0] != index_size(records):
            raise CheckpointFormatError(
                f"{where}: layout: index of process {p} is {entry[0]} bytes; its {records} chunks make "
                f"{index_size(records)}"
            )


def index_size(records: int) -> int:
    return HEADER.size + RECORD.size * records


def index_checksum(data: bytes) -> int:
    """The crc32c the manifest records of an index file: over its header and its records' fields,
    without each record's own crc32c (a crc32c over bytes followed by their own crc32c is the
    same whatever the bytes are, so the whole file's would vouch for nothing)."""
    view = memoryview(data)
    crc = crc32c.crc32c(view[: HEADER.size])
    for at in range(HEADER.size, len(data), RECORD.size):
        crc = crc32c.crc32c(view[at : min(at + RECORD.size - 4, len(data))], crc)
    return int(crc)


def _record_crc(process: int, fields: Sequence[int]) -> int:
    """(leaf, file, chunk, offset, crc32c) and the process, checksummed together."""
    return crc32c.crc32c(struct.pack("<IIIQQI", process, *fields))


def encode_index(process: int, records: Sequence[tuple[int, int, int, int, int]]) -> bytes:
    """An index file: header, then (leaf, file, chunk, offset, crc32c) records sorted by (leaf, chunk)."""
    ordered = sorted(records, key=lambda r: (r[0], r[2]))
    out = [HEADER.pack(INDEX_MAGIC, process, len(ordered))]
    out += [RECORD.pack(*r, _record_crc(process, r)) for r in ordered]
    return b"".join(out)


def decode_records(data: bytes, process: int, where: str) -> list[tuple[int, int, int, int, int]]:
    """Records (leaf, file, chunk, offset, crc32c) from a whole number of them; each one's own
    crc32c checked (a range read cannot check the whole file's)."""
    if len(data) % RECORD.size:
        raise CorruptCheckpointError(f"{where}: {len(data)} bytes of index records, not a multiple of {RECORD.size}")
    out = []
    for at in range(0, len(data), RECORD.size):
        *fields, own = RECORD.unpack_from(data, at)
        if _record_crc(process, fields) != own:
            raise CorruptCheckpointError(f"{where}: index record at byte {HEADER.size + at} fails its crc32c")
        out.append((fields[0], fields[1], fields[2], fields[3], fields[4]))
    return out


def check_header(data: bytes, process: int, size: int, where: str) -> None:
    """Refuses an index header that is not this process's, or not ``size`` bytes of records."""
    if len(data) < HEADER.size:
        raise CorruptCheckpointError(f"{where}: {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, found, count = HEADER.unpack_from(data)
    if magic != INDEX_MAGIC or found != process or size != index_size(count):
        raise CorruptCheckpointError(
            f"{where}: header {magic!r} of process {found} with {count} records; expected {INDEX_MAGIC!r} of "
            f"process {process} with {(size - HEADER.size) // RECORD.size}"
        )


def decode_index(data: bytes, process: int, where: str) -> list[tuple[int, int, int, int, int]]:
    """A whole index file (after its crc32c was checked against the manifest)."""
    check_header(data, process, len(data), where)
    return decode_records(data[HEADER.size :], process, where)
