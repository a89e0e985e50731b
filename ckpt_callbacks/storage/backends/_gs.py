"""``gs://BUCKET/path``: Google Cloud Storage, or an emulator at ``STORAGE_EMULATOR_HOST``.

>>> b"DELETE /storage/v1/b/bucket/o/run-1%2Fdata" in _gcs_body(["bucket/run-1/data"], "b")
True
"""

from __future__ import annotations

import functools
import os
import re
import urllib.parse
import uuid
from typing import Any, ClassVar

import fsspec

from ckpt_callbacks.storage._backend import Location, register_backend
from ckpt_callbacks.storage._options import StorageOptions
from ckpt_callbacks.storage.backends._objects import Failed, ObjectStore

GCS_BATCH = 100  # the GCS batch endpoint's limit
_STATUS = re.compile(rb"HTTP/[0-9.]+ ([0-9]{3})")
_PART_ID = re.compile(rb"content-id:\s*<response-item([0-9]+)>", re.IGNORECASE)


@functools.cache
def _one_attempt() -> Any:
    """gcsfs's filesystem class sending each request once: gcsfs retries 6 times, with waits of
    up to 32 s fixed when its class is defined, under ``storage.retrying`` (a listing with
    ``max_retries=1`` went out 6 times); here the library's loop is the only one."""
    cls = fsspec.get_filesystem_class("gs")
    return type("GCSOneAttempt", (cls,), {"_request": cls._request.__wrapped__})  # without @retry_request


def _gcs_body(names: list[str], boundary: str) -> bytes:
    """A GCS batch request of one DELETE per object (CRLF line ends, a blank line after each
    request's headers: what the batch endpoint parses, fake-gcs-server included)."""
    parts = []
    for i, name in enumerate(names):
        bucket, key = name.split("/", 1)
        path = f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(key, safe='')}"
        parts.append(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <item{i}>\r\n\r\n"
            f"DELETE {path} HTTP/1.1\r\n\r\n\r\n"
        )
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


def _gcs_statuses(content: bytes, count: int) -> dict[int, int]:
    """The status of each call in a batch response, by position in the request."""
    statuses = {}
    for position, part in enumerate(re.split(rb"\r?\n--[^\r\n]+", b"\r\n" + content)[1:]):
        status = _STATUS.search(part)
        ident = _PART_ID.search(part)
        if status:
            statuses[int(ident.group(1)) if ident else position] = int(status.group(1))
    return {i: s for i, s in statuses.items() if 0 <= i < count}


class GCSBackend(ObjectStore):
    scheme: ClassVar[str] = "gs"
    driver: ClassVar[str] = "gcs"
    resource_prefix: ClassVar[str] = "gcs"
    batch_size: ClassVar[int] = GCS_BATCH

    def fsspec_options(self, opts: StorageOptions) -> dict[str, Any]:
        return {"requests_timeout": opts.op_timeout_s}

    def fsspec_view(self, loc: Location, fresh_connections: bool) -> tuple[Any, str]:
        """Without listing caches (TensorStore writes behind their back), one attempt per request,
        each waited on at most ``op_timeout_s``."""
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
        emulator = {"endpoint_url": endpoint, "token": "anon"} if endpoint else {}
        options = self.fsspec_options(loc.options)
        return _one_attempt()(use_listings_cache=False, **emulator, **options), self.fs_path(loc)

    async def delete_batch(self, fs: Any, names: list[str]) -> Failed:
        """One batch request; the objects not deleted (calls answered 429 or 5xx may pass)."""
        boundary = f"batch_{uuid.uuid4().hex}"
        _, content = await fs._call(
            "POST",
            fs.batch_url_base,
            headers={"Content-Type": f"multipart/mixed; boundary={boundary}"},
            data=_gcs_body(names, boundary),
        )
        statuses = _gcs_statuses(bytes(content), len(names))
        failed = []
        for i, name in enumerate(names):
            status = statuses.get(i)
            if status not in (200, 204, 404):
                again = status is None or status == 429 or status >= 500
                failed.append((name, "no answer" if status is None else f"HTTP {status}", again))
        return failed


GCS = register_backend(GCSBackend())
