"""Deleting checkpoints: the marker first, a record of what is owed, batched on object stores.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/deletes/run-1", {"w": jnp.ones(2)}, step=1)
>>> loc = paths.parse("memory://doc/deletes/run-1")
>>> delete_checkpoint(loc)
>>> paths.has_any(loc)
False

A delete writes ``.deleting`` (the entries the checkpoint's marker names), deletes the marker
(from then on the directory is no checkpoint: nothing lists or restores it), then the entries,
then ``.deleting``. A process killed part-way leaves a directory no reader takes for a
checkpoint, and ``finish_delete`` (retention calls it) deletes the rest, touching only what
the record names. On S3 and GCS the directory is listed once and its objects are deleted in
batched calls: S3's ``DeleteObjects`` takes 1,000 keys a request, GCS's batch endpoint 100
calls (fsspec's recursive ``rm`` would also delete a user's file, and gcsfs sends one request
per object to an emulator). A key already gone is no error (a retried delete).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fsspec.asyn import sync

from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import _open as layout
from ckpt_callbacks.errors import CheckpointFormatError, CheckpointStorageError

S3_BATCH = 1000  # DeleteObjects' limit
GCS_BATCH = 100  # the GCS batch endpoint's limit
_CONCURRENT = 4  # batch requests in flight at once
_STATUS = re.compile(rb"HTTP/[0-9.]+ ([0-9]{3})")
_PART_ID = re.compile(rb"content-id:\s*<response-item([0-9]+)>", re.IGNORECASE)


log = logging.getLogger("ckpt_callbacks")


def delete_checkpoint(loc: paths.Location, commit: fmt.Commit | None = None) -> None:
    """Deletes a checkpoint: the marker first (a half-deleted checkpoint is no checkpoint),
    then our own entries; the directory goes only if nothing else is left in it.

    ``commit``: its marker as read before (a retried delete finds no marker any more, and
    then uses the ``.deleting`` record a first try left).
    """
    commit = commit or layout.read_commit_quietly(loc)
    if commit is not None:
        named = {commit.metadata, *commit.items.values()}
        paths.write_bytes(loc, layout.DELETING, fmt.dumps(sorted(named)))
    else:
        named = owed(loc) or set()
    _delete_names(loc, [layout.COMMIT_MARKER])
    items = set(commit.items) if commit else set()
    _delete_entries(loc, lambda name: name in named or layout.is_ours(name, items))


def owed(loc: paths.Location) -> set[str] | None:
    """The entries a delete that stopped part-way still owes at ``loc`` (None: no record).

    Only names a save could have written are taken from the record.
    """
    raw = paths.read_bytes(loc, layout.DELETING)
    if raw is None:
        return None
    try:
        names = fmt.loads(raw, loc.join(layout.DELETING).url)
    except CheckpointFormatError as e:
        log.warning("%s", e)
        names = []
    listed = names if isinstance(names, list) else []
    return {n for n in listed if isinstance(n, str) and n != layout.COMMIT_MARKER and layout.is_entry_name(n)}


def finish_delete(loc: paths.Location) -> bool:
    """Completes a delete that stopped part-way at ``loc`` (a ``.deleting`` record, no marker);
    returns whether there was one.

    Deletes only the entries the record names, then the record: a save into the same
    directory in the meantime has written a claim and suffixed names (it saw the record),
    and the save removes whatever is left at its commit.
    """
    if paths.read_bytes(loc, layout.COMMIT_MARKER) is not None:
        return False
    names = owed(loc)
    if names is None:
        return False
    _delete_entries(loc, names.__contains__)
    return True


def _delete_entries(loc: paths.Location, doomed: Callable[[str], bool]) -> None:
    """Deletes the entries ``doomed`` picks, then ``.deleting``; the directory only if empty."""
    if _object_store(loc):
        keys = list_keys(loc)
        first = [(k, k.split("/", 1)[0]) for k in keys]
        delete_keys(loc, [k for k, name in first if name != layout.DELETING and doomed(name)])
        delete_keys(loc, [layout.DELETING])  # last: until it goes, a later pass can finish
        return
    for name in paths.list_entries(loc):
        if name != layout.DELETING and doomed(name):
            paths.delete_entry(loc, name)
    paths.delete_entry(loc, layout.DELETING)
    if not paths.list_entries(loc):
        paths.delete_tree(loc)


def _delete_names(loc: paths.Location, names: list[str]) -> None:
    if _object_store(loc):
        delete_keys(loc, names)
    else:
        for name in names:
            paths.delete_entry(loc, name)


def _object_store(loc: paths.Location) -> bool:
    return loc.scheme in ("s3", "gs")


def list_keys(loc: paths.Location) -> list[str]:
    """S3/GCS: every object under ``loc``, as keys relative to it, from one paginated listing
    (retried and bounded by ``loc.options``, as every fsspec call)."""
    fs, root = paths.fsspec_view(loc)
    prefix = root + "/"
    found = storage.retrying(lambda left: fs.find(root, timeout=left), loc.options, loc.url, "listing")
    return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))


class _NotYetDeleted(OSError):
    """Objects of a batch answered 429 or 5xx: a transient failure, the next attempt sends them."""


def delete_keys(loc: paths.Location, keys: Sequence[str]) -> None:
    """S3/GCS: deletes objects ``keys`` (relative to ``loc``) in batched requests.

    One operation of ``loc.options``: attempted at most ``max_retries + 1`` times, each attempt
    sending only the objects not deleted yet, all within ``op_timeout_s``.

    Raises:
      CheckpointStorageError: some keys could not be deleted (the first is named, with the
        count); the others are gone. Keys already missing count as deleted.
      StorageTimeoutError: the deletes did not finish within ``op_timeout_s``.
    """
    if not keys:
        return
    fs, root = paths.fsspec_view(loc)
    delete = _s3_batch if loc.scheme == "s3" else _gcs_batch
    size = S3_BATCH if loc.scheme == "s3" else GCS_BATCH
    pending = [f"{root}/{k}" for k in keys]
    refused: list[tuple[str, str]] = []

    def attempt(left: float) -> None:
        nonlocal pending
        batches = [pending[i : i + size] for i in range(0, len(pending), size)]
        failed = sync(fs.loop, _all, fs, delete, batches, timeout=left)
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


async def _all(fs: Any, delete: Any, batches: list[list[str]]) -> list[tuple[str, str, bool]]:
    """Each batch once: the objects not deleted, why, and whether that may pass (a transient
    failure of a whole batch fails its objects; a permanent one is raised)."""
    limit = asyncio.Semaphore(_CONCURRENT)

    async def one(batch: list[str]) -> list[tuple[str, str, bool]]:
        async with limit:
            return await delete(fs, batch)

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


_S3_TRANSIENT = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout")


async def _s3_batch(fs: Any, names: list[str]) -> list[tuple[str, str, bool]]:
    """One ``DeleteObjects`` request; the keys it reports as not deleted, with S3's reason."""
    bucket = names[0].split("/", 1)[0]
    objects = [{"Key": n.split("/", 1)[1]} for n in names]
    out = await fs._call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    return [
        (f"{bucket}/{e.get('Key')}", f"{e.get('Code')}: {e.get('Message')}", e.get("Code") in _S3_TRANSIENT)
        for e in out.get("Errors", [])
        if e.get("Code") != "NoSuchKey"
    ]


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


async def _gcs_batch(fs: Any, names: list[str]) -> list[tuple[str, str, bool]]:
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
