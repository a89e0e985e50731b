"""ckpt_callbacks: checkpoints for JAX training loops that never stall the loop.

>>> import jax.numpy as jnp
>>> import ckpt_callbacks as cc
>>> cc.save("memory://doc/init/run-1", {"w": jnp.ones(2)}, step=1)
>>> cc.find_latest_checkpoint("memory://doc/init")
'memory://doc/init/run-1'
"""

from ckpt_callbacks.aftercommit import ScalarWriter as ScalarWriter
from ckpt_callbacks.callbacks import CheckpointCallback as CheckpointCallback
from ckpt_callbacks.checkpointer import Checkpointer as Checkpointer
from ckpt_callbacks.discovery import CheckpointInfo as CheckpointInfo
from ckpt_callbacks.discovery import VerifyReport as VerifyReport
from ckpt_callbacks.discovery import find_latest_checkpoint as find_latest_checkpoint
from ckpt_callbacks.discovery import list_checkpoints as list_checkpoints
from ckpt_callbacks.discovery import verify as verify
from ckpt_callbacks.errors import CheckpointError as CheckpointError
from ckpt_callbacks.errors import CheckpointExistsError as CheckpointExistsError
from ckpt_callbacks.errors import CheckpointFormatError as CheckpointFormatError
from ckpt_callbacks.errors import CheckpointNotFoundError as CheckpointNotFoundError
from ckpt_callbacks.errors import CheckpointPathError as CheckpointPathError
from ckpt_callbacks.errors import CheckpointStorageError as CheckpointStorageError
from ckpt_callbacks.errors import CorruptCheckpointError as CorruptCheckpointError
from ckpt_callbacks.errors import PeerSaveError as PeerSaveError
from ckpt_callbacks.errors import RestoreMismatchError as RestoreMismatchError
from ckpt_callbacks.errors import ShardingRuleError as ShardingRuleError
from ckpt_callbacks.errors import StorageNotSharedError as StorageNotSharedError
from ckpt_callbacks.errors import StorageTimeoutError as StorageTimeoutError
from ckpt_callbacks.layout import Checkpoint as Checkpoint
from ckpt_callbacks.layout import open_checkpoint as open_checkpoint
from ckpt_callbacks.layout_plan import LayoutCounts as LayoutCounts
from ckpt_callbacks.layout_plan import LeafShape as LeafShape
from ckpt_callbacks.layout_plan import plan_layout as plan_layout
from ckpt_callbacks.options import SaveHandle as SaveHandle
from ckpt_callbacks.options import SaveOptions as SaveOptions
from ckpt_callbacks.options import SaveStats as SaveStats
from ckpt_callbacks.policy import CheckpointInterval as CheckpointInterval
from ckpt_callbacks.policy import Decision as Decision
from ckpt_callbacks.policy import KeepPolicy as KeepPolicy
from ckpt_callbacks.policy import SavePolicy as SavePolicy
from ckpt_callbacks.restore import restore as restore
from ckpt_callbacks.resume import CheckpointReader as CheckpointReader
from ckpt_callbacks.rules import match_partition_rules as match_partition_rules
from ckpt_callbacks.rules import shardings_from_rules as shardings_from_rules
from ckpt_callbacks.serializer import save as save
from ckpt_callbacks.serializer import save_async as save_async
from ckpt_callbacks.serializer import save_items as save_items
from ckpt_callbacks.serializer import save_items_async as save_items_async
from ckpt_callbacks.storage import StorageOptions as StorageOptions

__version__ = "0.1.0"
