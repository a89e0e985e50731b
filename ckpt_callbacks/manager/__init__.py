"""manager: facade (see README.md here)."""

from ckpt_callbacks.manager._aftercommit import ScalarWriter as ScalarWriter
from ckpt_callbacks.manager._callback import CheckpointCallback as CheckpointCallback
from ckpt_callbacks.manager._checkpointer import Checkpointer as Checkpointer
from ckpt_callbacks.manager._discovery import discover as discover
from ckpt_callbacks.manager._discovery import find_latest_checkpoint as find_latest_checkpoint
from ckpt_callbacks.manager._local import LocalTier as LocalTier
from ckpt_callbacks.manager._policy import CheckpointInterval as CheckpointInterval
from ckpt_callbacks.manager._policy import Decision as Decision
from ckpt_callbacks.manager._policy import KeepPolicy as KeepPolicy
from ckpt_callbacks.manager._policy import SavePolicy as SavePolicy
from ckpt_callbacks.manager._policy import metric_of as metric_of
from ckpt_callbacks.manager._reader import CheckpointReader as CheckpointReader
from ckpt_callbacks.manager._retention import Retention as Retention
