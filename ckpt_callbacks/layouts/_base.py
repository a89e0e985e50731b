"""The layout seam: how an item's chunks are placed on storage, and found again.

A layout is one object with a ``kind`` (the name ``SaveOptions.layout`` takes and the
manifest's ``layout.kind`` records; a manifest without one is ``"zarr3"``) that implements
both protocols below, registered once with ``register_layout``. The save and restore engines
ask ``layout_for(kind)`` and never test a layout's name.

>>> sorted(kinds())
['process', 'zarr3']
>>> layout_for("zarr3").kind
'zarr3'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage as paths
from ckpt_callbacks.layouts._reads import PackFiles


class LayoutWriter(Protocol):
    """How one layout's items are written. A save calls, in this order:

    0. (pure, for ``plan_layout``) ``index_sizes(chunks_per_process)``: the bytes of each
       process's index file given how many chunks it writes, or None when the layout writes
       no index (every chunk's record is in the manifest).
    1. every process, while planning in the caller's thread: ``file_bytes(max_host_bytes)``.
       None: array leaves of at most ``pack_bytes`` are packed into shared files and the others
       are zarr3 arrays; an int: every array leaf is packed, into this process's data files of
       at most that many bytes.
    2. every process, once its chunks are durable: ``report(item_locs, leaves_of, crcs)``, what it
       sends process 0 (JSON-able). It may write files of its own (the process layout writes
       its index files here); a failure raises and the save fails on every process.
       ``leaves_of``: item -> its planned leaves (``.record``, ``.index``); ``crcs``: item ->
       leaf index -> chunk key -> crc32c of the chunks this process wrote.
    3. process 0, once every process reported, before the marker is written:
       ``manifests(structures, leaves_of, gathered)`` -> item -> ``fmt.Manifest``, with
       ``gathered`` every process's report in process order.
    """

    kind: ClassVar[str]

    def index_sizes(self, chunks_per_process: Sequence[int]) -> list[int] | None: ...

    def file_bytes(self, max_host_bytes: int | None) -> int | None: ...

    def report(
        self, item_locs: Mapping[str, paths.Location], leaves_of: Mapping[str, Sequence[Any]], crcs: Any
    ) -> Any: ...

    def manifests(
        self, structures: Mapping[str, Any], leaves_of: Mapping[str, Sequence[Any]], gathered: Sequence[Any]
    ) -> dict[str, fmt.Manifest]: ...


class LayoutReader(Protocol):
    """How one layout's items are found again. A restore calls, on every process, after the
    manifest passed the format's checks:

    1. ``locate(loc, manifest, records, targets)`` -> (records, files): the given leaf records
       (of ``manifest.leaves``) with every chunk their ``targets`` need given a file, offset
       and crc32c, and the ``PackFiles`` to read those files through. Every file it reads to
       find them (an index) is checked first: ``CorruptCheckpointError`` names it.
    ``verify`` calls ``locate(loc, manifest, None, None)``: every leaf, every chunk.
    """

    kind: ClassVar[str]

    def locate(
        self,
        loc: paths.Location,
        manifest: fmt.Manifest,
        records: Sequence[fmt.LeafRecord] | None,
        targets: Sequence[Any] | None,
    ) -> tuple[list[fmt.LeafRecord], PackFiles]: ...


class Layout(LayoutWriter, LayoutReader, Protocol):
    """A layout: both halves, under one ``kind``."""


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> None:
    """Makes ``layout`` what ``SaveOptions(layout=layout.kind)`` writes and what a manifest of
    that kind is read with. ``ValueError`` for a kind registered already, and for one the format
    does not know (``format.LAYOUT_KINDS``): its saves would commit manifests no reader accepts."""
    kind = getattr(layout, "kind", None)
    if not isinstance(kind, str) or kind not in fmt.LAYOUT_KINDS:
        raise ValueError(
            f"layout {kind!r}: format v1 manifests record only the layouts {fmt.LAYOUT_KINDS}; a new layout's "
            "manifest is checked in ckpt_callbacks/format/_schema.py first (see docs/extending.md)"
        )
    if layout.kind in _LAYOUTS:
        raise ValueError(f"layout {layout.kind!r} is registered already ({_LAYOUTS[layout.kind]!r})")
    _LAYOUTS[layout.kind] = layout


def kinds() -> tuple[str, ...]:
    """The registered layouts' kinds, in registration order."""
    return tuple(_LAYOUTS)


def layout_for(kind: str | None, where: str = "") -> Layout:
    """The layout registered as ``kind`` (None: ``"zarr3"``, what a manifest without a layout
    holds). ``ValueError`` names the kinds there are."""
    kind = "zarr3" if kind is None else kind
    try:
        return _LAYOUTS[kind]
    except (KeyError, TypeError):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}layout must be one of {kinds()}, got {kind!r}") from None


def of_manifest(manifest: fmt.Manifest, where: str = "") -> Layout:
    """The layout a (checked) manifest was written in."""
    return layout_for(None if manifest.layout is None else manifest.layout.get("kind"), where)


def locate(
    loc: paths.Location,
    manifest: fmt.Manifest,
    records: Sequence[fmt.LeafRecord] | None = None,
    targets: Sequence[Any] | None = None,
) -> tuple[list[fmt.LeafRecord], PackFiles]:
    """``LayoutReader.locate`` of the manifest's layout (records None: every leaf, every chunk)."""
    return of_manifest(manifest, loc.url).locate(loc, manifest, records, targets)
