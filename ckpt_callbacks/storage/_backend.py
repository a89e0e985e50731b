"""A ``Location``, the ``Backend`` of its URL scheme, and the registry that finds it.

>>> backend_for("memory").scheme
'memory'
>>> backend_for("ftp")
Traceback (most recent call last):
...
ckpt_callbacks.errors.CheckpointPathError: unsupported scheme 'ftp'; expected one of ('file', 'memory', 's3', 'gs')
>>> opts = StorageOptions(max_retries=4, initial_delay_s=0.1, max_delay_s=2.0)
>>> tensorstore_resources("s3", opts)["s3_request_retries"]
{'max_retries': 4, 'initial_delay': '100ms', 'max_delay': '2000ms'}
>>> tensorstore_resources("file", opts)
{}

A backend is a module of ``backends/`` ending in one ``register_backend(...)`` call; importing
``ckpt_callbacks.storage`` imports them all (see README.md here for a worked example). A
location and its backend live in one module: each names the other.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from ckpt_callbacks.errors import CheckpointPathError
from ckpt_callbacks.storage._options import DEFAULT as DEFAULT_STORAGE
from ckpt_callbacks.storage._options import StorageOptions


class Backend(Protocol):
    """How one URL scheme is stored: its URLs, its TensorStore spec, its listings and deletes.

    Every ``Location`` holds a registered scheme (``Location.backend`` is its backend), so a
    method is only ever given locations of its own scheme. The calls, in the order a user of a
    location meets them:

    1) ``parse(rest, text)`` when a URL ``<scheme>://<rest>`` is parsed (``text``: the whole
       URL, for messages); then ``check(loc)`` on every ``Location`` built, ``join`` included.
    2) ``url(loc)``: the location as a URL ``parse`` takes back.
    3) ``kvstore_spec(loc, env)``: where TensorStore reads and writes every array and small
       file (``tensorstore_resources(opts)`` goes inline in it).
    4) ``fsspec_view(loc, fresh_connections)``, and over it the listings (``list_dirs``,
       ``list_entries``, ``list_keys_under``, ``has_any``) and deletes (``delete_tree``,
       ``delete_entry``, ``delete_keys``); ``fsspec_options(opts)`` configures the view.
    5) ``local_path(loc)``: a POSIX path for plain-file reads and existence checks.

    ``is_object_store``: requests go over the network to a bucket: each fsspec call is retried
    by the library (``retrying``), a commit marker is written by fsspec one attempt at a time
    (``swap``), and deletes of a directory list it once and go out batched (``delete_keys``).
    """

    scheme: ClassVar[str]
    is_object_store: ClassVar[bool]

    def parse(self, rest: str, text: str) -> Location:
        """The location of URL ``text`` (``rest``: what follows ``://``); raises
        ``CheckpointPathError`` saying what is wrong with it."""
        ...

    def check(self, loc: Location) -> None:
        """Raises ``CheckpointPathError`` if ``loc`` is no valid location here (a short bucket)."""
        ...

    def url(self, loc: Location) -> str:
        """``loc`` as a URL (pure)."""
        ...

    def kvstore_spec(self, loc: Location, env: Mapping[str, str]) -> dict[str, Any]:
        """The TensorStore kvstore spec of directory ``loc`` (pure: endpoints and credentials
        from ``env``, the request retries of ``loc.options`` inline)."""
        ...

    def tensorstore_resources(self, opts: StorageOptions) -> dict[str, Any]:
        """The TensorStore context resources of ``opts`` put inline in a spec (pure; {}: none)."""
        ...

    def fsspec_options(self, opts: StorageOptions) -> dict[str, Any]:
        """Keyword arguments of the fsspec filesystem for ``opts`` (pure; {}: none)."""
        ...

    def fsspec_view(self, loc: Location, fresh_connections: bool) -> tuple[Any, str] | None:
        """The fsspec filesystem of ``loc`` and ``loc``'s path in it; None if the store is only
        reached through TensorStore (``memory://``). ``fresh_connections``: no request reuses a
        connection (see ``swap``)."""
        ...

    def local_path(self, loc: Location) -> str | None:
        """``loc`` as a POSIX path of this machine, or None if it is none."""
        ...

    def list_dirs(self, loc: Location) -> list[str]:
        """Sorted names of the immediate subdirectories of ``loc`` ([] if it does not exist);
        raises ``CheckpointStorageError`` once the retries of ``loc.options`` are spent."""
        ...

    def list_entries(self, loc: Location) -> list[str]:
        """Sorted names of the files and directories directly under ``loc``, TensorStore's lock
        files left out; raises as ``list_dirs``."""
        ...

    def list_keys_under(self, loc: Location) -> list[str]:
        """Sorted paths relative to ``loc`` of every file under it, lock files left out; raises
        as ``list_dirs``."""
        ...

    def has_any(self, loc: Location) -> bool:
        """Whether anything is stored under ``loc``; raises as ``list_dirs``."""
        ...

    def delete_tree(self, loc: Location) -> None:
        """Deletes everything under ``loc`` (a missing directory is no error); raises as ``list_dirs``."""
        ...

    def delete_entry(self, loc: Location, name: str) -> None:
        """Deletes file or directory ``name`` directly under ``loc``; raises as ``list_dirs``."""
        ...

    def delete_keys(self, loc: Location, keys: Sequence[str]) -> None:
        """Deletes files ``keys`` (paths relative to ``loc``), batched where the store can, as
        one operation of ``loc.options``; a key already gone is no error. Raises
        ``CheckpointStorageError`` naming the first key left and the count,
        ``StorageTimeoutError`` past ``op_timeout_s``."""
        ...


_BACKENDS: dict[str, Backend] = {}


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
        self.backend.check(self)

    @property
    def backend(self) -> Backend:
        """The backend of ``scheme`` (``CheckpointPathError`` if none is registered)."""
        return backend_for(self.scheme)

    @property
    def url(self) -> str:
        return self.backend.url(self)

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


def register_backend(backend: Backend) -> Backend:
    """Makes ``backend`` the one of its scheme (in URLs and ``Location.scheme``); returns it.

    Raises ``ValueError`` for a scheme that is not a URL scheme (RFC 3986: a letter, then
    letters, digits, ``+``, ``-`` or ``.``) or that another backend has already.
    """
    scheme = getattr(backend, "scheme", None)
    if not isinstance(scheme, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError(f"a storage backend's scheme must be a URL scheme like 's3', got {scheme!r}")
    other = _BACKENDS.setdefault(backend.scheme, backend)
    if other is not backend:
        raise ValueError(f"a storage backend for scheme {backend.scheme!r} is registered already: {other!r}")
    return backend


def schemes() -> tuple[str, ...]:
    """The registered schemes, in the order they were registered."""
    return tuple(_BACKENDS)


def backend_for(scheme: str) -> Backend:
    """The backend of ``scheme``; ``CheckpointPathError`` naming it and the registered ones if none."""
    try:
        return _BACKENDS[scheme]
    except KeyError:
        raise CheckpointPathError(f"unsupported scheme {scheme!r}; expected one of {schemes()}") from None


def tensorstore_resources(scheme: str, opts: StorageOptions) -> dict[str, Any]:
    """The context resources to put inline in a kvstore spec of ``scheme`` (pure)."""
    return backend_for(scheme).tensorstore_resources(opts)


def fsspec_options(scheme: str, opts: StorageOptions) -> dict[str, Any]:
    """Keyword arguments for the fsspec filesystem of ``scheme`` (pure): one attempt per request
    (``retrying`` retries), each waited on at most ``op_timeout_s``.

    >>> fsspec_options("s3", StorageOptions(max_retries=2, max_delay_s=4.0, op_timeout_s=9.0))["config_kwargs"]
    {'retries': {'total_max_attempts': 1, 'mode': 'standard'}, 'connect_timeout': 9.0, 'read_timeout': 9.0}
    """
    return backend_for(scheme).fsspec_options(opts)
