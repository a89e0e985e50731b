"""The "zarr3" layout: one zarr3 array per large leaf (one object per chunk), small leaves
packed into a few shared files per process; every chunk's crc32c in the manifest. Process 0
makes the item directory a zarr3 group (its ``zarr.json``), so zarr-python opens it as one
(``zarr.open_group(item)["params/w"]``); no reader of ours reads that file.

>>> import jax.numpy as jnp, ckpt_callbacks as cc
>>> cc.save("memory://doc/zarr3", {"w": jnp.arange(4.0)}, layout="zarr3")
>>> cc.restore("memory://doc/zarr3")["w"].tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import tensorstore as ts

from ckpt_callbacks import distributed
from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage as paths
from ckpt_callbacks.layouts._base import register_layout
from ckpt_callbacks.layouts._reads import PackFiles


class Zarr3Layout:
    """Chunks are where zarr3 (or the pack files) put them; the manifest records each crc32c."""

    kind: ClassVar[str] = "zarr3"

    def file_bytes(self, max_host_bytes: int | None) -> int | None:
        return None  # leaves pack only under pack_bytes

    def report(self, item_locs: Mapping[str, paths.Location], leaves_of: Mapping[str, Sequence[Any]], crcs: Any) -> Any:
        if distributed.is_primary():
            write_groups(item_locs)
        return {i: {str(k): v for k, v in c.items()} for i, c in crcs.items()}

    def manifests(
        self, structures: Mapping[str, Any], leaves_of: Mapping[str, Sequence[Any]], gathered: Sequence[Any]
    ) -> dict[str, fmt.Manifest]:
        """Each item's manifest, with every process's chunk checksums merged in."""
        out = {}
        for item, leaves in leaves_of.items():
            crcs: dict[int, dict[str, int]] = collections.defaultdict(dict)
            for per_process in gathered:
                for index, chunk_crcs in per_process.get(item, {}).items():
                    crcs[int(index)].update(chunk_crcs)
            records = tuple(
                dataclasses.replace(leaf.record, crc32c=dict(sorted(crcs[i].items()))) for i, leaf in enumerate(leaves)
            )
            out[item] = fmt.Manifest(tree=structures[item], leaves=records)
        return out

    def index_sizes(self, chunks_per_process: Sequence[int]) -> list[int] | None:
        return None  # no index files: the manifest holds every chunk's record

    def locate(
        self,
        loc: paths.Location,
        manifest: fmt.Manifest,
        records: Sequence[fmt.LeafRecord] | None,
        targets: Sequence[Any] | None,
    ) -> tuple[list[fmt.LeafRecord], PackFiles]:
        return list(manifest.leaves if records is None else records), PackFiles(loc)


# The item's group (zarr v3 has no implicit groups). Not every directory above an array: in a
# tree of nested dicts those are nearly as many objects again as the arrays' own zarr.json.
GROUP_JSON = b'{"zarr_format":3,"node_type":"group"}'


def write_groups(item_locs: Mapping[str, paths.Location]) -> None:
    """Makes each item directory a zarr3 group (its ``zarr.json``), the writes in flight at once."""
    pending = []
    for loc in item_locs.values():
        store = ts.KvStore.open(paths.kvstore_spec(loc), context=paths.context()).result()
        pending.append((store.write("zarr.json", GROUP_JSON), loc.join("zarr.json")))
    for future, at in pending:
        paths.wait(future, at.options, at.url, "write")


register_layout(Zarr3Layout())
