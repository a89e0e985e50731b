"""ckpt_callbacks: checkpoints for JAX training loops that never stall the loop.

>>> import jax.numpy as jnp
>>> import ckpt_callbacks as cc
>>> cc.save("memory://doc/init/run-1", {"w": jnp.ones(2)}, step=1)
>>> cc.find_latest_checkpoint("memory://doc/init")
'memory://doc/init/run-1'
"""

from ckpt_callbacks import interop as _interop  # noqa: F401  registers the orbax source with restoring
from ckpt_callbacks.directory import Checkpoint as Checkpoint
from ckpt_callbacks.directory import CheckpointInfo as CheckpointInfo
from ckpt_callbacks.directory import open_checkpoint as open_checkpoint
from ckpt_callbacks.errors import CheckpointError as CheckpointError
from ckpt_callbacks.errors import CheckpointExistsError as CheckpointExistsError
from ckpt_callbacks.errors import CheckpointFormatError as CheckpointFormatError
from ckpt_callbacks.errors import CheckpointNotFoundError as CheckpointNotFoundError
from ckpt_callbacks.errors import CheckpointPathError as CheckpointPathError
from ckpt_callbacks.errors import CheckpointStorageError as CheckpointStorageError
from ckpt_callbacks.errors import CorruptCheckpointError as CorruptCheckpointError
from ckpt_callbacks.errors import DeletedArrayError as DeletedArrayError
from ckpt_callbacks.errors import MissingFileError as MissingFileError
from ckpt_callbacks.errors import PeerSaveError as PeerSaveError
from ckpt_callbacks.errors import RestoreMismatchError as RestoreMismatchError
from ckpt_callbacks.errors import ShardingRuleError as ShardingRuleError
from ckpt_callbacks.errors import StorageNotSharedError as StorageNotSharedError
from ckpt_callbacks.errors import StorageTimeoutError as StorageTimeoutError
from ckpt_callbacks.interop import export_safetensors as export_safetensors
from ckpt_callbacks.layouts import LayoutCounts as LayoutCounts
from ckpt_callbacks.layouts import LeafShape as LeafShape
from ckpt_callbacks.layouts import plan_layout as plan_layout
from ckpt_callbacks.manager import CheckpointCallback as CheckpointCallback
from ckpt_callbacks.manager import Checkpointer as Checkpointer
from ckpt_callbacks.manager import CheckpointInterval as CheckpointInterval
from ckpt_callbacks.manager import CheckpointReader as CheckpointReader
from ckpt_callbacks.manager import Decision as Decision
from ckpt_callbacks.manager import KeepPolicy as KeepPolicy
from ckpt_callbacks.manager import LocalTier as LocalTier
from ckpt_callbacks.manager import SavePolicy as SavePolicy
from ckpt_callbacks.manager import ScalarWriter as ScalarWriter
from ckpt_callbacks.manager import discover as list_checkpoints  # ours and an orbax run's steps
from ckpt_callbacks.manager import find_latest_checkpoint as find_latest_checkpoint
from ckpt_callbacks.restoring import VerifyProblem as VerifyProblem
from ckpt_callbacks.restoring import VerifyReport as VerifyReport
from ckpt_callbacks.restoring import match_partition_rules as match_partition_rules
from ckpt_callbacks.restoring import restore as restore
from ckpt_callbacks.restoring import shardings_from_rules as shardings_from_rules
from ckpt_callbacks.restoring import verify as verify
from ckpt_callbacks.saving import SaveHandle as SaveHandle
from ckpt_callbacks.saving import SaveOptions as SaveOptions
from ckpt_callbacks.saving import SaveStats as SaveStats
from ckpt_callbacks.saving import save as save
from ckpt_callbacks.saving import save_async as save_async
from ckpt_callbacks.saving import save_items as save_items
from ckpt_callbacks.saving import save_items_async as save_items_async
from ckpt_callbacks.storage import StorageOptions as StorageOptions

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointCallback",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointInterval",
    "CheckpointNotFoundError",
    "CheckpointPathError",
    "CheckpointReader",
    "CheckpointStorageError",
    "Checkpointer",
    "CorruptCheckpointError",
    "Decision",
    "DeletedArrayError",
    "KeepPolicy",
    "LayoutCounts",
    "LeafShape",
    "LocalTier",
    "MissingFileError",
    "PeerSaveError",
    "RestoreMismatchError",
    "SaveHandle",
    "SaveOptions",
    "SavePolicy",
    "SaveStats",
    "ScalarWriter",
    "ShardingRuleError",
    "StorageNotSharedError",
    "StorageOptions",
    "StorageTimeoutError",
    "VerifyProblem",
    "VerifyReport",
    "find_latest_checkpoint",
    "list_checkpoints",
    "match_partition_rules",
    "open_checkpoint",
    "plan_layout",
    "restore",
    "save",
    "save_async",
    "save_items",
    "save_items_async",
    "shardings_from_rules",
    "verify",
]
