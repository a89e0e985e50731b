"""What S3 and GCS share: ``scheme://BUCKET/path`` URLs, kvstore specs with the request
retries of ``StorageOptions`` inline, fsspec calls retried by the library, batched deletes.

>>> from ckpt_callbacks.storage import _location as paths
>>> from ckpt_callbacks.storage._options import StorageOptions
>>> loc = paths.parse("gs://bucket/runs", StorageOptions(max_retries=2, request_concurrency=8))
>>> spec = loc.backend.kvstore_spec(loc, {})
>>> spec["driver"], spec["path"], spec["gcs_request_concurrency"]
('gcs', 'runs/', {'limit': 8})

A delete of many objects is one operation of ``loc.options``: the keys are sent in batches
(``batch_size`` a request, ``_CONCURRENT`` requests in flight), and each attempt sends only the
objects not deleted yet. Where a store answers per object, ``delete_batch`` reports the objects
not deleted, why, and whether that may pass on another attempt.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fsspec.asyn import sync

from ckpt_callbacks.errors import CheckpointPathError, CheckpointStorageError
from ckpt_callbacks.storage import _options as storage
from ckpt_callbacks.storage._backend import Location
from ckpt_callbacks.storage._location import path_parts
from ckpt_callbacks.storage._options import StorageOptions
from ckpt_callbacks.storage.backends._base import FsspecBackend

_CONCURRENT = 4  # batch requests in flight at once

Failed = list[tuple[str, str, bool]]  # (bucket/key, why, whether another attempt may pass)


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


class _NotYetDeleted(OSError):
    """Objects of a batch answered 429 or 5xx: a transient failure, the next attempt sends them."""


class ObjectStore(FsspecBackend):
    """A bucket store. Subclasses set ``scheme``, ``driver`` (TensorStore's), ``resource_prefix``
    (of its context resources), ``batch_size``, and define ``fsspec_view``, ``fsspec_options``
    and ``delete_batch``."""

    is_object_store: ClassVar[bool] = True
    driver: ClassVar[str]
    resource_prefix: ClassVar[str]
    batch_size: ClassVar[int]

    def parse(self, rest: str, text: str) -> Location:
        parts = path_parts(rest, text)
        if not parts or not rest.partition("/")[0]:
            raise CheckpointPathError(f"{text!r} names no bucket (expected {self.scheme}://BUCKET/path)")
        return Location(scheme=self.scheme, bucket=parts[0], path="/".join(parts[1:]))

    def check(self, loc: Location) -> None:
        if len(loc.bucket) < 3:
            raise CheckpointPathError(f"{self.scheme}:// URL needs a bucket of 3+ characters, got {loc.bucket!r}")

    def url(self, loc: Location) -> str:
        return f"{self.scheme}://{loc.bucket}" + ("/" + loc.path if loc.path else "")

    def fs_path(self, loc: Location) -> str:
        """``loc``'s path in the fsspec filesystem: ``bucket/path``."""
        return f"{loc.bucket}/{loc.path}".rstrip("/")

    def kvstore_spec(self, loc: Location, env: Mapping[str, str]) -> dict[str, Any]:
        spec: dict[str, Any] = {"driver": self.driver, "bucket": loc.bucket, "path": loc.path + "/" if loc.path else ""}
        spec.update(self.tensorstore_resources(loc.options))
        return spec

    def tensorstore_resources(self, opts: StorageOptions) -> dict[str, Any]:
        prefix = self.resource_prefix
        out: dict[str, Any] = {
            f"{prefix}_request_retries": {
                "max_retries": opts.max_retries,
                "initial_delay": _ms(opts.initial_delay_s),
                "max_delay": _ms(opts.max_delay_s),
            }
        }
        if opts.request_concurrency is not None:
            out[f"{prefix}_request_concurrency"] = {"limit": opts.request_concurrency}
        return out

    def call(self, loc: Location, fs: Any, method: str, path: str, **kwargs: Any) -> Any:
        """The call retried with backoff and bounded by ``op_timeout_s`` (``storage.retrying``)."""
        call = getattr(fs, method)
        return storage.retrying(lambda left: call(path, **kwargs, timeout=left), loc.options, loc.url, method)

    async def delete_batch(self, fs: Any, names: list[str]) -> Failed:
        """One batched delete request of objects ``names`` (``bucket/key``); the objects not deleted."""
        raise NotImplementedError

    def delete_keys(self, loc: Location, keys: Sequence[str]) -> None:
        if not keys:
            return
        fs, root = self._view(loc)
        size = self.batch_size
        pending = [f"{root}/{k}" for k in keys]
        refused: list[tuple[str, str]] = []

        def attempt(left: float) -> None:
            nonlocal pending
            batches = [pending[i : i + size] for i in range(0, len(pending), size)]
            failed = sync(fs.loop, self._all, fs, batches, timeout=left)
            refused.extend((path, why) for path, why, again in failed if not again)
            pending = [path for path, _, again in failed if again]
            if pending:
                why = next(why for _, why, again in failed if again)
                raise _NotYetDeleted(errno.EAGAIN, f"{len(pending)} objects not deleted yet ({why})")

        storage.retrying(attempt, loc.options, loc.url, "delete")
        if refused:
            path, why = refused[0]
            raise CheckpointStorageError(
                errno.EIO, f"could not delete {len(refused)} of {len(keys)} objects under {loc.url} ({why})", path
            )

    async def _all(self, fs: Any, batches: list[list[str]]) -> Failed:
        """Each batch once: the objects not deleted, why, and whether that may pass (a transient
        failure of a whole batch fails its objects; a permanent one is raised)."""
        limit = asyncio.Semaphore(_CONCURRENT)

        async def one(batch: list[str]) -> Failed:
            async with limit:
                return await self.delete_batch(fs, batch)

        results = await asyncio.gather(*(one(b) for b in batches), return_exceptions=True)
        out = []
        for batch, result in zip(batches, results, strict=True):
            if not isinstance(result, BaseException):
                out.extend(result)
            elif storage.transient(result):
                out.extend((path, f"{type(result).__name__}: {result}", True) for path in batch)
            else:
                raise result
        return out
