"""How hard to try object stores: retries with backoff, concurrency, and a bound on every wait.

>>> opts = StorageOptions(max_retries=4, initial_delay_s=0.1, max_delay_s=2.0)
>>> opts.op_timeout_s
300.0
>>> StorageOptions(max_retries=-1)
Traceback (most recent call last):
...
ValueError: StorageOptions.max_retries: expected an int in [0, 1000], found -1

One layer retries each request, never two on top of each other, so ``max_retries`` means
what it says:

- Arrays and JSON files go through TensorStore, whose S3 and GCS drivers retry a failed
  request (429, 5xx, resets, truncated bodies) ``max_retries`` times with exponential backoff;
  these options go inline in each kvstore spec (each object-store backend's
  ``tensorstore_resources``, so they apply wherever a ``Location`` carrying them is opened),
  not through environment variables. The library does not retry these.
- Listings, existence checks and deletes go through fsspec, whose clients' own retries are
  off (botocore ``total_max_attempts=1``, s3fs ``retries=1``, gcsfs's per-request retry bypassed:
  see ``backends/``); the library retries each call instead (``retrying``: the same backoff,
  logged), ``max_retries`` times.

TensorStore has no per-request timeout on object stores (a server that accepts a request and
then sends nothing is waited on forever), so the library bounds every wait itself:
``op_timeout_s`` per storage operation (one key's read or write with all its retries, one
fsspec call with all its retries, one batched delete). An operation that runs past it fails
with ``StorageTimeoutError`` naming the path; a save then commits nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ckpt_callbacks.errors import CheckpointStorageError, StorageTimeoutError

log = logging.getLogger("ckpt_callbacks")
T = TypeVar("T")

_RETRIES_FAILED = re.compile(r"All [0-9]+ retry attempts failed|http_response_code|CURL error")


# The bounds of each field: outside them no request can use the value (TensorStore takes
# backoffs in whole milliseconds; waits beyond threading.TIMEOUT_MAX overflow), or it is surely
# a typo (an hour between two attempts, a day for one operation).
MAX_RETRIES = 1000
MIN_SECONDS = 0.001
MAX_DELAY_S = 3600.0
MAX_OP_TIMEOUT_S = 86_400.0
MAX_CONCURRENCY = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageOptions:
    """Retries, concurrency and timeouts of requests to S3 and GCS (other backends ignore them
    except ``op_timeout_s``, which bounds every wait).

    Every field is checked here (``ValueError`` naming it, with the range and what was given).

    Attributes:
      max_retries: attempts after the first, per request: an int in [0, 1000]. Each request
        is sent at most ``max_retries + 1`` times, whichever layer sends it.
      initial_delay_s: backoff before the first retry, in [0.001, ``max_delay_s``] seconds;
        doubles up to ``max_delay_s``.
      max_delay_s: the longest backoff between two attempts, at most 3600 seconds.
      request_concurrency: TensorStore requests in flight at once per process, an int in
        [1, 4096] (None: TensorStore's 32).
      op_timeout_s: the longest wait on one storage operation, retries included, in
        [0.001, 86400] seconds; then the save (or read) fails with ``StorageTimeoutError``.
    """

    max_retries: int = 8
    initial_delay_s: float = 1.0
    max_delay_s: float = 32.0
    request_concurrency: int | None = None
    op_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check_int("max_retries", self.max_retries, 0, MAX_RETRIES)
        _check_seconds("initial_delay_s", self.initial_delay_s, MIN_SECONDS, MAX_DELAY_S)
        _check_seconds("max_delay_s", self.max_delay_s, MIN_SECONDS, MAX_DELAY_S)
        if self.initial_delay_s > self.max_delay_s:
            raise ValueError(
                f"StorageOptions.initial_delay_s: expected at most max_delay_s={self.max_delay_s!r}, "
                f"found {self.initial_delay_s!r}"
            )
        if self.request_concurrency is not None:
            _check_int("request_concurrency", self.request_concurrency, 1, MAX_CONCURRENCY, "or None")
        _check_seconds("op_timeout_s", self.op_timeout_s, MIN_SECONDS, MAX_OP_TIMEOUT_S)


def _check_int(name: str, value: Any, lo: int, hi: int, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        also = f" {alternative}" if alternative else ""
        raise ValueError(f"StorageOptions.{name}: expected an int in [{lo}, {hi}]{also}, found {value!r}")


def _check_seconds(name: str, value: Any, lo: float, hi: float) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and lo <= value <= hi and math.isfinite(value)):  # NaN compares false
        raise ValueError(f"StorageOptions.{name}: expected a number of seconds in [{lo:g}, {hi:g}], found {value!r}")


DEFAULT = StorageOptions()


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
# Transport failures that are no OSError: botocore's (connection closed, endpoint unreachable)
# and aiohttp's (server disconnected, payload cut); gcsfs answers 429 and 5xx with HttpError.
_TRANSIENT_NAMES = {"HttpError", "ClientError", "HTTPClientError", "ConnectionError", "ClientPayloadError"}


def transient(error: BaseException) -> bool:
    """Whether an fsspec error may go away on retry (s3fs raises ``OSError``s, gcsfs ``HttpError``s)."""
    if isinstance(error, _PERMANENT) or str(error).startswith("Forbidden"):  # gcsfs: a 403 as a bare OSError
        return False
    return isinstance(error, OSError) or any(c.__name__ in _TRANSIENT_NAMES for c in type(error).__mro__)


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
