"""How hard to try object stores: retries with backoff, concurrency, and a bound on every wait.

>>> opts = StorageOptions(max_retries=4, initial_delay_s=0.1, max_delay_s=2.0)
>>> tensorstore_resources("s3", opts)["s3_request_retries"]
{'max_retries': 4, 'initial_delay': '100ms', 'max_delay': '2000ms'}
>>> tensorstore_resources("file", opts)
{}

TensorStore's S3 and GCS drivers retry failed requests (429, 5xx, resets, truncated bodies)
with exponential backoff; these options set how often and how long, inline in each kvstore
spec (so they apply wherever a ``Location`` carrying them is opened), rather than through
environment variables. TensorStore has no per-request timeout on object stores (a server
that accepts a request and then sends nothing is waited on forever), so the library bounds
every wait itself: ``op_timeout_s`` per storage operation (one key's read or write with all
its retries, one listing, one delete). A save whose operation runs past it fails with
``StorageTimeoutError`` naming the path; nothing is committed.

Listing and deletes go through fsspec. Its clients retry some failures themselves (s3fs gets
botocore's "standard" mode with ``max_retries + 1`` attempts, which skips a 429 to a HEAD;
gcsfs retries 429 and 5xx six times, not configurable per instance), so each call is also
retried here (``retrying``: the same backoff, logged) and cut off at ``op_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ckpt_callbacks.errors import CheckpointStorageError, StorageTimeoutError

log = logging.getLogger("ckpt_callbacks")
T = TypeVar("T")

_RETRIES_FAILED = re.compile(r"All [0-9]+ retry attempts failed|http_response_code|CURL error")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageOptions:
    """Retries, concurrency and timeouts of requests to S3 and GCS (other backends ignore them
    except ``op_timeout_s``, which bounds every wait).

    Attributes:
      max_retries: attempts after the first, per request (TensorStore's default is 32).
      initial_delay_s: backoff before the first retry; doubles up to ``max_delay_s``.
      max_delay_s: the longest backoff between two attempts.
      request_concurrency: requests in flight at once per process (None: TensorStore's 32).
      op_timeout_s: the longest wait on one storage operation, retries included; then the save
        (or read) fails with ``StorageTimeoutError``.
    """

    max_retries: int = 8
    initial_delay_s: float = 1.0
    max_delay_s: float = 32.0
    request_concurrency: int | None = None
    op_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if not 0 < self.initial_delay_s <= self.max_delay_s:
            raise ValueError(
                f"backoff delays must satisfy 0 < initial_delay_s <= max_delay_s, got "
                f"{self.initial_delay_s!r} and {self.max_delay_s!r}"
            )
        concurrency = self.request_concurrency
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)):
            raise ValueError(f"request_concurrency must be a positive int or None, got {concurrency!r}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"request_concurrency must be a positive int or None, got {concurrency!r}")
        if not self.op_timeout_s > 0:
            raise ValueError(f"op_timeout_s must be a positive number of seconds, got {self.op_timeout_s!r}")


DEFAULT = StorageOptions()


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def tensorstore_resources(scheme: str, opts: StorageOptions) -> dict[str, Any]:
    """The context resources to put inline in a kvstore spec of ``scheme`` (pure)."""
    if scheme not in ("s3", "gs"):
        return {}
    prefix = "s3" if scheme == "s3" else "gcs"
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


def fsspec_options(scheme: str, opts: StorageOptions) -> dict[str, Any]:
    """Keyword arguments for the fsspec filesystem of ``scheme`` (pure).

    >>> fsspec_options("s3", StorageOptions(max_retries=2, op_timeout_s=9.0))["config_kwargs"]
    {'retries': {'max_attempts': 3, 'mode': 'standard'}, 'connect_timeout': 9.0, 'read_timeout': 9.0}
    """
    if scheme == "s3":
        retries = {"max_attempts": opts.max_retries + 1, "mode": "standard"}
        timeouts = {"connect_timeout": opts.op_timeout_s, "read_timeout": opts.op_timeout_s}
        return {"config_kwargs": {"retries": retries, **timeouts}}
    if scheme == "gs":
        return {"requests_timeout": opts.op_timeout_s}
    return {}


def wait(future: Any, opts: StorageOptions, where: str, what: str = "storage operation") -> Any:
    """``future.result()`` within ``opts.op_timeout_s``; a timeout or a request that failed
    after its retries raises a ``CheckpointStorageError`` naming ``where``."""
    try:
        return future.result(timeout=opts.op_timeout_s)
    except TimeoutError as e:
        future.cancel()
        raise StorageTimeoutError(
            errno.ETIMEDOUT,
            f"{what} on {where} did not finish within op_timeout_s={opts.op_timeout_s:g}s "
            "(the store accepted the request and answered nothing, or kept failing)",
            where,
        ) from e
    except ValueError as e:
        raise request_failed(e, where, what) from e


_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError, TimeoutError)


def transient(error: BaseException) -> bool:
    """Whether an fsspec error may go away on retry (s3fs raises ``OSError``s, gcsfs ``HttpError``s)."""
    if isinstance(error, _PERMANENT):
        return False
    return isinstance(error, OSError) or type(error).__name__ in ("HttpError", "ClientError", "ClientPayloadError")


def retrying(call: Callable[[float], T], opts: StorageOptions, where: str, what: str) -> T:
    """``call(seconds_left)`` until it succeeds: transient failures retried with backoff (logged),
    at most ``max_retries`` times, all within ``op_timeout_s``; then a ``CheckpointStorageError``
    (``StorageTimeoutError`` when time ran out) naming ``where``."""
    deadline = time.monotonic() + opts.op_timeout_s
    delay = opts.initial_delay_s
    for attempt in itertools.count():
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} of {where}: no time left")
            return call(left)
        except TimeoutError as e:  # also fsspec's FSTimeoutError
            message = f"{what} of {where} did not finish within op_timeout_s={opts.op_timeout_s:g}s"
            raise StorageTimeoutError(errno.ETIMEDOUT, message, where) from e
        except Exception as e:
            if not transient(e):
                raise
            if attempt >= opts.max_retries or time.monotonic() + delay >= deadline:
                message = f"{what} of {where} failed after {attempt} retries: {type(e).__name__}: {e}"
                raise CheckpointStorageError(errno.EIO, message, where) from e
            log.info(
                "%s of %s failed (%s: %s); retry %d of %d in %.2gs",
                what,
                where,
                type(e).__name__,
                e,
                attempt + 1,
                opts.max_retries,
                delay,
            )
            time.sleep(delay)
            delay = min(2 * delay, opts.max_delay_s)
    raise AssertionError("unreachable")


def request_failed(error: BaseException, where: str, what: str = "storage operation") -> BaseException:
    """A TensorStore error of a request that failed after its retries (HTTP status, connection)
    as a ``CheckpointStorageError`` naming ``where``; other errors unchanged."""
    if isinstance(error, CheckpointStorageError) or not _RETRIES_FAILED.search(str(error)):
        return error
    converted = CheckpointStorageError(errno.EIO, f"{what} on {where} failed: {error}", where)
    converted.__cause__ = error
    return converted
