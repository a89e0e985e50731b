"""``memory://``: TensorStore's in-process store, one namespace per process (``context()``).

It has no fsspec view (fsspec's memory store is another namespace): listings and deletes go
through TensorStore too.

>>> from ckpt_callbacks.storage import _location as paths
>>> loc = paths.parse("memory://doc/backends/memory")
>>> paths.write_bytes(loc.join("a"), "x", b"1")
>>> MEMORY.list_dirs(loc), MEMORY.list_keys_under(loc)
(['a'], ['a/x'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import tensorstore as ts

from ckpt_callbacks.storage._backend import Location, register_backend
from ckpt_callbacks.storage._location import context, open_kvstore, path_parts
from ckpt_callbacks.storage.backends._base import BaseBackend, clean


def _keys(loc: Location) -> list[str]:
    return [k.decode() for k in open_kvstore(loc).list().result()]


class MemoryBackend(BaseBackend):
    scheme: ClassVar[str] = "memory"

    def parse(self, rest: str, text: str) -> Location:
        return Location(scheme=self.scheme, path="/".join(path_parts(rest, text)))

    def url(self, loc: Location) -> str:
        return f"{self.scheme}://" + loc.path

    def kvstore_spec(self, loc: Location, env: Mapping[str, str]) -> dict[str, Any]:
        return {"driver": "memory", "path": loc.path + "/" if loc.path else ""}

    def list_dirs(self, loc: Location) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in _keys(loc) if "/" in k})

    def has_any(self, loc: Location) -> bool:
        return bool(_keys(loc))

    def delete_tree(self, loc: Location) -> None:
        prefix = loc.path + "/" if loc.path else ""
        kv = ts.KvStore.open({"driver": "memory"}, context=context()).result()
        kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0" if prefix else "")).result()

    def list_entries(self, loc: Location) -> list[str]:
        return clean({k.split("/", 1)[0] for k in _keys(loc)})

    def list_keys_under(self, loc: Location) -> list[str]:
        return clean(_keys(loc))

    def delete_entry(self, loc: Location, name: str) -> None:
        open_kvstore(loc).delete_range(ts.KvStore.KeyRange(name, name + "\x00")).result()
        self.delete_tree(loc.join(name))


MEMORY = register_backend(MemoryBackend())
