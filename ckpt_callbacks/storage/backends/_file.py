"""``file://`` and plain paths: a directory on a local (or mounted) filesystem.

>>> from ckpt_callbacks.storage import _location as paths
>>> FILE.local_path(paths.parse("file://localhost/tmp/runs"))
'/tmp/runs'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import fsspec
import fsspec.implementations.local  # loaded with the package, not by a first listing

from ckpt_callbacks.errors import CheckpointPathError
from ckpt_callbacks.storage._backend import Location, register_backend
from ckpt_callbacks.storage.backends._base import FsspecBackend


class FileBackend(FsspecBackend):
    scheme: ClassVar[str] = "file"

    def parse(self, rest: str, text: str) -> Location:
        host, slash, _ = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise CheckpointPathError(
                f"{text!r}: a file URL names no host (file:///abs/path or file://localhost/abs/path), found {host!r}"
            )
        return Location(scheme=self.scheme, path=os.path.abspath(rest[len(host) :]))

    def url(self, loc: Location) -> str:
        return f"{self.scheme}://" + loc.path

    def kvstore_spec(self, loc: Location, env: Mapping[str, str]) -> dict[str, Any]:
        return {"driver": "file", "path": loc.path + "/" if loc.path else ""}

    def fsspec_view(self, loc: Location, fresh_connections: bool) -> tuple[Any, str]:
        return fsspec.filesystem("file"), loc.path

    def local_path(self, loc: Location) -> str:
        return loc.path


FILE = register_backend(FileBackend())
