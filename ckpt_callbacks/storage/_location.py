"""Checkpoint locations: one URL, two views (TensorStore kvstore, fsspec filesystem).

What a scheme means is its ``Backend`` (``backends/``): this module parses URLs and asks the
backend of each location; it never branches on a scheme.

Arrays and small files go through TensorStore, whose writes of one key are atomic on every
backend (temp file + rename on local disk, one PUT on object stores); listing and recursive
deletes go through fsspec, which lists one level with a delimiter instead of every chunk.
``memory://`` has no fsspec view: TensorStore's memory store and fsspec's are separate
namespaces, so everything goes through one process-wide TensorStore context.

>>> loc = parse("memory://runs/a")
>>> kvstore_spec(loc.join("run-10"))
{'driver': 'memory', 'path': 'runs/a/run-10/'}
>>> parse("/tmp/x/../y").url
'file:///tmp/y'
"""

from __future__ import annotations

# Imported now, not lazily: a save finishing while the interpreter exits lists and deletes, and
# these modules cannot be imported then (they register exit hooks).
import concurrent.futures.thread  # noqa: F401
import functools
import os
import re
import stat
from collections.abc import Mapping, Sequence
from typing import Any

import tensorstore as ts

from ckpt_callbacks.errors import CheckpointPathError, CheckpointStorageError, CorruptCheckpointError
from ckpt_callbacks.storage import _options as storage
from ckpt_callbacks.storage._backend import Location, backend_for, schemes
from ckpt_callbacks.storage._options import StorageOptions

_SCHEME_LIKE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(.*)")
_OS_ERROR = re.compile(r"\[os_error_code='?([0-9]+)'?\]")
_QUOTED = re.compile(r'"([^"]+)"')


def as_storage_error(error: BaseException, where: str = "") -> BaseException:
    """TensorStore's ``ValueError`` for an operating-system failure (disk full, read-only,
    permission), or of a request that failed after its retries, as a ``CheckpointStorageError``
    with its errno and path; others unchanged."""
    if not isinstance(error, ValueError) or isinstance(error, CheckpointStorageError):
        return error
    match = _OS_ERROR.search(str(error))
    if match is None:
        return storage.request_failed(error, where)
    quoted = _QUOTED.search(str(error))
    code = int(match.group(1))
    filename = quoted.group(1).split("\x00")[0] if quoted else where  # TensorStore renders keys after a NUL
    converted = CheckpointStorageError(code, f"{os.strerror(code)} ({error})", filename)
    converted.__cause__ = error
    return converted


def parse(url: str | os.PathLike[str] | Location, storage: StorageOptions | None = None) -> Location:
    """Parses a local path, ``file://``, ``memory://``, ``s3://`` or ``gs://`` URL; ``storage``
    sets its requests' retries and timeouts (a ``Location`` given keeps its own unless set)."""
    if isinstance(url, Location):
        return url.with_storage(storage)
    return _parse(url).with_storage(storage)


def _parse(url: str | os.PathLike[str]) -> Location:
    text = os.fspath(url)
    if not isinstance(text, str) or not text.strip():
        raise CheckpointPathError(f"a checkpoint path must be a non-empty path or URL, got {url!r}")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()  # RFC 3986: a scheme is case-insensitive (FILE:// is file://)
    if not sep:
        looks = _SCHEME_LIKE.fullmatch(text)
        if looks:
            raise CheckpointPathError(
                f"{text!r} looks like a URL with a malformed scheme separator (expected '{looks.group(1)}://...'); "
                f"supported: {', '.join(s + '://' for s in schemes())}, or a local path (write './{text}' for a "
                "local directory of that name)"
            )
        return Location(scheme="file", path=refuse_backslash(os.path.abspath(os.path.expanduser(text)), text))
    if scheme not in schemes():
        path_parts(rest, text)  # '.' and '..' are refused before the scheme, as for a known one
        raise CheckpointPathError(f"unsupported URL scheme {scheme!r} in {text!r}; expected one of {schemes()}")
    return backend_for(scheme).parse(rest, text)


def refuse_backslash(path: str, text: str) -> str:
    """``path`` (a local path parsed from ``text``), or ``CheckpointPathError`` if one of its
    directory names holds a '\\': TensorStore's file driver reads each as a separator (as on
    Windows) while fsspec and the OS do not, so one checkpoint's files would land in two
    directories (``a\\b/`` and ``a/b/``). Checked at parse time, for every component."""
    for part in path.split("/"):
        if "\\" in part:
            raise CheckpointPathError(
                f"{text!r}: the directory name {part!r} cannot be used: it holds a '\\', which TensorStore's file "
                "driver reads as a separator (its arrays would be written to another directory than the rest of "
                "the checkpoint); rename the directory"
            )
    return path


def path_parts(rest: str, text: str) -> list[str]:
    """The non-empty components of ``rest`` (the part of URL ``text`` after ``://``); '.' and
    '..' are refused (``CheckpointPathError``)."""
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise CheckpointPathError(f"'.' and '..' are not allowed in {text!r}")
    return parts


