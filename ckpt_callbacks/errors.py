"""Named exceptions of ckpt_callbacks.

Each subclasses the builtin a caller would already catch, so
``except FileNotFoundError`` keeps working around a missing checkpoint:

>>> from ckpt_callbacks.errors import CheckpointNotFoundError
>>> issubclass(CheckpointNotFoundError, FileNotFoundError)
True
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint at the given path."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists where a save was asked to write."""


class CheckpointFormatError(CheckpointError, ValueError):
    """Metadata or manifest is malformed, or of a format version this reader refuses."""


class CorruptCheckpointError(CheckpointError, OSError):
    """Stored bytes do not match the checksums recorded at save time.

    ``leaf`` and ``chunk`` (its manifest key, ``"0.1"``) name what failed where one chunk did
    (else None).
    """

    def __init__(self, *args: object, leaf: str | None = None, chunk: str | None = None) -> None:
        super().__init__(*args)
        self.leaf, self.chunk = leaf, chunk


class MissingFileError(CorruptCheckpointError):
    """A file a committed checkpoint needs (a chunk, pack, data or index file, a manifest) is gone."""


class DeletedArrayError(CheckpointError, ValueError):
    """A leaf of the tree to save is a deleted ``jax.Array`` (``x.delete()``, or donated to a
    jitted step): nothing was written."""


class ShardingRuleError(CheckpointError, ValueError):
    """Partition rules or shardings do not fit a leaf (rank, divisibility, mesh axes)."""


class RestoreMismatchError(CheckpointError, ValueError):
    """The checkpoint and the requested template or keys disagree (missing, unexpected, shape)."""


class CheckpointPathError(CheckpointError, ValueError):
    """A checkpoint path or URL that is malformed or of an unsupported scheme."""


class CheckpointStorageError(CheckpointError, OSError, ValueError):
    """Storage refused an operation (disk full, read-only, permission): ``errno`` and ``filename`` set.

    Also a ``ValueError``, which is what TensorStore raises for the same failures.
    """


class StorageNotSharedError(CheckpointError, OSError):
    """Processes of one run do not see the same storage (a local path on several hosts)."""


class StorageTimeoutError(CheckpointStorageError, TimeoutError):
    """A storage operation did not finish within its bound (``StorageOptions.op_timeout_s``)."""


class PeerSaveError(CheckpointStorageError):
    """Another process of a multi-process save failed, so no process commits; names that process."""
