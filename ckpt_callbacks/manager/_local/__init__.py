"""The per-host tier with peer replicas (see README.md here)."""

from ckpt_callbacks.manager._local._saver import LocalSaver as LocalSaver
from ckpt_callbacks.manager._local._tier import LocalTier as LocalTier
