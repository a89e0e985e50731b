"""clu integration; importing this module imports clu (and so TensorFlow).

>>> from clu import periodic_actions
>>> from ckpt_callbacks.clu import CheckpointCallback
>>> isinstance(CheckpointCallback("memory://doc/clu"), periodic_actions.PeriodicAction)
True

``CheckpointCallback`` already registers itself when clu was imported first; this module
does it whichever came first, for code that type-checks its hooks against clu.
"""

from __future__ import annotations

from clu import periodic_actions

from ckpt_callbacks.manager import CheckpointCallback


def register() -> None:
    """Makes ``CheckpointCallback`` a virtual subclass of ``clu.periodic_actions.PeriodicAction``."""
    periodic_actions.PeriodicAction.register(CheckpointCallback)


register()
