"""Writing a commit marker: a compare-and-swap, one attempt at a time, never retried late.

>>> from ckpt_callbacks.storage import _location as paths
>>> from ckpt_callbacks.storage import _options as storage
>>> loc = paths.parse("memory://doc/marker/run-1")
>>> swap(loc, "COMMITTED", lambda current: b"first") is None
True
>>> swap(loc, "COMMITTED", lambda current: current + b", second")
b'first'
>>> paths.read_bytes(loc, "COMMITTED")
b'first, second'

The marker is the commit point, so what a failure report means hangs on this write:

- **Built on what it replaces.** Each attempt is built from the marker read just before it
  (an item added meanwhile is kept) and written only if the marker is still that one: on local
  disk and ``memory://`` by a conditional write (``if_equal`` on the generation read, checked
  under TensorStore's lock); on S3 and GCS by that read, with the commits of one process to
  one path taking turns. Two processes committing to one object-store path in the same
  instant are ordered by the store, as any two writes of one object are.
- **One attempt at a time, never retried once the save has given up.** On S3 and GCS the
  marker is written by fsspec with its client's own retries off (see ``_write_once`` for why
  not TensorStore); the library retries failed attempts with the backoff of
  ``StorageOptions``, all within ``op_timeout_s``. When the deadline passes with an attempt
  unanswered, the save fails with ``StorageTimeoutError`` and nothing sends that marker again:
  it can only appear if the store applies a request it never answered (a request the store
  never received, as when a connection is dropped, never lands).
- **An attempt that landed without an answer is recognised.** Before each attempt the marker
  is read; if it holds the bytes of an earlier attempt of this save, the save is committed.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

import tensorstore as ts

from ckpt_callbacks.errors import CheckpointStorageError, StorageTimeoutError
from ckpt_callbacks.storage import _location as paths
from ckpt_callbacks.storage import _options as storage


def _kvstore(loc: paths.Location) -> ts.KvStore:
    return ts.KvStore.open(paths.kvstore_spec(loc), context=paths.context()).result()


def _timeout(loc: paths.Location, name: str, what: str) -> StorageTimeoutError:
    where = loc.join(name).url
    message = (
        f"{what} of {where} did not finish within op_timeout_s={loc.options.op_timeout_s:g}s; "
        "it is not sent again, and it cannot replace a later commit"
    )
    return StorageTimeoutError(errno.ETIMEDOUT, message, where)


def _result(future: ts.Future, loc: paths.Location, name: str, deadline: float, what: str) -> object:
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        return future.result(timeout=left)
    except TimeoutError as e:
        future.cancel()
        raise _timeout(loc, name, what) from e
    except ValueError as e:
        raise paths.as_storage_error(e, loc.join(name).url) from e


def _landed(loc: paths.Location, name: str, ours: dict[bytes, bytes | None]) -> bytes | None:
    """After an object-store attempt timed out: the attempt of ours the file now holds, if any
    (read once more, within ``op_timeout_s``; an unanswered read counts as none)."""
    try:
        current, _ = read_stamped(loc, name, time.monotonic() + loc.options.op_timeout_s)
    except CheckpointStorageError:
        return None
    return current if current is not None and current in ours else None


def read_stamped(loc: paths.Location, name: str, deadline: float) -> tuple[bytes | None, bytes]:
    """File ``name`` under ``loc`` (None if absent) and its storage generation."""
    paths.refuse_special(loc, name)
    result: ts.KvStore.ReadResult = _result(_kvstore(loc).read(name), loc, name, deadline, "read")  # type: ignore[assignment]
    return (bytes(result.value) if result.state == "value" else None), bytes(result.stamp.generation)


def _write_once(
    once: ts.KvStore | None, loc: paths.Location, name: str, data: bytes, *, generation: bytes, deadline: float
) -> bool:
    """One attempt; False if the condition failed (the file changed since it was read).

    On S3 and GCS the attempt goes through fsspec with its client's retries off, cut off at
    the deadline: TensorStore's curl transport sends a request again on a fresh connection
    when a reused one drops it, and retries conditional writes once whatever ``max_retries``
    says, either of which could land after the save gave up. There the condition is the read
    just made, with the commits of one process to one path taking turns.
    """
    if deadline - time.monotonic() <= 0:  # checked before anything is sent
        raise _timeout(loc, name, "write")
    if once is not None:
        return _local_write(once, loc, name, data, generation=generation, deadline=deadline)
    fs, root = paths.fsspec_view(loc, fresh_connections=True)
    where = loc.join(name).url
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        fs.pipe_file(f"{root}/{name}", data, timeout=left)
    except TimeoutError as e:
        raise _timeout(loc, name, "write") from e
    except Exception as e:
        if not storage.transient(e):
            raise
        raise CheckpointStorageError(errno.EIO, f"write of {where} failed: {type(e).__name__}: {e}", where) from e
    return True


def _local_write(
    once: ts.KvStore, loc: paths.Location, name: str, data: bytes, *, generation: bytes, deadline: float
) -> bool:
    """A conditional write on local disk or ``memory://``. Such a write cannot be called back
    once issued, so past the deadline it is waited on (at most ``op_timeout_s`` more) and its
    outcome reported: a save never reports a failure its marker then undoes."""
    future = once.write(name, data, if_equal=generation)
    try:
        stamp = _result(future, loc, name, deadline, "write")
    except StorageTimeoutError as late:
        try:
            stamp = _result(future, loc, name, time.monotonic() + loc.options.op_timeout_s, "write")
        except StorageTimeoutError:
            message = f"{late}; the write is still in flight after twice that, and may yet land"
            raise StorageTimeoutError(errno.ETIMEDOUT, message, loc.join(name).url) from late
    return bool(stamp.generation)  # type: ignore[attr-defined]


def _transient(error: BaseException) -> bool:
    """A request that failed at the HTTP level (status, reset, truncated) may succeed again."""
    return isinstance(error, CheckpointStorageError) and error.errno == errno.EIO


def swap(loc: paths.Location, name: str, build: Callable[[bytes | None], bytes]) -> bytes | None:
    """Replaces file ``name`` under ``loc`` by ``build(current)``, conditionally (see the module
    doc); returns the content it replaced (None: there was none).

    Raises ``StorageTimeoutError`` past ``op_timeout_s``, ``CheckpointStorageError`` once the
    retries are spent, and whatever ``build`` raises.
    """
    opts = loc.options
    deadline = time.monotonic() + opts.op_timeout_s
    once = None if loc.backend.is_object_store else _kvstore(loc)
    replaced_by: dict[bytes, bytes | None] = {}  # what each attempt of ours was built on
    delay, failures = opts.initial_delay_s, 0
    while True:
        current, generation = read_stamped(loc, name, deadline)
        if current is not None and current in replaced_by:  # an attempt landed, its answer lost
            return replaced_by[current]
        data = build(current)
        replaced_by[data] = current
        try:
            landed = _write_once(once, loc, name, data, generation=generation, deadline=deadline)
        except StorageTimeoutError:
            found = _landed(loc, name, replaced_by) if once is None else None
            if found is not None:  # applied, its answer lost
                return replaced_by[found]
            raise
        except CheckpointStorageError as e:
            if not _transient(e):
                raise
            failures += 1
            if failures > opts.max_retries or time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, opts.max_delay_s)
            continue
        if landed:
            return current
        # The condition failed: the file changed since it was read. Read it again and rebuild.
