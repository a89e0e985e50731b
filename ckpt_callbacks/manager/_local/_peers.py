"""Moving sets between processes with JAX's own collectives: ``ppermute`` in budget rounds.

A *frame* is what one process sends one peer: a 64-byte header (magic, step, set index,
layout digest), the set's data, then every region's crc32c. It is cut into rounds of
``Peers.round_bytes``; each round is one jitted ``shard_map(ppermute)`` over a private
``("proc", "dev")`` mesh of every device, each process contributing ``round_bytes`` split over
its devices. Every process takes part in every round (a process that sends nothing sends
zeros), so every process must dispatch the same rounds in the same order, from the thread
that dispatches the train steps: a round dispatched from another thread can deadlock
against the step's own collectives. Only the receiving side's drain (device to host, host to
disk) may run in the background.

Nothing else crosses between processes: sizes and round counts are computed by every process
from the layout, and the receiver checks the header and every region's crc32c.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import crc32c
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ckpt_callbacks.errors import CorruptCheckpointError

_HEADER = struct.Struct("<4sIQI32s8s4x")  # 64 bytes: magic, version, step, set, digest, save id
_MAGIC = b"CCLT"
HEADER_BYTES = _HEADER.size


def header(step: int, set_index: int, digest: str, save: str) -> bytes:
    return _HEADER.pack(_MAGIC, 1, step, set_index, bytes.fromhex(digest), bytes.fromhex(save))


def check_header(raw: bytes, step: int, set_index: int, digest: str, save: str, *, where: str) -> None:
    magic, version, got_step, got_set, got_digest, got_save = _HEADER.unpack(bytes(raw))
    got = (magic, version, got_step, got_set, got_digest.hex(), got_save.hex())
    if got != (_MAGIC, 1, step, set_index, digest, save):
        raise CorruptCheckpointError(
            f"{where}: the peer sent set {got_set} of step {got_step} (digest {got_digest.hex()[:12]}, save "
            f"{got_save.hex()}), expected set {set_index} of step {step} (digest {digest[:12]}, save {save})"
        )


def frame_bytes(data_bytes: int, regions: int) -> int:
    return HEADER_BYTES + data_bytes + 4 * regions


class Lazy:
    """A frame segment of known size whose bytes come later (a future's result)."""

    def __init__(self, future: Any, size: int) -> None:
        self.future, self.size = future, size

    def __len__(self) -> int:
        return self.size

    def bytes(self) -> np.ndarray:
        return np.frombuffer(self.future.result(), np.uint8)


def _as_bytes(segment: Any) -> Any:
    if isinstance(segment, Lazy):
        return segment.bytes()
    if isinstance(segment, np.ndarray):
        return segment.reshape(-1).view(np.uint8)
    return np.frombuffer(segment, np.uint8)


class Frame:
    """What one process sends: segments (byte strings, arrays, ``Lazy``) read as one sequence."""

    def __init__(self, segments: Sequence[Any]) -> None:
        self.segments = list(segments)
        self.sizes = [s.nbytes if isinstance(s, np.ndarray) else len(s) for s in self.segments]
        self.size = sum(self.sizes)

    def cut(self, start: int, out: np.ndarray) -> None:
        """Fills ``out`` with bytes ``start:start+len(out)`` (zeros past the end)."""
        want, pos = len(out), 0
        out[:] = 0
        for seg, n in zip(self.segments, self.sizes, strict=True):
            lo, hi = max(start, pos), min(start + want, pos + n)
            if lo < hi:
                out[lo - start : hi - start] = _as_bytes(seg)[lo - pos : hi - pos]
            pos += n
            if pos >= start + want:
                break


def crcs_of(blobs: Sequence[Any]) -> bytes:
    """Every blob's crc32c, little-endian uint32s: a frame's trailer."""
    return struct.pack(f"<{len(blobs)}I", *(int(crc32c.crc32c(_as_bytes(b).data)) for b in blobs))


class Peers:
    """A private ``("proc", "dev")`` mesh over every device, and one program per pair set."""

    def __init__(self, budget_bytes: int) -> None:
        n = jax.process_count()
        rows = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(n)]
        counts = sorted({len(r) for r in rows})
        if len(counts) != 1:
            raise ValueError(f"peer replicas need as many devices on every process; found {counts}")
        self.processes, self.devices_per_process = n, counts[0]
        self.chunk = max(64, budget_bytes // self.devices_per_process)
        self.round_bytes = self.chunk * self.devices_per_process
        self.mesh = Mesh(np.array(rows), ("proc", "dev"))
        self.sharding = NamedSharding(self.mesh, PartitionSpec("proc", "dev"))
        self.local = rows[jax.process_index()]
        self._programs: dict[tuple[tuple[int, int], ...], Callable[[Any], Any]] = {}

    def rounds(self, frame_sizes: Sequence[int]) -> int:
        return max((math.ceil(s / self.round_bytes) for s in frame_sizes), default=0)

    def _program(self, pairs: tuple[tuple[int, int], ...]) -> Callable[[Any], Any]:
        if pairs not in self._programs:
            spec = PartitionSpec("proc", "dev")

            def body(x: Any) -> Any:
                return jax.lax.ppermute(x, "proc", list(pairs))

            mapped = jax.shard_map(body, mesh=self.mesh, in_specs=spec, out_specs=spec)
            self._programs[pairs] = jax.jit(mapped, donate_argnums=0)
        return self._programs[pairs]

    def dispatch(self, pairs: tuple[tuple[int, int], ...], frame: Frame | None, round_index: int) -> Any:
        """Dispatches round ``round_index`` of ``frame`` (None: this process sends nothing) to
        its pair; returns the output without waiting. The staging buffer is fresh each round
        (a host buffer ``device_put`` reads asynchronously is never reused)."""
        buf = np.zeros(self.round_bytes, np.uint8)
        if frame is not None:
            frame.cut(round_index * self.round_bytes, buf)
        c = self.chunk
        arrays = [jax.device_put(buf[i * c : (i + 1) * c].reshape(1, 1, c), d) for i, d in enumerate(self.local)]
        shape = (self.processes, self.devices_per_process, c)
        x = jax.make_array_from_single_device_arrays(shape, self.sharding, arrays)
        return self._program(pairs)(x)

    @staticmethod
    def received(out: Any) -> np.ndarray:
        """A round's bytes on this process (blocks until they are there)."""
        shards = sorted(out.addressable_shards, key=lambda s: s.index[1].start)
        return np.concatenate([np.asarray(s.data).reshape(-1) for s in shards])


def pair_calls(pairs: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], ...]]:
    """(holder, receiver) pairs grouped so that no process sends or receives twice in a call.

    >>> pair_calls([(3, 2), (3, 1), (0, 1)])
    [((0, 1), (3, 2)), ((3, 1),)]
    """
    calls: list[list[tuple[int, int]]] = []
    for src, dst in sorted(pairs):
        for call in calls:
            if all(src != s and dst != d for s, d in call):
                call.append((src, dst))
                break
        else:
            calls.append([(src, dst)])
    return [tuple(sorted(c)) for c in calls]
