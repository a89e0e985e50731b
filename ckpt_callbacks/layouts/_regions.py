"""Which chunks and bytes a read of a leaf's regions touches, checked against this host (pure
but for the host's memory size).

>>> chunk_regions(((0, 4),), (2,), (4,))
[((0,), ((0, 2),)), ((1,), ((2, 4),))]
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks.errors import CheckpointFormatError, ShardingRuleError


@functools.cache
def host_memory() -> int:
    """Bytes of physical memory: no read of a leaf may claim more (TensorStore would abort)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: only the format's own bound
        return 1 << 50


def data_sharding(record: fmt.LeafRecord, sharding: Sharding) -> Sharding:
    """The sharding of a PRNG key leaf's stored key data (trailing key dims unsharded)."""
    if record.kind != "prng_key":
        return sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(record.data_shape) - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec))
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise ShardingRuleError(
        f"leaf {record.key!r}: PRNG keys restore onto NamedSharding or a single device, got {type(sharding).__name__}"
    )


def chunk_regions(
    region: planning.Region, chunks: Sequence[int], shape: Sequence[int]
) -> list[tuple[tuple[int, ...], planning.Region]]:
    grids = [range(a // c, -(-b // c)) for (a, b), c in zip(region, chunks, strict=True)]
    out: list[tuple[tuple[int, ...], planning.Region]] = [((), ())]
    for grid, c, n in zip(grids, chunks, shape, strict=True):
        out = [((*idx, g), (*reg, (g * c, min((g + 1) * c, n)))) for idx, reg in out for g in grid]
    return out


def claimed_bytes(record: fmt.LeafRecord, regions: Sequence[planning.Region], where: str) -> int:
    """Bytes of host memory reading ``regions`` of a leaf takes; more than this host has is an error
    (a manifest's shapes are not trusted with an allocation)."""
    itemsize = fmt.dtype_from_name(record.zarr_dtype).itemsize
    claimed = sum(math.prod(b - a for a, b in region) for region in regions) * itemsize
    if claimed > host_memory():
        raise CheckpointFormatError(
            f"{where}: leaf {record.key!r}: the manifest's shape {list(record.data_shape)} needs {claimed} "
            f"bytes of host memory to read, more than this host has ({host_memory()})"
        )
    return claimed
