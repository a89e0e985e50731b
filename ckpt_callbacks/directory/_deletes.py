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
batched calls (``storage.delete_keys``: S3's ``DeleteObjects`` takes 1,000 keys a request,
GCS's batch endpoint 100 calls; fsspec's recursive ``rm`` would also delete a user's file, and
gcsfs sends one request per object to an emulator). A key already gone is no error (a retried
delete).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import _open as layout
from ckpt_callbacks.errors import CheckpointFormatError

S3_BATCH = storage.S3_BATCH  # DeleteObjects' limit
GCS_BATCH = storage.GCS_BATCH  # the GCS batch endpoint's limit
delete_keys = storage.delete_keys  # batched on S3 and GCS (the storage backends)


log = logging.getLogger("ckpt_callbacks")


def delete_checkpoint(loc: paths.Location, commit: fmt.Commit | None = None) -> None:
    """Deletes a checkpoint: the marker first (a half-deleted checkpoint is no checkpoint),
    then our own entries; the directory goes only if nothing else is left in it.

    ``commit``: its marker as read before (a retried delete finds no marker any more, and
    then uses the ``.deleting`` record a first try left). A marker that cannot be read names
    nothing: then the item directories holding a ``manifest.json`` go with it.
    """
    commit = commit or layout.read_commit_quietly(loc)
    if commit is not None:
        named = {commit.metadata, *commit.items.values()}
        paths.write_bytes(loc, layout.DELETING, fmt.dumps(sorted(named)))
    elif (record := owed(loc)) is not None:
        named = record
    elif layout.has_marker(loc):  # damaged, so it names nothing: record the items a save wrote
        named = _saved_items(loc)
        paths.write_bytes(loc, layout.DELETING, fmt.dumps(sorted(named)))
    else:  # no checkpoint (a save may be committing here): only our own names go
        named = set()
    _delete_names(loc, [layout.COMMIT_MARKER])
    items = set(commit.items) if commit else set()
    _delete_entries(loc, lambda name: name in named or layout.is_ours(name, items))


def _saved_items(loc: paths.Location) -> set[str]:
    """Without a readable marker or a record: the item directories a save wrote (each holds
    its ``manifest.json``), so a checkpoint with a damaged marker is deleted whole."""
    return {
        name
        for name in paths.list_entries(loc)
        if layout.is_entry_name(name)
        and not layout.is_ours(name, ())
        and paths.read_bytes(loc.join(name), layout.MANIFEST) is not None
    }


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
    return loc.backend.is_object_store


def list_keys(loc: paths.Location) -> list[str]:
    """S3/GCS: every object under ``loc``, as keys relative to it, from one paginated listing
    (retried and bounded by ``loc.options``, as every fsspec call)."""
    fs, root = paths.fsspec_view(loc)
    prefix = root + "/"
    found = storage.retrying(lambda left: fs.find(root, timeout=left), loc.options, loc.url, "listing")
    return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))
