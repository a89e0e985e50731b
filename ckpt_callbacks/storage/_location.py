"""Checkpoint locations: one URL, two views (TensorStore kvstore, fsspec filesystem).

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
import dataclasses
import functools
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from typing import Any

import fsspec
import fsspec.implementations.local
import tensorstore as ts

from ckpt_callbacks.errors import CheckpointPathError, CheckpointStorageError, CorruptCheckpointError
from ckpt_callbacks.storage import _options as storage
from ckpt_callbacks.storage._options import DEFAULT as DEFAULT_STORAGE
from ckpt_callbacks.storage._options import StorageOptions

SCHEMES = ("file", "memory", "s3", "gs")
_LOCK_SUFFIX = ".__lock"
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Location:
    """A directory on one backend; ``path`` never ends in '/'.

    ``storage``: retries and timeouts of every request under it (kept by ``join``; None: the
    defaults of ``StorageOptions``).
    """

    scheme: str
    bucket: str = ""
    path: str = ""
    storage: StorageOptions | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise CheckpointPathError(f"unsupported scheme {self.scheme!r}; expected one of {SCHEMES}")
        if self.scheme in ("s3", "gs") and len(self.bucket) < 3:
            raise CheckpointPathError(f"{self.scheme}:// URL needs a bucket of 3+ characters, got {self.bucket!r}")

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return "file://" + self.path
        if self.scheme == "memory":
            return "memory://" + self.path
        return f"{self.scheme}://{self.bucket}" + ("/" + self.path if self.path else "")

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def join(self, *parts: str) -> Location:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise ValueError(f"invalid path component {part!r} under {self.url}")
        path = posixpath.join(self.path, *parts) if self.path else posixpath.join(*parts)
        return dataclasses.replace(self, path=path)

    def __str__(self) -> str:
        return self.url

    @property
    def options(self) -> StorageOptions:
        return self.storage or DEFAULT_STORAGE

    def with_storage(self, options: StorageOptions | None) -> Location:
        """This location with ``options`` for its requests (unchanged if None)."""
        return self if options is None else dataclasses.replace(self, storage=options)


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
    if not sep:
        looks = _SCHEME_LIKE.fullmatch(text)
        if looks:
            raise CheckpointPathError(
                f"{text!r} looks like a URL with a malformed scheme separator (expected '{looks.group(1)}://...'); "
                f"supported: {', '.join(s + '://' for s in SCHEMES)}, or a local path (write './{text}' for a "
                "local directory of that name)"
            )
        return Location(scheme="file", path=os.path.abspath(os.path.expanduser(text)))
    if scheme == "file":
        host, slash, _ = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise CheckpointPathError(
                f"{text!r}: a file URL names no host (file:///abs/path or file://localhost/abs/path), found {host!r}"
            )
        return Location(scheme="file", path=os.path.abspath(rest[len(host) :]))
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise CheckpointPathError(f"'.' and '..' are not allowed in {text!r}")
    if scheme == "memory":
        return Location(scheme="memory", path="/".join(parts))
    if scheme in ("s3", "gs"):
        if not parts or not rest.split("/")[0]:
            raise CheckpointPathError(f"{text!r} names no bucket (expected {scheme}://BUCKET/path)")
        return Location(scheme=scheme, bucket=parts[0], path="/".join(parts[1:]))
    raise CheckpointPathError(f"unsupported URL scheme {scheme!r} in {text!r}; expected one of {SCHEMES}")


def kvstore_spec(loc: Location, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The TensorStore kvstore spec of a directory (pure; S3 endpoint/region from ``env``), with
    the request retries of ``loc.storage`` inline for S3 and GCS."""
    env = os.environ if env is None else env
    prefix = loc.path + "/" if loc.path else ""
    if loc.scheme == "file":
        return {"driver": "file", "path": prefix}
    if loc.scheme == "memory":
        return {"driver": "memory", "path": prefix}
    spec: dict[str, Any] = {"driver": "gcs" if loc.scheme == "gs" else "s3", "bucket": loc.bucket, "path": prefix}
    spec.update(storage.tensorstore_resources(loc.scheme, loc.options))
    if loc.scheme == "s3":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        if env.get("AWS_ACCESS_KEY_ID"):
            spec["aws_credentials"] = {"type": "environment"}
    return spec


@functools.cache
def context() -> ts.Context:
    """The process-wide TensorStore context (one ``memory://`` namespace per process)."""
    return ts.Context({"file_io_concurrency": {"limit": 16}})


def _kvstore(loc: Location) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(loc), context=context()).result()


def refuse_special(loc: Location, name: str) -> None:
    """On local disk, a FIFO, device or directory where file ``name`` belongs is refused at
    once (``CorruptCheckpointError``): a read of a FIFO would block until ``op_timeout_s``."""
    if loc.scheme != "file":
        return
    try:
        mode = os.stat(os.path.join(loc.path, name)).st_mode  # stat never blocks on a FIFO
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
    result = storage.wait(_kvstore(loc).read(name), loc.options, loc.join(name).url, "read")
    return bytes(result.value) if result.state == "value" else None


def write_bytes(loc: Location, name: str, data: bytes) -> None:
    """Writes file ``name`` under ``loc`` atomically (readers see old or new, never part);
    failures as ``read_bytes``."""
    storage.wait(_kvstore(loc).write(name, data), loc.options, loc.join(name).url, "write")


@functools.cache
def _one_attempt(protocol: str) -> Any:
    """The fsspec class of ``protocol`` ("s3", "gs") sending each request once.

    s3fs and gcsfs retry on their own (s3fs 5 tries; gcsfs 6, with waits of up to 32 s, fixed
    when its class is defined), under ``storage.retrying``: a listing with ``max_retries=1``
    went out 6 times. Here the library's loop is the only one.
    """
    cls = fsspec.get_filesystem_class(protocol)
    if protocol == "s3":
        return type("S3OneAttempt", (cls,), {"retries": 1})
    return type("GCSOneAttempt", (cls,), {"_request": cls._request.__wrapped__})  # without @retry_request


