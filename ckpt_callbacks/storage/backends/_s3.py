"""``s3://BUCKET/path``: Amazon S3 or a store speaking its protocol (endpoint from the
environment: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION``).

>>> from ckpt_callbacks.storage import _location as paths
>>> S3.kvstore_spec(paths.parse("s3://bucket/runs"), {"AWS_REGION": "eu-west-1"})["aws_region"]
'eu-west-1'
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import fsspec

from ckpt_callbacks.storage._backend import Location, register_backend
from ckpt_callbacks.storage._options import StorageOptions
from ckpt_callbacks.storage.backends._objects import Failed, ObjectStore

S3_BATCH = 1000  # DeleteObjects' limit
_S3_TRANSIENT = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout")


@functools.cache
def _one_attempt() -> Any:
    """s3fs's filesystem class sending each request once (it tries 5 times on its own, under
    ``storage.retrying``: here the library's loop is the only one)."""
    return type("S3OneAttempt", (fsspec.get_filesystem_class("s3"),), {"retries": 1})


class S3Backend(ObjectStore):
    scheme: ClassVar[str] = "s3"
    driver: ClassVar[str] = "s3"
    resource_prefix: ClassVar[str] = "s3"
    batch_size: ClassVar[int] = S3_BATCH

    def kvstore_spec(self, loc: Location, env: Mapping[str, str]) -> dict[str, Any]:
        spec = super().kvstore_spec(loc, env)
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        if env.get("AWS_ACCESS_KEY_ID"):
            spec["aws_credentials"] = {"type": "environment"}
        return spec

    def fsspec_options(self, opts: StorageOptions) -> dict[str, Any]:
        retries = {"total_max_attempts": 1, "mode": "standard"}  # botocore's max_attempts counts retries only
        timeouts = {"connect_timeout": opts.op_timeout_s, "read_timeout": opts.op_timeout_s}
        return {"config_kwargs": {"retries": retries, **timeouts}}

    def fsspec_view(self, loc: Location, fresh_connections: bool) -> tuple[Any, str]:
        """Without listing caches (TensorStore writes behind their back), one attempt per request,
        each waited on at most ``op_timeout_s``; ``fresh_connections``: see ``storage.fsspec_view``."""
        spec = self.kvstore_spec(loc, os.environ)
        client_kwargs = {
            k: v for k, v in (("endpoint_url", spec.get("endpoint")), ("region_name", spec.get("aws_region"))) if v
        }
        options = self.fsspec_options(loc.options)
        if fresh_connections:
            options["config_kwargs"]["connector_args"] = {"force_close": True, "keepalive_timeout": None}
        fs = _one_attempt()(client_kwargs=client_kwargs, use_listings_cache=False, **options)
        return fs, self.fs_path(loc)

    async def delete_batch(self, fs: Any, names: list[str]) -> Failed:
        """One ``DeleteObjects`` request; the keys it reports as not deleted, with S3's reason."""
        bucket = names[0].split("/", 1)[0]
        objects = [{"Key": n.split("/", 1)[1]} for n in names]
        out = await fs._call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        return [
            (f"{bucket}/{e.get('Key')}", f"{e.get('Code')}: {e.get('Message')}", e.get("Code") in _S3_TRANSIENT)
            for e in out.get("Errors", [])
            if e.get("Code") != "NoSuchKey"
        ]


S3 = register_backend(S3Backend())
