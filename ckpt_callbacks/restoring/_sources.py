"""The source seam: the kinds of checkpoint directory ``restore`` can read.

Our own format is always tried first (its commit marker decides). Where a path holds no
committed checkpoint of ours, each registered foreign source is asked in registration order;
the first that recognises the directory reads it. ``interop`` registers orbax's PyTree
checkpoints when ``ckpt_callbacks`` is imported; ``restoring`` itself imports no source.

>>> [s.name for s in sources()]
['orbax']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

from ckpt_callbacks import directory as layout
from ckpt_callbacks import format as fmt
from ckpt_callbacks import layouts
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointNotFoundError
from ckpt_callbacks.restoring._reads import read_leaves
from ckpt_callbacks.storage import StorageOptions

Reader = Callable[..., list[Any]]  # (records, targets, window) -> values, as read_leaves's tail


@dataclasses.dataclass(frozen=True)
class Located:
    """One item found by a source: where it is (for messages), its manifest (leaf records in
    our format's terms) and the reader of its array leaves."""

    loc: paths.Location
    manifest: fmt.Manifest
    read: Reader


class Source(Protocol):
    """A kind of checkpoint directory ``restore`` can read. A restore calls, on every process,
    once our own format found no commit marker at the path:

    1. ``open(loc, item)`` -> ``Located`` when the directory is of this kind; None for "not
       mine" (the next source is asked); raises a ``CheckpointError`` for "mine, but broken"
       (unfinished, malformed, no such item), which fails the restore with that error.
    """

    name: ClassVar[str]

    def open(self, loc: paths.Location, item: str) -> Located | None: ...


_SOURCES: list[Source] = []


def register_source(source: Source) -> None:
    """Asks ``source`` for paths holding no checkpoint of ours (after the sources before it)."""
    if any(s.name == source.name for s in _SOURCES):
        raise ValueError(f"a source named {source.name!r} is registered already")
    _SOURCES.append(source)


def unregister_source(name: str) -> None:
    """Stops asking the source registered as ``name`` (``KeyError`` if there is none)."""
    index = next((i for i, s in enumerate(_SOURCES) if s.name == name), None)
    if index is None:
        raise KeyError(f"no source named {name!r}; registered: {[s.name for s in _SOURCES]}")
    del _SOURCES[index]


def sources() -> tuple[Source, ...]:
    """The registered foreign sources, in the order they are asked."""
    return tuple(_SOURCES)


def native(ckpt: layout.Checkpoint, item: str) -> Located:
    """An item of our own format: its chunks found through the manifest's layout."""
    manifest = ckpt.manifest(item)
    item_loc = ckpt.item_loc(item)

    def read(records: Sequence[fmt.LeafRecord], targets: Sequence[Any], window: int) -> list[Any]:
        located, files = layouts.locate(item_loc, manifest, records, targets)
        return read_leaves(item_loc, located, targets, window, packs=files)

    return Located(ckpt.loc, manifest, read)


def locate(path: Any, item: str, storage: StorageOptions | None = None) -> Located:
    """The item ``item`` at ``path``: of our format, else of the first source that knows it.

    ``CheckpointNotFoundError`` when none does, naming what was tried.
    """
    try:
        return native(layout.open_checkpoint(path, storage=storage), item)
    except CheckpointNotFoundError as e:
        if isinstance(path, layout.Checkpoint) or not _SOURCES:
            raise
        missing = e
    loc = paths.parse(path, storage)
    for source in _SOURCES:
        found = source.open(loc, item)
        if found is not None:
            return found
    tried = ", ".join(f"{s.name} (not one)" for s in _SOURCES)
    raise CheckpointNotFoundError(f"{missing}; also tried as: {tried}") from missing