def _fs(loc: Location, fresh_connections: bool = False) -> Any:
    """The fsspec filesystem of ``loc``; object stores without listing caches (TensorStore writes
    behind their back), one attempt per request, each waited on at most ``op_timeout_s``.

    ``fresh_connections``: S3 requests never reuse a connection (aiohttp sends an idempotent
    request again, once, when a reused connection drops it: a second send inside one attempt)."""
    if loc.scheme == "gs":
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
        emulator = {"endpoint_url": endpoint, "token": "anon"} if endpoint else {}
        options = storage.fsspec_options("gs", loc.options)
        return _one_attempt("gs")(use_listings_cache=False, **emulator, **options)
    if loc.scheme == "s3":
        spec = kvstore_spec(loc)
        client_kwargs = {
            k: v for k, v in (("endpoint_url", spec.get("endpoint")), ("region_name", spec.get("aws_region"))) if v
        }
        options = storage.fsspec_options("s3", loc.options)
        if fresh_connections:
            options["config_kwargs"]["connector_args"] = {"force_close": True, "keepalive_timeout": None}
        return _one_attempt("s3")(client_kwargs=client_kwargs, use_listings_cache=False, **options)
    return fsspec.filesystem("file")


class _Fs:
    """The fsspec filesystem of a location; on object stores each call is retried with backoff
    and bounded by ``op_timeout_s`` (``storage.retrying``)."""

    def __init__(self, loc: Location) -> None:
        self.fs = _fs(loc)
        self.loc = loc

    def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        call = getattr(self.fs, method)
        if self.loc.scheme not in ("s3", "gs"):
            return call(path, **kwargs)
        return storage.retrying(lambda left: call(path, **kwargs, timeout=left), self.loc.options, self.loc.url, method)


def _fs_path(loc: Location) -> str:
    return loc.path if loc.scheme == "file" else f"{loc.bucket}/{loc.path}".rstrip("/")


def fsspec_view(loc: Location, fresh_connections: bool = False) -> tuple[Any, str]:
    """The fsspec filesystem of ``loc`` (not ``memory://``) and ``loc``'s path in it
    (``fresh_connections``: see ``_fs``)."""
    if loc.scheme == "memory":
        raise CheckpointPathError(f"{loc.url}: memory:// has no fsspec view (it lives in TensorStore's context)")
    return _fs(loc, fresh_connections), _fs_path(loc)


def _memory_keys(loc: Location) -> list[str]:
    return [k.decode() for k in _kvstore(loc).list().result()]


def list_dirs(loc: Location) -> list[str]:
    """Names of the immediate subdirectories of ``loc`` (one delimited listing)."""
    if loc.scheme == "memory":
        return sorted({k.split("/", 1)[0] for k in _memory_keys(loc) if "/" in k})
    fs = _Fs(loc)
    root = _fs_path(loc)
    if not fs("exists", root):
        return []
    names = []
    for entry in fs("ls", root, detail=True):
        if entry["type"] == "directory":
            names.append(posixpath.basename(entry["name"].rstrip("/")))
    return sorted(n for n in names if _encodable(n))


def _encodable(name: str) -> bool:
    """Whether a listed name is valid UTF-8 (a stray non-UTF-8 directory is never a checkpoint
    of ours, and TensorStore cannot take it as a key)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_any(loc: Location) -> bool:
    """Whether anything at all is stored under ``loc``."""
    if loc.scheme == "memory":
        return bool(_memory_keys(loc))
    fs = _Fs(loc)
    root = _fs_path(loc)
    return bool(fs("exists", root) and fs("ls", root))


def delete_tree(loc: Location) -> None:
    """Deletes everything under ``loc``; a missing directory is not an error."""
    if loc.scheme == "memory":
        prefix = loc.path + "/" if loc.path else ""
        kv = ts.KvStore.open({"driver": "memory"}, context=context()).result()
        kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0" if prefix else "")).result()
        return
    fs = _Fs(loc)
    root = _fs_path(loc)
    if fs("exists", root):
        fs("rm", root, recursive=True)


def list_entries(loc: Location) -> list[str]:
    """Names of everything (files and directories) directly under ``loc``.

    TensorStore's transient lock files (``<key>.__lock``, beside a file being written on local
    disk) are not entries.
    """
    if loc.scheme == "memory":
        names = {k.split("/", 1)[0] for k in _memory_keys(loc)}
    else:
        fs = _Fs(loc)
        root = _fs_path(loc)
        listed = fs("ls", root, detail=False) if fs("exists", root) else []
        names = {posixpath.basename(e.rstrip("/")) for e in listed}
    return sorted(n for n in names if not n.endswith(_LOCK_SUFFIX) and _encodable(n))


def list_keys_under(loc: Location) -> list[str]:
    """Every file under ``loc``, as paths relative to it (TensorStore's lock files left out)."""
    if loc.scheme == "memory":
        keys = _memory_keys(loc)
    else:
        fs = _Fs(loc)
        root = _fs_path(loc)
        found = fs("find", root) if fs("exists", root) else []
        keys = [posixpath.relpath(f, root) for f in found]
    return sorted(k for k in keys if not k.endswith(_LOCK_SUFFIX) and _encodable(k))


def delete_entry(loc: Location, name: str) -> None:
    """Deletes file or directory ``name`` directly under ``loc``."""
    if loc.scheme == "memory":
        _kvstore(loc).delete_range(ts.KvStore.KeyRange(name, name + "\x00")).result()
    delete_tree(loc.join(name))
