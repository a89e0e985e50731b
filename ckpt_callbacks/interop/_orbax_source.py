"""Orbax PyTree checkpoints as a ``restoring`` source (registered when ``interop`` is imported).

A step directory or an item directory written by orbax restores like one of ours (read
without orbax; see ``_orbax_reader``), except that orbax records no chunk checksums, so its
reads are unchecked.
"""

from __future__ import annotations

import functools
from typing import ClassVar

from ckpt_callbacks import restoring
from ckpt_callbacks import storage as paths
from ckpt_callbacks.interop._orbax_reader import open_item


class OrbaxSource:
    """``restoring.Source`` for orbax PyTree checkpoints."""

    name: ClassVar[str] = "orbax"

    def open(self, loc: paths.Location, item: str) -> restoring.Located | None:
        found = open_item(loc, item)
        if found is None:
            return None
        read = functools.partial(restoring.read_leaves, found.loc, open_unchecked=found.open_array)
        return restoring.Located(found.loc, found.manifest, read)


restoring.register_source(OrbaxSource())
