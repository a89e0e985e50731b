"""Process 0's commit: manifests, metadata, then the marker swapped in; then stale entries go.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save_items
>>> save_items("memory://doc/commits/run-2", {"model": {"w": jnp.ones(2)}}, step=2, add=True)
>>> save_items("memory://doc/commits/run-2", {"optimizer": {"m": jnp.ones(2)}}, step=2, add=True)
>>> from ckpt_callbacks.directory._open import open_checkpoint
>>> open_checkpoint("memory://doc/commits/run-2").items
['model', 'optimizer']

The marker is built from the one it replaces (``ckpt_callbacks.marker``): an item another
``add`` committed meanwhile is kept, and the version it replaces is deleted once it commits.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Mapping

import crc32c

from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage as marker
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory._open import (
    CLAIM_PREFIX,
    COMMIT_MARKER,
    MANIFEST,
    Checkpoint,
    SaveLayout,
    read_committed_json,
)
from ckpt_callbacks.errors import CheckpointExistsError, CheckpointFormatError, CorruptCheckpointError

log = logging.getLogger("ckpt_callbacks")


def _merged(
    loc: paths.Location, names: SaveLayout, metadata: fmt.Metadata, current: fmt.Commit | None
) -> tuple[fmt.Commit, fmt.Metadata, set[str]]:
    """For an added item: the commit and metadata of the checkpoint ``current`` names, with this
    save's items added; and the entries they keep."""
    opened = _open_commit(loc, current) if names.add and current is not None else None
    if opened is None:
        return names.commit, metadata, set()
    if opened.metadata.step != metadata.step:
        raise CheckpointExistsError(
            f"{loc.url} holds step {opened.metadata.step}; an item of step {metadata.step} cannot join it"
        )
    old = opened.commit
    kept = {item: d for item, d in old.items.items() if item not in names.commit.items}
    checksums = {k: v for k, v in old.checksums.items() if k.split("/")[0] in kept.values()}
    commit = dataclasses.replace(names.commit, items={**kept, **names.commit.items}, checksums=checksums)
    merged = dataclasses.replace(
        metadata, items=tuple(commit.items), extras={**opened.metadata.extras, **metadata.extras}
    )
    return commit, merged, set(kept.values())


def _open_commit(loc: paths.Location, commit: fmt.Commit) -> Checkpoint | None:
    """The checkpoint ``commit`` (a marker just read) commits; None if its metadata is unusable."""
    try:
        where = loc.join(commit.metadata).url
        return Checkpoint(loc, commit, fmt.parse_metadata(read_committed_json(loc, commit, commit.metadata), where))
    except (CheckpointFormatError, CorruptCheckpointError):
        return None


_PATH_LOCKS: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)


def write_commit(
    loc: paths.Location, names: SaveLayout, manifests: Mapping[str, fmt.Manifest], metadata: fmt.Metadata
) -> None:
    """Process 0: manifests, metadata, then the marker (with their crc32c); then stale entries go.

    The marker is swapped in conditionally (``ckpt_callbacks.marker``): built from the marker
    it replaces, read right before, and rebuilt if another commit lands first (an item added
    by a concurrent ``add`` is kept). Commits to one path from one process take turns.
    """
    sums = {}
    for item, manifest in manifests.items():
        raw = fmt.dumps(manifest.to_json())
        paths.write_bytes(loc.join(names.commit.items[item]), MANIFEST, raw)
        sums[f"{names.commit.items[item]}/{MANIFEST}"] = crc32c.crc32c(raw)
    basis: dict[bytes | None, tuple[fmt.Commit | None, fmt.Commit, set[str]]] = {}
    written: dict[str, bytes] = {}

    def build(current_raw: bytes | None) -> bytes:
        current = _parse_quietly(loc, current_raw)
        commit, merged, kept = _merged(loc, names, metadata, current)
        raw = fmt.dumps(merged.to_json())
        if written.get(commit.metadata) != raw:  # this save's own metadata file
            paths.write_bytes(loc, commit.metadata, raw)
            written[commit.metadata] = raw
        commit = dataclasses.replace(
            commit, checksums={**commit.checksums, **sums, commit.metadata: crc32c.crc32c(raw)}
        )
        basis[current_raw] = (current, commit, kept)
        return fmt.dumps(commit.to_json())

    with _PATH_LOCKS[loc.url]:
        replaced_raw = marker.swap(loc, COMMIT_MARKER, build)
    replaced, commit, kept = basis[replaced_raw]
    keep = {commit.metadata, *commit.items.values(), *kept}
    doomed = set(names.stale)
    if replaced is not None:
        doomed |= {replaced.metadata, *replaced.items.values()}
    # Claims last: a dead one names the plain directories it leaves, until those are gone.
    gone = sorted(doomed - keep - {COMMIT_MARKER}, key=lambda n: (n.startswith(CLAIM_PREFIX), n))
    _delete_quietly(loc, [*gone, names.claim])


def _parse_quietly(loc: paths.Location, raw: bytes | None) -> fmt.Commit | None:
    """A marker's content parsed; None if absent or damaged (then none of its names is trusted)."""
    if raw is None:
        return None
    where = loc.join(COMMIT_MARKER).url
    try:
        return fmt.Commit.from_json(fmt.loads(raw, where), where)
    except CheckpointFormatError:
        return None


def _delete_quietly(loc: paths.Location, names: list[str]) -> None:
    for name in names:
        try:
            paths.delete_entry(loc, name)
        except Exception as e:  # best effort: the new checkpoint is already committed
            log.warning("could not delete stale %s: %s", loc.join(name).url, e)
