"""The source seam: the kinds of checkpoint directory ``restore`` can read.

Our own format is always tried first (its commit marker decides). Where a path holds no
committed checkpoint of ours, each registered foreign source is asked in registration order;
the first that recognises the directory reads it. ``interop`` registers orbax's PyTree
checkpoints and safetensors files when ``ckpt_callbacks`` is imported; ``restoring`` itself imports no source.

>>> [s.name for s in sources()]
['orbax', 'safetensors']
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from ckpt_callbacks import directory as layout
from ckpt_callbacks import format as fmt
from ckpt_callbacks import layouts
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointFormatError, CheckpointNotFoundError
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

    Optionally (a ``StepSource``), ``steps(base)``: the committed checkpoints of this kind
    directly under a base, which the manager's discovery lists beside ours.
    """

    name: ClassVar[str]

    def open(self, loc: paths.Location, item: str) -> Located | None: ...


@runtime_checkable
class StepSource(Source, Protocol):
    """A ``Source`` that also finds its checkpoints under a base directory:

    2. ``steps(base)`` -> one ``CheckpointInfo`` per committed checkpoint of this kind directly
       under ``base`` (``checkpoint=None``; ``path`` a URL that ``open`` accepts), by its own
       rules of what is finished; the unfinished and the unreadable are left out.
    """

    def steps(self, base: paths.Location) -> list[layout.CheckpointInfo]: ...


_SOURCES: list[Source] = []


def register_source(source: Source) -> None:
    """Asks ``source`` for paths holding no checkpoint of ours (after the sources before it).
    ``ValueError`` for a source without a name, or with the name of one registered already."""
    name = getattr(source, "name", None)
    if not isinstance(name, str) or not name or not callable(getattr(source, "open", None)):
        raise ValueError(f"a source needs a non-empty str name and an open(loc, item) method, got {source!r}")
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


def foreign_steps(base: paths.Location) -> list[layout.CheckpointInfo]:
    """The committed checkpoints every registered ``StepSource`` sees directly under ``base``,
    each marked with its source's name (``CheckpointInfo.source``), by step.

    ``CheckpointFormatError`` for a source that returns anything but infos of a step >= 0.
    """
    out = []
    for source in _SOURCES:
        if not isinstance(source, StepSource):
            continue
        for info in source.steps(base):
            ok = isinstance(info, layout.CheckpointInfo) and info.checkpoint is None
            if not ok or not isinstance(info.step, int) or isinstance(info.step, bool) or info.step < 0:
                raise CheckpointFormatError(
                    f"{base.url}: source {source.name!r} listed {info!r:.200}; expected a CheckpointInfo of a "
                    "step >= 0 with checkpoint=None"
                )
            out.append(dataclasses.replace(info, source=source.name))
    return sorted(out, key=lambda c: (c.step or 0, c.name))


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

    Only a path holding no commit marker of ours is offered to the foreign sources: a committed
    checkpoint of ours without ``item`` raises here, whatever else the directory holds.
    ``CheckpointNotFoundError`` when no source claims the path, naming what was tried; for a
    base of checkpoints (steps of ours or of any ``StepSource``), listing them and how to read one.
    """
    try:
        ckpt = layout.open_checkpoint(path, storage=storage)
    except CheckpointNotFoundError as e:
        if isinstance(path, layout.Checkpoint) or not _SOURCES:
            raise
        return _foreign(path, paths.parse(path, storage), item, e)
    return native(ckpt, item)


def _foreign(path: Any, loc: paths.Location, item: str, missing: CheckpointNotFoundError) -> Located:
    for source in _SOURCES:
        found = source.open(loc, item)
        if found is None:
            continue
        if not isinstance(found, Located) or not isinstance(found.manifest, fmt.Manifest) or not callable(found.read):
            raise CheckpointFormatError(
                f"{loc.url}: source {source.name!r} returned {type(found).__name__}; expected a restoring.Located"
            )
        _check_manifest(found.manifest, f"{loc.url} (read as {source.name!r})")
        return found
    foreign = foreign_steps(loc)
    if foreign:
        raise CheckpointNotFoundError(_a_base(path, loc, layout.list_checkpoints(loc) + foreign)) from missing
    tried = ", ".join(f"{s.name} (not one)" for s in _SOURCES)
    raise CheckpointNotFoundError(f"{missing}; also tried as: {tried}") from missing


_SHOWN_STEPS = 8  # the newest steps of a base a refusal names


def _a_base(path: Any, loc: paths.Location, infos: Sequence[layout.CheckpointInfo]) -> str:
    """The refusal of a restore of a base: its newest steps, who wrote each, and how to read one."""
    newest = sorted(infos, key=lambda c: (c.step or 0, c.source == layout.OURS), reverse=True)
    shown = ", ".join(f"{c.step} ({c.source}: {c.name})" for c in newest[:_SHOWN_STEPS])
    more = f", ... ({len(newest) - _SHOWN_STEPS} more)" if len(newest) > _SHOWN_STEPS else ""
    examples = []
    for ours in (True, False):
        first = next((c for c in newest if (c.source == layout.OURS) == ours), None)
        if first is not None:
            examples.append(f"restore({layout.as_given(path, loc.join(first.name))!r})")
    local = isinstance(path, str | os.PathLike) and "://" not in os.fspath(path)
    given = os.fspath(path) if local else loc.url
    return (
        f"no committed checkpoint at {loc.url}: it is a base directory of {len(infos)} checkpoints, not one "
        f"(steps, newest first: {shown}{more}); restore one of them by its path, e.g. {' or '.join(examples)}, "
        f"or the latest with CheckpointReader({given!r}).restore()"
    )


def _check_manifest(manifest: fmt.Manifest, where: str) -> None:
    """What the engine relies on in a foreign source's manifest: a tree using each record once,
    at its path, and every array record a shape of non-negative dims and a dtype we know."""
    if not all(isinstance(r, fmt.LeafRecord) for r in manifest.leaves):
        raise CheckpointFormatError(f"{where}: the manifest's leaves are not all LeafRecords")
    fmt.check_tree(manifest.tree, [r.path for r in manifest.leaves], where)
    for record in manifest.leaves:
        if record.kind == "scalar":
            continue
        shape, chunks = record.data_shape, record.chunks
        ok = all(isinstance(n, int) and n >= 0 for n in (*shape, *chunks)) and len(chunks) == len(shape)
        if not ok or any(c < 1 and n > 0 for n, c in zip(shape, chunks, strict=True)):
            raise CheckpointFormatError(
                f"{where}: leaf {record.key!r}: shape {list(shape)}, chunks {list(chunks)}; expected non-negative "
                "dims and one positive chunk size per stored dim"
            )
        try:
            fmt.dtype_from_name(record.zarr_dtype)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{where}: leaf {record.key!r}: {e}") from None
