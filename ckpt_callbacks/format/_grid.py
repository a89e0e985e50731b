"""Which process writes which slice: the chunk grid and write units of one array (pure).

Every process computes the same global plan from the sharding alone, so no communication
is needed to agree on who writes what. Each distinct slice is written exactly once: a
replicated slice is split into up to one chunk per replica (along an axis the replica count
divides) so that replicas share the writing instead of leaving it all to process 0.

>>> plan = plan_array((8, 4), 4, {"d0": ((0, 4), (0, 4)), "d1": ((4, 8), (0, 4))}, leaf_index=0)
>>> plan.chunks
(4, 4)
>>> [(u.chunk, u.device) for u in plan.units]
[((0, 0), 'd0'), ((1, 0), 'd1')]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence

Region = tuple[tuple[int, int], ...]

# Leaves up to this size are packed: their chunks go into a few pack files per process instead
# of one zarr3 array each (two objects per leaf, and a request or more per object, on S3/GCS).
PACK_MAX_LEAF_BYTES = 1 << 20
PACK_MAX_FILE_BYTES = 64 << 20
PACK_ALIGN = 64  # every chunk in a pack file, and every unit in a staging buffer, starts at a multiple


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the next multiple of ``PACK_ALIGN``."""
    return -(-nbytes // PACK_ALIGN) * PACK_ALIGN


# Replicated slices smaller than this are written whole by one replica (chosen per leaf, so
# many small replicated leaves still spread over replicas): tiny chunks cost more than they save.
MIN_SPLIT_BYTES = 1 << 20
DEFAULT_MAX_CHUNK_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class WriteUnit:
    """One chunk: its grid index, global region, source device and region within that shard."""

    chunk: tuple[int, ...]
    region: Region
    device: Hashable
    local: Region

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.region)


@dataclasses.dataclass(frozen=True)
class ArrayPlan:
    chunks: tuple[int, ...]
    units: tuple[WriteUnit, ...]


def slices(region: Region) -> tuple[slice, ...]:
    """A region as a tuple of slices (to index an array with)."""
    return tuple(slice(a, b) for a, b in region)


def normalize_index(index: Sequence[slice], shape: Sequence[int]) -> Region:
    """A tuple of slices (as jax's ``devices_indices_map`` gives) as (start, stop) pairs."""
    out = []
    for sl, size in zip(index, shape, strict=True):
        start, stop, step = sl.indices(size)
        if step != 1:
            raise ValueError(f"strided shard index {sl} is not supported")
        out.append((start, stop))
    return tuple(out)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max((d for d in range(1, min(n, limit) + 1) if n % d == 0), default=1)


def _smallest_prime_factor(n: int) -> int:
    # Trial division alone is O(sqrt(n)): seconds for a dim near 2**50 without small factors
    # (``plan-layout`` plans any shape on paper). Past the small primes, factor n instead.
    small = next((p for p in range(2, min(n, _TRIAL) + 1) if n % p == 0), None)
    if small is not None or n < _TRIAL**2:
        return small or n
    return min(_prime_factors(n))


_TRIAL = 1 << 10
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)  # Miller-Rabin is exact below 3.3e24