def kvstore_spec(loc: Location, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The TensorStore kvstore spec of a directory (pure; S3 endpoint/region from ``env``), with
    the request retries of ``loc.storage`` inline for S3 and GCS."""
    return loc.backend.kvstore_spec(loc, os.environ if env is None else env)


@functools.cache
def context() -> ts.Context:
    """The process-wide TensorStore context (one ``memory://`` namespace per process)."""
    return ts.Context({"file_io_concurrency": {"limit": 16}})


def open_kvstore(loc: Location) -> ts.KvStore:
    """The TensorStore kvstore of directory ``loc``, in the process-wide context."""
    return ts.KvStore.open(kvstore_spec(loc), context=context()).result()


def refuse_special(loc: Location, name: str) -> None:
    """On local disk, a FIFO, device or directory where file ``name`` belongs is refused at
    once (``CorruptCheckpointError``): a read of a FIFO would block until ``op_timeout_s``."""
    local = loc.backend.local_path(loc)
    if local is None:
        return
    try:
        mode = os.stat(os.path.join(local, name)).st_mode  # stat never blocks on a FIFO
    except OSError:
        return  # absent (or unreadable): the read says so
    if not stat.S_ISREG(mode):
        where = loc.join(name).url
        raise CorruptCheckpointError(f"{where} is not a regular file (mode {stat.filemode(mode)}); refusing to read it")


def read_bytes(loc: Location, name: str) -> bytes | None:
    """The bytes of file ``name`` under ``loc``, or None if it does not exist.

    Raises ``CheckpointStorageError`` (``StorageTimeoutError`` after ``op_timeout_s``) naming
    the file if the store keeps failing, ``CorruptCheckpointError`` for a special file there.
    """
    refuse_special(loc, name)
    result = storage.wait(open_kvstore(loc).read(name), loc.options, loc.join(name).url, "read")
    return bytes(result.value) if result.state == "value" else None


def write_bytes(loc: Location, name: str, data: bytes) -> None:
    """Writes file ``name`` under ``loc`` atomically (readers see old or new, never part);
    failures as ``read_bytes``."""
    storage.wait(open_kvstore(loc).write(name, data), loc.options, loc.join(name).url, "write")


def local_path(loc: Location) -> str | None:
    """``loc`` as a POSIX path of this machine (for plain-file reads and existence checks), or
    None where it is none (``memory://``, object stores).

    >>> local_path(parse("/tmp/runs")), local_path(parse("memory://runs"))
    ('/tmp/runs', None)
    """
    return loc.backend.local_path(loc)


def fsspec_view(loc: Location, fresh_connections: bool = False) -> tuple[Any, str]:
    """The fsspec filesystem of ``loc`` (not ``memory://``) and ``loc``'s path in it
    (``fresh_connections``: S3 requests never reuse a connection: aiohttp sends an idempotent
    request again, once, when a reused connection drops it, a second send inside one attempt)."""
    view = loc.backend.fsspec_view(loc, fresh_connections)
    if view is None:
        raise CheckpointPathError(f"{loc.url}: {loc.scheme}:// has no fsspec view (it lives in TensorStore's context)")
    return view


def list_dirs(loc: Location) -> list[str]:
    """Names of the immediate subdirectories of ``loc`` (one delimited listing)."""
    return loc.backend.list_dirs(loc)


def has_any(loc: Location) -> bool:
    """Whether anything at all is stored under ``loc``."""
    return loc.backend.has_any(loc)


def delete_tree(loc: Location) -> None:
    """Deletes everything under ``loc``; a missing directory is not an error."""
    loc.backend.delete_tree(loc)


def list_entries(loc: Location) -> list[str]:
    """Names of everything (files and directories) directly under ``loc``.

    TensorStore's transient lock files (``<key>.__lock``, beside a file being written on local
    disk) are not entries.
    """
    return loc.backend.list_entries(loc)


def list_keys_under(loc: Location) -> list[str]:
    """Every file under ``loc``, as paths relative to it (TensorStore's lock files left out)."""
    return loc.backend.list_keys_under(loc)


def delete_entry(loc: Location, name: str) -> None:
    """Deletes file or directory ``name`` directly under ``loc``."""
    loc.backend.delete_entry(loc, name)


def delete_keys(loc: Location, keys: Sequence[str]) -> None:
    """Deletes files ``keys`` (relative to ``loc``), on S3 and GCS in batched requests.

    One operation of ``loc.options``: attempted at most ``max_retries + 1`` times, each attempt
    sending only the keys not deleted yet, all within ``op_timeout_s``.

    Raises:
      CheckpointStorageError: some keys could not be deleted (the first is named, with the
        count); the others are gone. Keys already missing count as deleted.
      StorageTimeoutError: the deletes did not finish within ``op_timeout_s``.
    """
    loc.backend.delete_keys(loc, keys)
