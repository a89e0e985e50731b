"""Defaults shared by the backends: ``BaseBackend`` (a store reached by TensorStore only) and
``FsspecBackend`` (listings and deletes through an fsspec filesystem).

A backend subclasses one of them and sets ``scheme`` and what differs: ``parse``, ``url``,
``kvstore_spec``, and, over fsspec, ``fsspec_view``.

>>> clean(["a", "b.__lock", "c"])
['a', 'c']
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import tensorstore as ts

from ckpt_callbacks.storage import _options as storage
from ckpt_callbacks.storage._backend import Location
from ckpt_callbacks.storage._location import open_kvstore
from ckpt_callbacks.storage._options import StorageOptions

LOCK_SUFFIX = ".__lock"


def encodable(name: str) -> bool:
    """Whether a listed name is valid UTF-8 (a stray non-UTF-8 directory is never a checkpoint
    of ours, and TensorStore cannot take it as a key)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean(names: Iterable[str]) -> list[str]:
    """``names`` sorted, without TensorStore's lock files and names TensorStore cannot take."""
    return sorted(n for n in names if not n.endswith(LOCK_SUFFIX) and encodable(n))


class BaseBackend:
    """The defaults of ``Backend``: no options, no fsspec view, no local path, one TensorStore
    delete per key. Subclasses set ``scheme`` and define ``parse``, ``url``, ``kvstore_spec``
    and the listings."""

    scheme: ClassVar[str]
    is_object_store: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.scheme}://>"

    def check(self, loc: Location) -> None:
        pass

    def tensorstore_resources(self, opts: StorageOptions) -> dict[str, Any]:
        return {}

    def fsspec_options(self, opts: StorageOptions) -> dict[str, Any]:
        return {}

    def fsspec_view(self, loc: Location, fresh_connections: bool) -> tuple[Any, str] | None:
        return None

    def local_path(self, loc: Location) -> str | None:
        return None

    def kvstore_spec(self, loc: Location, env: Mapping[str, str]) -> dict[str, Any]:
        raise NotImplementedError

    def delete_keys(self, loc: Location, keys: Sequence[str]) -> None:
        if not keys:
            return
        kv = open_kvstore(loc)
        for key in keys:
            where = loc.url + "/" + key
            storage.wait(kv.delete_range(ts.KvStore.KeyRange(key, key + "\x00")), loc.options, where, "delete")


class FsspecBackend(BaseBackend):
    """Listings and deletes through ``fsspec_view``, each call made by ``call``."""

    def call(self, loc: Location, fs: Any, method: str, path: str, **kwargs: Any) -> Any:
        """``fs.<method>(path, **kwargs)``; object stores retry it (``ObjectStore.call``)."""
        return getattr(fs, method)(path, **kwargs)

    def _view(self, loc: Location) -> tuple[Any, str]:
        view = self.fsspec_view(loc, False)
        if view is None:
            raise NotImplementedError(f"{type(self).__name__} defines no fsspec_view")
        return view

    def list_dirs(self, loc: Location) -> list[str]:
        fs, root = self._view(loc)
        if not self.call(loc, fs, "exists", root):
            return []
        names = []
        for entry in self.call(loc, fs, "ls", root, detail=True):
            if entry["type"] == "directory":
                names.append(posixpath.basename(entry["name"].rstrip("/")))
        return sorted(n for n in names if encodable(n))

    def has_any(self, loc: Location) -> bool:
        fs, root = self._view(loc)
        return bool(self.call(loc, fs, "exists", root) and self.call(loc, fs, "ls", root))

    def delete_tree(self, loc: Location) -> None:
        fs, root = self._view(loc)
        if self.call(loc, fs, "exists", root):
            self.call(loc, fs, "rm", root, recursive=True)

    def list_entries(self, loc: Location) -> list[str]:
        fs, root = self._view(loc)
        listed = self.call(loc, fs, "ls", root, detail=False) if self.call(loc, fs, "exists", root) else []
        return clean({posixpath.basename(e.rstrip("/")) for e in listed})

    def list_keys_under(self, loc: Location) -> list[str]:
        fs, root = self._view(loc)
        found = self.call(loc, fs, "find", root) if self.call(loc, fs, "exists", root) else []
        return clean(posixpath.relpath(f, root) for f in found)

    def delete_entry(self, loc: Location, name: str) -> None:
        self.delete_tree(loc.join(name))