def _is_prime(n: int) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime_factors(n: int) -> list[int]:
    """The prime factors of an odd ``n`` with no factor up to ``_TRIAL`` (Pollard's rho)."""
    if _is_prime(n):
        return [n]
    c = 1
    while True:
        x = y = 2
        d = 1
        while d == 1:
            x = (x * x + c) % n
            y = (y * y + c) % n
            y = (y * y + c) % n
            d = math.gcd(abs(x - y), n)
        if d != n:
            return _prime_factors(d) + _prime_factors(n // d)
        c += 1


def _chunk_shape(shard: tuple[int, ...], itemsize: int, replicas: int, max_chunk_bytes: int) -> tuple[int, ...]:
    chunk = [max(1, n) for n in shard]
    if replicas > 1 and math.prod(shard) * itemsize >= MIN_SPLIT_BYTES:
        # Prefer the leading axis: a split along it keeps every chunk a contiguous block.
        splits = [_largest_divisor_at_most(n, replicas) for n in chunk]
        best = max(range(len(chunk)), key=lambda a: (splits[a], -a), default=None)
        if best is not None and splits[best] > 1:
            chunk[best] //= splits[best]
    while math.prod(chunk) * itemsize > max_chunk_bytes:
        divisible = [a for a in range(len(chunk)) if chunk[a] > 1]
        if not divisible:
            break
        axis = divisible[0]
        chunk[axis] //= _smallest_prime_factor(chunk[axis])
    return tuple(chunk)


def _chunks_in(region: Region, chunk: tuple[int, ...]) -> list[Region]:
    out: list[Region] = [()]
    for (start, stop), size in zip(region, chunk, strict=True):
        spans = [(s, min(s + size, stop)) for s in range(start, stop, size)]
        out = [(*prefix, span) for prefix in out for span in spans]
    return out


def plan_array(
    shape: Sequence[int],
    itemsize: int,
    index_map: Mapping[Hashable, Region],
    *,
    leaf_index: int,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> ArrayPlan:
    """The global write plan of one array.

    Args:
      shape: global shape.
      itemsize: bytes per element as stored.
      index_map: device -> region it holds (all devices, every process). Devices must be
        ordered consistently on every process (jax device ids are).
      leaf_index: position of the leaf; rotates which replica writes unsplit chunks.
      max_chunk_bytes: chunks are split (along divisors of the shard shape) below this size.
    """
    shape = tuple(int(n) for n in shape)
    groups: dict[Region, list[Hashable]] = {}
    for device, region in index_map.items():
        groups.setdefault(region, []).append(device)
    shard = tuple(max((r[d][1] - r[d][0] for r in groups), default=0) for d in range(len(shape)))
    replicas = max((len(devs) for devs in groups.values()), default=1)
    chunks = _chunk_shape(shard, itemsize, replicas, max_chunk_bytes)
    units = []
    if math.prod(shape) > 0:
        for region in sorted(groups):
            devices = groups[region]
            for k, sub in enumerate(_chunks_in(region, chunks)):
                device = devices[(k + leaf_index) % len(devices)]
                local = tuple((a - r0, b - r0) for (a, b), (r0, _) in zip(sub, region, strict=True))
                chunk = tuple(a // c for (a, _), c in zip(sub, chunks, strict=True))
                units.append(WriteUnit(chunk=chunk, region=sub, device=device, local=local))
    return ArrayPlan(chunks=chunks, units=tuple(units))


def pack_layout(chunks: Sequence[tuple[int, int]], max_file_bytes: int = PACK_MAX_FILE_BYTES) -> list[tuple[str, int]]:
    """Pack file and offset of each chunk, given (writing process, bytes) per chunk (pure).

    Each process fills its own files, ``pack.<process>-<n>``, in the order given, every chunk
    aligned to 64 bytes; a file is closed when the next chunk would take it past
    ``max_file_bytes``. Every process computes the same layout from the same global plan.

    >>> pack_layout([(0, 100), (1, 10), (0, 8)], max_file_bytes=160)
    [('pack.0-0', 0), ('pack.1-0', 0), ('pack.0-0', 128)]
    >>> pack_layout([(0, 100), (0, 100)], max_file_bytes=160)
    [('pack.0-0', 0), ('pack.0-1', 0)]
    """
    state: dict[int, tuple[int, int]] = {}  # process -> (file number, next offset)
    out = []
    for process, nbytes in chunks:
        number, offset = state.get(process, (0, 0))
        if offset and offset + nbytes > max_file_bytes:
            number, offset = number + 1, 0
        out.append((f"pack.{process}-{number}", offset))
        state[process] = (number, offset + aligned(nbytes))
    return out
