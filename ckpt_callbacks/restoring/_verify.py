"""Verify a committed checkpoint end to end: every chunk of every item re-read against its crc32c.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/verify/run-3", {"w": jnp.zeros(2)}, step=3)
>>> verify("memory://doc/verify/run-3").ok
True
>>> save("memory://doc/verify/run-4", {"w": jnp.ones(2)}, step=4, pack_bytes=0)
>>> paths.delete_entry(paths.parse("memory://doc/verify/run-4/state/w/c"), "0")  # a chunk file lost
>>> [(p.kind, p.leaf, p.chunk) for p in verify("memory://doc/verify/run-4").problems]
[('missing', 'w', '0')]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ckpt_callbacks import directory as layout
from ckpt_callbacks import layouts
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, MissingFileError
from ckpt_callbacks.restoring._reads import read_leaves
from ckpt_callbacks.restoring._targets import Target

ProblemKind = Literal["missing", "corrupt", "invalid"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifyProblem:
    """One thing ``verify`` found wrong, as ``ckpt-callbacks verify --json`` reports it.

    ``kind``: "missing" (a file the checkpoint needs is gone), "corrupt" (bytes that fail their
    crc32c, a short file) or "invalid" (a marker, metadata or manifest that fails validation);
    ``leaf`` and ``chunk``: where, when one leaf or one chunk of it is to blame (else None).
    ``str(problem)`` is its message.
    """

    kind: ProblemKind
    leaf: str | None = None
    chunk: str | None = None
    message: str

    def __post_init__(self) -> None:
        if self.kind not in ("missing", "corrupt", "invalid"):
            raise ValueError(f"VerifyProblem kind {self.kind!r}: expected 'missing', 'corrupt' or 'invalid'")

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, error: CheckpointError, leaf: str | None = None) -> VerifyProblem:
        """The problem an error of a read stands for (``leaf``: the leaf being read, if the error names none)."""
        if isinstance(error, MissingFileError):
            kind: ProblemKind = "missing"
        else:
            kind = "corrupt" if isinstance(error, CorruptCheckpointError) else "invalid"
        leaf = getattr(error, "leaf", None) or leaf
        return cls(kind=kind, leaf=leaf, chunk=getattr(error, "chunk", None), message=" ".join(str(error).split()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """What ``verify`` re-read and what it found wrong (an empty ``problems`` means intact)."""

    path: str
    leaves: int
    chunks: int
    bytes_read: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Any) -> VerifyReport:
    """Re-reads every chunk of every item of a committed checkpoint and checks its crc32c.

    Everything ``restore`` would refuse is reported as a problem, never raised: a marker,
    metadata or manifest that fails validation, a missing or short file, a checksum
    mismatch. Only a path holding no committed checkpoint raises ``CheckpointNotFoundError``.
    """
    target = path if isinstance(path, layout.Checkpoint) else paths.parse(path)
    try:
        ckpt = layout.open_checkpoint(target)
    except CheckpointNotFoundError:
        raise
    except CheckpointError as e:
        return VerifyReport(path=target.url, leaves=0, chunks=0, bytes_read=0, problems=(VerifyProblem.of(e),))
    leaves = chunks = nbytes = 0
    problems: list[VerifyProblem] = []
    for item in ckpt.items:
        try:
            manifest = ckpt.manifest(item)
        except CheckpointError as e:
            problems.append(VerifyProblem.of(e))
            continue
        item_loc = ckpt.item_loc(item)
        try:  # each pack file read once; in the process layout, every index file (checked) first
            records, packs = layouts.locate(item_loc, manifest)
        except CheckpointError as e:
            problems.append(VerifyProblem.of(e))
            continue
        for record in records:
            if record.kind == "scalar":
                continue
            leaves += 1
            try:
                read_leaves(item_loc, [record], [Target(None, None)], packs=packs)
            except CheckpointError as e:
                problems.append(VerifyProblem.of(e, record.key))
                continue
            chunks += len(record.crc32c)
            nbytes += record.nbytes
    return VerifyReport(path=ckpt.url, leaves=leaves, chunks=chunks, bytes_read=nbytes, problems=tuple(problems))
