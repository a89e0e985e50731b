"""What a checkpoint directory is: its entry names, the commit marker, and how to open one.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/layout/run-4", {"w": jnp.ones(2)}, step=4)
>>> ckpt = open_checkpoint("memory://doc/layout/run-4")
>>> ckpt.metadata.step, ckpt.items, [r.key for r in ckpt.manifest("state").leaves]
(4, ['state'], ['w'])

A checkpoint exists iff its ``COMMITTED`` marker does. The marker names the metadata file and
the item directories of the committed version, with a crc32c of each JSON file it commits,
so bit rot in metadata or manifests is caught like bit rot in chunks. Both the save path
(``serializer``) and the read path (``restore``, ``discovery``) meet here, and only here.

Which names are ours: ``COMMITTED``, ``metadata.json`` and ``metadata.ckpt-<nonce>.json``, item
directories (``<item>``, ``<item>.ckpt-<nonce>``), save claims (``.claim.<nonce>``) and the record
of a delete in progress (``.deleting``, see ``ckpt_callbacks.deletes``). The library
deletes nothing else: a user's ``config.yaml`` beside a checkpoint survives saves, overwrites
and retention.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Collection
from typing import Any

import crc32c

from ckpt_callbacks import distributed
from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import _claims as claims
from ckpt_callbacks.errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointPathError,
    CheckpointStorageError,
    CorruptCheckpointError,
    MissingFileError,
    StorageNotSharedError,
)
from ckpt_callbacks.storage import StorageOptions

log = logging.getLogger("ckpt_callbacks")

COMMIT_MARKER = "COMMITTED"
METADATA = "metadata.json"
MANIFEST = "manifest.json"
METRICS_DIR = "metrics"
CLAIM_PREFIX = ".claim."
DELETING = ".deleting"  # written before a delete removes the marker: the entries it still owes
_RUN = re.compile(r"run-([0-9]+)")
_NONCE = r"[0-9a-f]{8}"
_ITEM = re.compile(r"[A-Za-z0-9_-]+")
_OURS = re.compile(
    rf"{re.escape(COMMIT_MARKER)}|{fmt.METADATA_NAME.pattern}|\.claim\.{_NONCE}|[A-Za-z0-9_-]+\.ckpt-{_NONCE}"
    rf"|{re.escape(DELETING)}"
)


def run_name(step: int) -> str:
    """The directory name of the checkpoint of ``step`` under a base (``run-<step>``)."""
    return f"run-{step}"


def step_of(name: str) -> int | None:
    """The step a ``run-<step>`` directory name stands for, or None for other names."""
    match = _RUN.fullmatch(name)
    return int(match.group(1)) if match else None


def metrics_name(step: int) -> str:
    """The file under ``<base>/metrics/`` holding the eval metrics recorded for ``step``."""
    return f"{run_name(step)}.json"


def check_item_name(item: str) -> None:
    if not isinstance(item, str) or not _ITEM.fullmatch(item) or len(item) > 100:
        raise ValueError(f"item name {item!r}: use letters, digits, '_' and '-' (at most 100)")
    if item == COMMIT_MARKER:
        raise ValueError(f"item name {item!r} is the commit marker's name; choose another")


def read_commit(loc: paths.Location) -> fmt.Commit | None:
    """The commit marker of the checkpoint at ``loc``, or None if it is not committed."""
    raw = paths.read_bytes(loc, COMMIT_MARKER)
    if raw is None:
        return None
    where = loc.join(COMMIT_MARKER).url
    return fmt.Commit.from_json(fmt.loads(raw, where), where)


def read_committed_json(loc: paths.Location, commit: fmt.Commit, name: str) -> Any:
    """A JSON file the marker names (``name`` relative to ``loc``), checked against its crc32c."""
    *dirs, base = name.split("/")
    where = f"{loc.url}/{name}"
    raw = paths.read_bytes(loc.join(*dirs) if dirs else loc, base)
    if raw is None:
        raise MissingFileError(f"{where}: named by the commit marker but missing")
    expected = commit.checksums.get(name)
    found = crc32c.crc32c(raw)
    if expected != found:
        shown = "no crc32c" if expected is None else f"{expected:#010x}"
        raise CorruptCheckpointError(
            f"{where}: crc32c {found:#010x} read, {shown} in the commit marker (the file was modified or damaged)"
        )
    return fmt.loads(raw, where)


@dataclasses.dataclass(eq=False)
class Checkpoint:
    """A committed checkpoint, opened: marker and metadata read once, each manifest read once.

    ``restore``, ``verify`` and the Checkpointer accept it instead of a path, so a restore of
    the latest checkpoint reads each JSON file of it once.
    """

    loc: paths.Location
    commit: fmt.Commit
    metadata: fmt.Metadata
    _manifests: dict[str, fmt.Manifest] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def items(self) -> list[str]:
        return list(self.commit.items)

    def item_loc(self, item: str) -> paths.Location:
        if item not in self.commit.items:
            raise CheckpointNotFoundError(f"{self.url} has no item {item!r}; items: {sorted(self.commit.items)}")
        return self.loc.join(self.commit.items[item])

    def manifest(self, item: str) -> fmt.Manifest:
        """The validated manifest of ``item`` (read on first use)."""
        if item not in self._manifests:
            item_loc = self.item_loc(item)
            name = f"{self.commit.items[item]}/{MANIFEST}"
            data = read_committed_json(self.loc, self.commit, name)
            self._manifests[item] = fmt.parse_manifest(data, item_loc.join(MANIFEST).url)
        return self._manifests[item]


def try_open(loc: paths.Location) -> Checkpoint | None:
    """The checkpoint at ``loc`` opened, or None if it is not committed (no other listing)."""
    commit = read_commit(loc)
    if commit is None:
        return None
    where = loc.join(commit.metadata).url
    metadata = fmt.parse_metadata(read_committed_json(loc, commit, commit.metadata), where)
    named = step_of(loc.name)
    if named is not None and metadata.step is not None and metadata.step != named:
        raise CheckpointFormatError(
            f"{where}: step {metadata.step}, but the directory is {loc.name!r} (expected step {named})"
        )
    if sorted(metadata.items) != sorted(commit.items):
        raise CheckpointFormatError(
            f"{where}: items {sorted(metadata.items)}, but the commit marker names {sorted(commit.items)}"
        )
    return Checkpoint(loc, commit, metadata)


def open_checkpoint(path: Any, *, storage: StorageOptions | None = None) -> Checkpoint:
    """Opens the committed checkpoint at ``path`` (a URL, a ``Location`` or a ``Checkpoint``).

    ``storage``: retries and timeouts of its reads (``restore`` of the result uses them too).
    """
    if isinstance(path, Checkpoint):
        return path
    loc = paths.parse(path, storage)
    ckpt = try_open(loc)
    if ckpt is None:
        hint = _why_not_committed(path, loc) if paths.has_any(loc) else ""
        raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}{hint}")
    return ckpt


_SHOWN_STEPS = 5  # a base's newest committed steps a refusal names (markers read newest first)


def _why_not_committed(path: Any, loc: paths.Location) -> str:
    """The hint of a refusal at a directory holding files: a base of ``run-<step>`` checkpoints
    (its newest committed steps and how to read one), else a save that did not finish."""
    runs = sorted(((s, n) for n in paths.list_dirs(loc) if (s := step_of(n)) is not None), reverse=True)
    if not runs:
        return " (it holds files but no commit marker: a save that did not finish)"
    steps: list[int] = []
    unread = 0
    for i, (step, name) in enumerate(runs):
        if len(steps) == _SHOWN_STEPS:
            unread = len(runs) - i
            break
        if read_commit_quietly(loc.join(name)) is not None:
            steps.append(step)
    if not steps:
        return f": it is a checkpoint base, but none of its {len(runs)} run-<step> directories is committed"
    newest = _child_as_given(path, loc, run_name(steps[0]))
    shown = ", ".join(map(str, steps)) + (", ..." if unread else "")
    return (
        f": it is a checkpoint base holding run-<step> checkpoints (committed steps {shown}, newest first); "
        f"pass one checkpoint ({newest!r}) or read a step with "
        f"CheckpointReader({_as_given(path, loc)!r}).restore(step={steps[0]})"
    )


def _as_given(path: Any, loc: paths.Location) -> str:
    """``loc`` as its user wrote it: a local path stays a path, anything else is a URL."""
    return os.fspath(path) if isinstance(path, str | os.PathLike) and "://" not in os.fspath(path) else loc.url


def _child_as_given(path: Any, loc: paths.Location, name: str) -> str:
    given = _as_given(path, loc)
    return os.path.join(given, name) if given != loc.url else loc.join(name).url


# ---------------------------------------------------------------------------------------- saving
@dataclasses.dataclass(frozen=True, kw_only=True)
class SaveLayout:
    """The names one save writes, and what its commit may delete afterwards.

    ``stale``: our own entries that were in the directory when the save began and belong to no
    other save in flight (an overwritten version, leftovers of a save that died).
    """

    commit: fmt.Commit
    claim: str
    stale: tuple[str, ...] = ()
    add: bool = False  # items added to the committed checkpoint, its other items kept
    claimed: tuple[str, ...] = ()  # every name the claim names
    lease_s: float = claims.DEFAULT_LEASE_S


def is_ours(name: str, items: Collection[str]) -> bool:
    """Whether entry ``name`` of a checkpoint directory is one the library writes (``items``:
    the item names it holds, whose plain directories are ours too)."""
    return bool(_OURS.fullmatch(name)) or name in items


def is_entry_name(name: str) -> bool:
    """Whether ``name`` could be an entry a save writes (an item directory or one of ours)."""
    return bool(_ITEM.fullmatch(name) or _OURS.fullmatch(name))


def _collision(committed: fmt.Commit | None, items: list[str], add: bool) -> str | None:
    """Why a save of ``items`` may not go where ``committed`` is (None: it may)."""
    if committed is None:
        return None
    if not add:
        return "already holds a committed checkpoint"
    taken = sorted(set(items) & set(committed.items))
    return f"already holds items {taken} in its committed checkpoint" if taken else None


def refuse_committed(loc: paths.Location, overwrite: bool, tag: str, add: list[str] | None = None) -> None:
    """Raises ``CheckpointExistsError`` on every process if the save would replace something
    committed (the checkpoint; with ``add``, one of the items it adds) without ``overwrite``."""
    if overwrite:
        return
    why = _collision(read_commit(loc), add or [], add is not None) if distributed.is_primary() else None
    if distributed.broadcast_json(f"{tag}/committed", why):
        raise CheckpointExistsError(
            f"{loc.url} {why}; pass overwrite=True to replace it (the old one stays valid until the new one commits)"
        )


def _marked(loc: paths.Location) -> bool:
    return paths.read_bytes(loc, COMMIT_MARKER) is not None


def has_marker(loc: paths.Location) -> bool:
    """Whether ``loc`` holds a commit marker, readable or not (one read): it is a checkpoint.

    A ``loc`` without one that lies inside a committed checkpoint (see ``inside_checkpoint``)
    raises ``CheckpointPathError``: nothing is a base or a checkpoint there.
    """
    if _marked(loc):
        return True
    misplaced = inside_checkpoint(loc)
    if misplaced is not None:
        raise CheckpointPathError(misplaced)
    return False


def _parent(loc: paths.Location) -> paths.Location | None:
    parent = posixpath.dirname(loc.path)
    return None if parent == loc.path else dataclasses.replace(loc, path=parent)


# Ancestors whose marker an object-store save reads (one request each); local disk and
# memory:// read every ancestor up to the root, which costs next to nothing there.
OBJECT_STORE_ANCESTORS = 6


def inside_checkpoint(loc: paths.Location) -> str | None:
    """Why a save may not go to ``loc``: an ancestor of it is a committed checkpoint (``loc`` is
    an item directory of it, or any directory below one); None if none is.

    One read per ancestor: on a local disk (and ``memory://``) every ancestor up to the root; on
    an object store the nearest ``OBJECT_STORE_ANCESTORS`` (6) only, so ``s3://b/c/run-1/x/y/z/w/v/u/t``
    (seven levels inside) is not caught. Past the grandparent, an ancestor that cannot be read
    (permissions) ends the walk: those checks are a guard, never a reason to fail a save.
    """
    limit = OBJECT_STORE_ANCESTORS if loc.backend.is_object_store else None
    inner, level = loc, 0
    while limit is None or level < limit:
        outer = _parent(inner)
        if outer is None or outer.path == "/":  # no checkpoint is a filesystem's root
            return None
        level += 1
        try:
            marked = _marked(outer)
        except CheckpointStorageError:
            if level <= 2:
                raise
            return None
        if marked:
            entry = loc.path[len(outer.path) :].strip("/").split("/")[0]
            return (
                f"{loc.url} is inside the committed checkpoint {outer.url} (its entry {entry!r}); a "
                "checkpoint is never saved into another. Save beside it (a sibling directory), or add an item "
                f"to it with save_items({outer.url!r}, {{name: tree}}, add=True)"
            )
        inner = outer
    return None


_BASE_MARKERS = 5  # the newest run-<step> markers read before a directory is taken for no base


def _base_of(loc: paths.Location, entries: Collection[str]) -> str | None:
    """Why a save may not go to ``loc`` (not itself committed), whose listing is ``entries``:
    it is a base holding committed ``run-<step>`` checkpoints; None if it is not."""
    runs = sorted(((s, n) for n in entries if (s := step_of(n)) is not None), reverse=True)
    for step, name in runs[:_BASE_MARKERS]:
        if _marked(loc.join(name)):
            return (
                f"{loc.url} is a checkpoint base: it holds committed run-<step> checkpoints (found "
                f"{loc.join(name).url}), and a save there would wrap a checkpoint around them. Save each step "
                f"into its own directory, {loc.url}/run-<step> (e.g. {loc.join(run_name(step + 1)).url}), "
                "or use a Checkpointer of the base"
            )
    return None


def _decide_names(loc: paths.Location, items: list[str], overwrite: bool, add: bool, lease_s: float) -> dict[str, Any]:
    """Process 0: claim, list, and choose (see ``choose_layout``)."""
    nonce = uuid.uuid4().hex[:8]
    claim = f"{CLAIM_PREFIX}{nonce}"
    # The claim names every name this save may use, plain ones too (it decides after listing):
    # another save never takes them for leftovers while this one writes.
    names = [METADATA, *items, f"metadata.ckpt-{nonce}.json", *(f"{i}.ckpt-{nonce}" for i in items)]
    misplaced = inside_checkpoint(loc)  # before the claim: a refused save writes nothing
    if misplaced is not None:
        return {"refused": misplaced, "misplaced": True}
    paths.write_bytes(loc, claim, claims.new_claim(names, lease_s).to_bytes())
    committed = read_commit_quietly(loc)  # a damaged marker is replaced, and none of its names trusted
    why = None if overwrite else _collision(committed, items, add)
    if why is not None:  # committed by another save since refuse_committed, or an item is taken
        paths.delete_entry(loc, claim)
        return {"refused": why}
    entries = [n for n in paths.list_entries(loc) if n != claim]
    misplaced = None if committed is not None else _base_of(loc, entries)
    if misplaced is not None:  # the claim was its only write, and it goes
        paths.delete_entry(loc, claim)
        return {"refused": misplaced, "misplaced": True}
    others = [n for n in entries if n.startswith(CLAIM_PREFIX)]
    busy, dead = claims.held(loc, others)
    if add and committed is not None:  # the items this save does not replace stay
        busy |= {committed.metadata, *(d for item, d in committed.items.items() if item not in items)}
    known = set(items) | (set(committed.items) if committed else set()) | claims.item_names(loc, dead)
    stale = [
        n for n in entries if n in dead or (is_ours(n, known) and n not in busy and not n.startswith(CLAIM_PREFIX))
    ]
    plain = not others and not stale and not (add and committed is not None)
    return {"refused": None, "plain": plain, "nonce": nonce, "stale": stale, "claimed": names}


def choose_layout(
    loc: paths.Location,
    items: list[str],
    overwrite: bool,
    tag: str,
    add: bool = False,
    *,
    lease_s: float = claims.DEFAULT_LEASE_S,
) -> SaveLayout:
    """Names for one save, decided by process 0 and shared with every process.

    Process 0 first writes a claim naming what the save will write, then lists the directory.
    Plain names (``metadata.json``, ``<item>``) are used only in a directory holding none of
    ours and no other claim; otherwise fresh suffixed names. Two saves to one path (threads,
    processes or runs) therefore never write the same files, and whichever commits last is
    whole. Plain-name readers (the seed's ``metadata.json``) see plain names on a first save.
    With ``add``, the items join the committed checkpoint (its other items are kept).
    """
    decision = _decide_names(loc, items, overwrite, add, lease_s) if distributed.is_primary() else None
    decision = distributed.broadcast_json(f"{tag}/layout", decision)
    if decision["refused"] and decision.get("misplaced"):
        raise CheckpointPathError(decision["refused"])
    if decision["refused"]:
        raise CheckpointExistsError(f"{loc.url} {decision['refused']} (committed while this save started?)")
    nonce = decision["nonce"]
    if decision["plain"]:
        commit = fmt.Commit(metadata=METADATA, items={item: item for item in items})
    else:
        commit = fmt.Commit(
            metadata=f"metadata.ckpt-{nonce}.json", items={item: f"{item}.ckpt-{nonce}" for item in items}
        )
    return SaveLayout(
        commit=commit,
        claim=f"{CLAIM_PREFIX}{nonce}",
        stale=tuple(decision["stale"]),
        add=add,
        claimed=tuple(decision["claimed"]),
        lease_s=lease_s,
    )


def check_shared(loc: paths.Location, layout: SaveLayout, tag: str, timeout_s: float) -> None:
    """With several processes: every process reads the claim process 0 just wrote; if some
    cannot, they do not share this storage (the classic: a local ``/tmp`` path on several
    hosts), and every process raises at once instead of timing out at the commit barrier or
    committing a checkpoint with missing shards."""
    if distributed.process_count() == 1:
        return
    seen = paths.read_bytes(loc, layout.claim) is not None
    gathered = distributed.gather_json(f"{tag}/shared", seen, timeout_s)
    blind = None if gathered is None else [pid for pid, ok in enumerate(gathered) if not ok]
    blind = distributed.broadcast_json(f"{tag}/blind", blind, timeout_s)
    if blind:
        if distributed.is_primary():
            release(loc, layout)
        raise StorageNotSharedError(
            f"{loc.url}: processes {blind} cannot see what process 0 writes there; every process of a "
            "multi-host run must save to storage they all share (an object store, or a shared file "
            "system), not a path that is local to each host"
        )


def release(loc: paths.Location, layout: SaveLayout, *, settled: bool = True) -> None:
    """Process 0, after a failed save: drops the claim if every write of the save has settled
    (a refusal); otherwise leaves it to age out (see ``ckpt_callbacks.claims``), so writes the
    store may still apply never land in names another save reuses. The files stay until a
    later save, retention or prune finds the claim dead."""
    if not settled:
        return
    try:
        paths.delete_entry(loc, layout.claim)
    except Exception as e:  # best effort: a leftover claim only makes the next save use suffixed names
        log.warning("could not delete %s: %s", loc.join(layout.claim).url, e)


def renew(loc: paths.Location, layout: SaveLayout) -> None:
    """Process 0, while its save runs: rewrites the claim, renewed now."""
    paths.write_bytes(loc, layout.claim, claims.new_claim(list(layout.claimed), layout.lease_s).to_bytes())


def read_commit_quietly(loc: paths.Location) -> fmt.Commit | None:
    try:
        return read_commit(loc)
    except CheckpointFormatError:
        return None
