"""``file://`` and plain paths: a directory on a local (or mounted) filesystem.

A ``file://`` URL is percent-decoded as UTF-8 (RFC 8089, what ``pathlib.Path.as_uri`` writes);
a plain path is taken as it is. ``url`` encodes what a URL must (spaces, '%', non-ASCII), so
``parse(loc.url) == loc``:

>>> from ckpt_callbacks.storage import _location as paths
>>> FILE.local_path(paths.parse("file://localhost/tmp/runs"))
'/tmp/runs'
>>> loc = paths.parse("file:///tmp/uri%20test/%C3%BC")
>>> loc.path, loc.url
('/tmp/uri test/ü', 'file:///tmp/uri%20test/%C3%BC')
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any, ClassVar

import fsspec
import fsspec.implementations.local  # loaded with the package, not by a first listing

from ckpt_callbacks.errors import CheckpointPathError
from ckpt_callbacks.storage._backend import Location, register_backend
from ckpt_callbacks.storage._location import refuse_backslash
from ckpt_callbacks.storage.backends._base import FsspecBackend

# What a URL path keeps as it is (RFC 3986 pchar and '/'): ordinary paths print unencoded.
_SAFE = "/!$&'()*+,;=:@~"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SLASH_ESCAPE = re.compile(r"%2F", re.IGNORECASE)


def decode_path(encoded: str, text: str) -> str:
    """The path of a ``file://`` URL ``text`` from its percent-encoded ``encoded`` part;
    ``CheckpointPathError`` for an invalid escape, bytes that are not UTF-8, or a NUL; for a
    raw '?' or '#' (a URL's query or fragment, never part of its path), and for '%2F' (a '/'
    inside one name, which a path cannot hold)."""
    for char, escape in (("?", "%3F"), ("#", "%23")):
        if char in encoded:
            raise CheckpointPathError(
                f"{text!r}: a {char!r} in a URL starts its {'query' if char == '?' else 'fragment'}, not part of its "
                f"path: percent-encode it ({escape}; Path.as_uri() does) or give a plain path"
            )
    if _SLASH_ESCAPE.search(encoded):
        raise CheckpointPathError(
            f"{text!r}: %2F in a file URL is a '/' inside one name, which a path cannot hold: write '/' between "
            "directories, or give a plain path"
        )
    bad = _BAD_ESCAPE.search(encoded)
    if bad:
        raise CheckpointPathError(
            f"{text!r}: invalid percent-escape {encoded[bad.start() : bad.start() + 3]!r} in a file URL "
            "(expected %XX, two hex digits; write %25 for a '%', or give a plain path)"
        )
    try:
        path = urllib.parse.unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointPathError(
            f"{text!r}: a file URL must decode to UTF-8, found bytes that are not UTF-8 ({e.reason})"
        ) from None
    if "\x00" in path:
        raise CheckpointPathError(f"{text!r}: a file URL names a path with a NUL character (%00)")
    return path


class FileBackend(FsspecBackend):
    scheme: ClassVar[str] = "file"

    def parse(self, rest: str, text: str) -> Location:
        host, slash, _ = rest.partition("/")
        if host.lower() not in ("", "localhost") or not slash:
            raise CheckpointPathError(
                f"{text!r}: a file URL names no host (file:///abs/path or file://localhost/abs/path), found {host!r}"
            )
        path = os.path.abspath(decode_path(rest[len(host) :], text))
        return Location(scheme=self.scheme, path=refuse_backslash(path, text))

    def check(self, loc: Location) -> None:
        # TensorStore's file driver splits a path at '\\' too (as on Windows) and refuses the
        # empty, '.' and '..' names that makes, with a bare ValueError at the first read.
        for part in loc.path.split("/"):
            if "\\" in part and any(p in ("", ".", "..") for p in part.split("\\")):
                raise CheckpointPathError(
                    f"{loc.path!r}: the directory name {part!r} cannot be used: TensorStore's file driver reads "
                    "each '\\' in it as a separator and refuses the empty, '.' or '..' names that leaves"
                )

    def url(self, loc: Location) -> str:
        # surrogateescape: a name that is not UTF-8 prints as its bytes (parse refuses it back).
        return f"{self.scheme}://" + urllib.parse.quote(loc.path, safe=_SAFE, errors="surrogateescape")

    def kvstore_spec(self, loc: Location, env: Mapping[str, str]) -> dict[str, Any]:
        return {"driver": "file", "path": loc.path + "/" if loc.path else ""}

    def fsspec_view(self, loc: Location, fresh_connections: bool) -> tuple[Any, str]:
        return fsspec.filesystem("file"), loc.path

    def local_path(self, loc: Location) -> str:
        return loc.path


FILE = register_backend(FileBackend())
