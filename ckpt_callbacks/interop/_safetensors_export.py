"""Export of a committed checkpoint to safetensors files, streamed within a host-memory budget.

    files = cc.export_safetensors("ckpts/run-0/step_1000", "serve/", dtype=jnp.bfloat16)

Any checkpoint ``restore`` reads (ours, either layout, written by any number of processes;
orbax's) becomes Hugging Face style files: ``model.safetensors`` when everything fits in one
file of ``max_file_bytes``, else ``model-0000N-of-0000M.safetensors`` plus
``model.safetensors.index.json`` (``weight_map``, ``metadata.total_size``). Tensors are named by
their '.'-joined key paths, unless a ``rename`` rule says otherwise.

Nothing holds the checkpoint in memory: each tensor is read in pieces (bands of whole chunk
rows, or single chunks where a band is too big), every chunk checked against its crc32c as it
arrives, and each piece goes straight to its place in the output file while the next is read.
At most two batches of ``max_host_bytes / 3`` are held at once. Files are written under
temporary names and renamed once every file is whole; the index comes last.

>>> export_name(("params", "Dense_0", "kernel"))
'params.Dense_0.kernel'
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ckpt_callbacks import format as fmt
from ckpt_callbacks import restoring
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointExistsError, CheckpointFormatError, CheckpointPathError
from ckpt_callbacks.interop import _safetensors_format as st
from ckpt_callbacks.storage import StorageOptions

log = logging.getLogger("ckpt_callbacks")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")
META_KEY = "ckpt_callbacks"  # our entry of each file's __metadata__: key paths, scalars
DEFAULT_MAX_HOST_BYTES = 256 << 20
MAX_KEY_BYTES = 4096  # a PRNG key's data (as JSON) larger than this is refused, not put in the header
Region = tuple[tuple[int, int], ...]


def export_name(path: fmt.KeyPath) -> str:
    """A tensor's default name: its key path's components joined by '.'."""
    return ".".join(str(c) for c in path)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    record: fmt.LeafRecord
    name: str
    dtype: np.dtype  # as written
    file: int = 0
    offset: int = 0  # of its first byte in its file

    @property
    def nbytes(self) -> int:
        return math.prod(self.record.data_shape) * self.dtype.itemsize


def _renamer(rename: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    try:
        rules = [(re.compile(pattern), template) for pattern, template in rename]
    except (TypeError, ValueError, re.error) as e:
        raise ValueError(f"rename={rename!r}: expected [(regex, replacement), ...]: {e}") from None

    def renamed(name: str) -> str:
        for regex, template in rules:
            if regex.search(name):
                return regex.sub(template, name, count=1)
        return name

    return renamed


def _out_dtype(record: fmt.LeafRecord, dtype: np.dtype | None, where: str) -> np.dtype:
    stored = fmt.dtype_from_name(record.dtype or record.zarr_dtype)
    out = dtype if dtype is not None and jnp.issubdtype(stored, jnp.floating) else stored
    if record.kind == "array" and out not in st.NAMES:
        raise CheckpointFormatError(
            f"{where}: leaf {record.key!r} is {out}, which safetensors has no dtype for (it has "
            f"{sorted(st.DTYPES)}); pass dtype= (floating leaves) or keys= without it"
        )
    return np.dtype(out)


def _check_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        out = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype={dtype!r}: expected a floating dtype safetensors has, e.g. jnp.bfloat16") from None
    if out not in st.NAMES or not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"dtype={out}: expected a floating dtype safetensors has, e.g. bfloat16, float16, float32")
    return out


def _check_out_dir(out_dir: Any, source: paths.Location, overwrite: bool) -> str:
    """The local output directory, checked: not inside the checkpoint, no export there unless
    ``overwrite`` (other files, say a model's config.json, are left alone)."""
    text = os.fspath(out_dir)
    loc = paths.parse(text)
    local = paths.local_path(loc)
    if local is None:
        raise CheckpointPathError(f"export to {loc.url}: safetensors files are written to a local directory only")
    if os.path.exists(local) and not os.path.isdir(local):
        raise CheckpointPathError(f"export to {local}: it is a file, expected a directory (or nothing there)")
    src = paths.local_path(source)
    if src is not None:
        a, b = os.path.realpath(local), os.path.realpath(src)
        if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
            raise CheckpointPathError(f"export to {local}: it overlaps the checkpoint read ({src}); pick another")
    if os.path.isdir(local):
        ours = sorted(n for n in os.listdir(local) if n in (INDEX, SINGLE) or SHARD.fullmatch(n))
        if ours and not overwrite:
            raise CheckpointExistsError(
                f"export to {local}: it holds an export already ({', '.join(ours[:3])}); pass overwrite=True "
                "(the CLI: --overwrite) to replace it, or pick an empty directory"
            )
    return local


def _scalar_entries(records: Sequence[fmt.LeafRecord], read: Any, rename: Callable[[str], str]) -> dict[str, Any]:
    """Non-array leaves for the header: scalars as they were saved, PRNG keys as their data."""
    out: dict[str, Any] = {}
    keys = [r for r in records if r.kind == "prng_key"]
    datas = read(keys, [restoring.Target(None) for _ in keys], 1 << 20) if keys else []
    for record in records:
        if record.kind == "scalar":
            out[rename(export_name(record.path))] = {
                "path": list(record.path),
                "value": record.value,
                "value_type": record.value_type,
            }
    for record, data in zip(keys, datas, strict=True):
        entry = {"path": list(record.path), "value": np.asarray(data).tolist(), "value_type": "prng_key"}
        entry["impl"] = record.key_impl
        if len(json.dumps(entry)) > MAX_KEY_BYTES:
            raise CheckpointFormatError(
                f"leaf {record.key!r}: a PRNG key array of shape {record.shape} is too large for the header's "
                f"__metadata__ ({MAX_KEY_BYTES} bytes at most); pass keys= without it"
            )
        out[rename(export_name(record.path))] = entry
    return out


def _files(tensors: list[_Tensor], max_file_bytes: int) -> list[list[_Tensor]]:
    """Tensors in tree order, a new file when the next would pass ``max_file_bytes``."""
    files: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if files[-1] and size + t.nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += t.nbytes
    return files


def _pieces(t: _Tensor, budget: int) -> list[Region]:
    """The regions a tensor is read in: runs of whole chunk rows (contiguous in the file) of
    at most ``budget`` bytes, or its chunks one by one where one chunk row is bigger."""
    shape, chunks = t.record.data_shape, t.record.chunks
    if math.prod(shape) == 0:
        return []
    if not shape:
        return [()]
    itemsize = max(t.dtype.itemsize, fmt.dtype_from_name(t.record.zarr_dtype).itemsize)
    row = math.prod(shape[1:]) * itemsize
    height = max(1, chunks[0] if chunks else shape[0])
    rows = max(1, budget // max(1, row * height)) * height
    if row * height <= budget:
        return [((a, min(a + rows, shape[0])), *((0, n) for n in shape[1:])) for a in range(0, shape[0], rows)]
    grid = [range(0, n, max(1, c)) for n, c in zip(shape, chunks, strict=True)]
    out: list[Region] = [()]
    for axis, starts in enumerate(grid):
        out = [(*r, (s, min(s + chunks[axis], shape[axis]))) for r in out for s in starts]
    return out


def _contiguous(region: Region, shape: tuple[int, ...]) -> bool:
    """Whether a region is one run of bytes in C order: whole along every axis after the first
    partial one, and a single index along every axis before it."""
    partial = [i for i, ((a, b), n) in enumerate(zip(region, shape, strict=True)) if (a, b) != (0, n)]
    if not partial:
        return True
    first = partial[0]
    before = all(b - a == 1 for (a, b) in region[:first])
    return before and all(region[i] == (0, shape[i]) for i in range(first + 1, len(shape)))


class _Writer:
    """Writes the pieces of one batch while the next is read (one thread, at most one batch
    queued, so two batches are held at most)."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-export")
        self.pending: concurrent.futures.Future[None] | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self.pending = self.pool.submit(job)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _write_piece(fd: int, tmp: str, t: _Tensor, region: Region, data: np.ndarray) -> None:
    shape = t.record.data_shape
    data = np.ascontiguousarray(data, dtype=t.dtype.newbyteorder("<"))
    if _contiguous(region, shape):
        start = sum(a * s for (a, _), s in zip(region, _strides(shape), strict=True)) * t.dtype.itemsize
        view = memoryview(data.reshape(-1).view(np.uint8).data)
        at = t.offset + start
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
        return
    mapped = np.memmap(tmp, dtype=t.dtype.newbyteorder("<"), mode="r+", offset=t.offset, shape=shape)
    try:
        mapped[tuple(slice(a, b) for a, b in region)] = data
        mapped.flush()
    finally:
        del mapped  # unmapped: its pages leave this process's memory


def _strides(shape: tuple[int, ...]) -> list[int]:
    out, at = [], 1
    for n in reversed(shape):
        out.append(at)
        at *= n
    return out[::-1]


class _Progress:
    """One line on stderr, redrawn at most 4 times a second, when stderr is a terminal."""

    def __init__(self, total: int, show: bool | None) -> None:
        self.total, self.done, self.last = total, 0, 0.0
        self.show = sys.stderr.isatty() if show is None else show

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.show and (now - self.last > 0.25 or self.done >= self.total):
            self.last = now
            pct = 100 * self.done / max(1, self.total)
            sys.stderr.write(f"\rexport: {self.done / 2**30:.2f} / {self.total / 2**30:.2f} GiB ({pct:.0f}%)")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def export_safetensors(
    path: Any,
    out_dir: Any,
    *,
    item: str = "state",
    keys: Sequence[str] | str | None = None,
    rename: Sequence[tuple[str, str]] = (),
    dtype: Any = None,
    max_file_bytes: int = 5 << 30,
    max_host_bytes: int = DEFAULT_MAX_HOST_BYTES,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage: StorageOptions | None = None,
) -> list[str]:
    """Exports a committed checkpoint's item to safetensors files in ``out_dir`` (local).

    Args:
      path: a checkpoint ``restore`` reads (ours, either layout; orbax's).
      out_dir: local directory; created if missing. One that holds an export already is
        refused unless ``overwrite``; its other files (a model's ``config.json``) are left.
      item: the item exported.
      keys: only the leaves under these '/'-joined key prefixes (as ``restore``'s ``keys``).
      rename: ``[(regex, replacement)]`` over the '.'-joined tensor names, first match wins
        (``re.sub`` once), as ``restore``'s ``rename`` over key paths.
      dtype: floating leaves are written in this dtype (``jnp.bfloat16`` for serving).
      max_file_bytes: a new file when the next tensor would pass this; a tensor bigger than it
        gets a file of its own.
      max_host_bytes: host memory for data in flight (two batches of a third of it); a single
        chunk larger than a third is still read whole (chunks are at most 256 MiB by default).
      metadata: extra ``__metadata__`` entries (str -> str) of every file, e.g.
        ``{"format": "pt"}``; by default ``{"format": "flax"}``.
      overwrite: replace an export in ``out_dir``.
      progress: a progress line on stderr (default: when stderr is a terminal).
      storage: how the checkpoint is read (retries, timeouts).

    Returns:
      The paths written: the safetensors files, then the index if there is one.

    Non-array leaves go into the header's ``__metadata__`` (entry ``"ckpt_callbacks"``, with
    every tensor's key path, so dots and slashes in keys come back exactly): scalars and
    strings as saved, PRNG keys as their key data (at most ``MAX_KEY_BYTES``; larger ones are
    refused by name: pass ``keys=`` without them). Leaves of a dtype safetensors lacks (int4,
    complex128) are refused by name before anything is written.

    Raises:
      CheckpointExistsError: ``out_dir`` holds an export and ``overwrite`` is False.
      CheckpointPathError: ``out_dir`` is not local, is a file, or overlaps the checkpoint.
      CheckpointFormatError: a leaf that cannot be exported, or two leaves renamed to one name.
      CorruptCheckpointError: a chunk fails its crc32c (nothing is left under a final name).
    """
    for name, value in (("max_file_bytes", max_file_bytes), ("max_host_bytes", max_host_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a number of bytes >= 1")
    out_dtype = _check_dtype(dtype)
    rename_fn = _renamer(rename)
    extra = {"format": "flax"} | dict(metadata or {})
    if META_KEY in extra or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError(f"metadata={metadata!r}: expected str -> str entries, without {META_KEY!r}")
    found = restoring.locate(path, item, storage)
    where = found.loc.url
    local = _check_out_dir(out_dir, found.loc, overwrite)
    records = [found.manifest.leaves[i] for i in restoring.select(found.manifest.leaves, keys, where)]
    arrays = [r for r in records if r.kind == "array"]
    tensors = [_Tensor(r, rename_fn(export_name(r.path)), _out_dtype(r, out_dtype, where)) for r in arrays]
    scalars = _scalar_entries([r for r in records if r.kind != "array"], found.read, rename_fn)
    names = [t.name for t in tensors] + list(scalars)
    clashes = sorted({n for n in names if names.count(n) > 1} | ({"__metadata__"} & set(names)))
    if clashes:
        raise CheckpointFormatError(f"{where}: export: leaves would share the tensor name(s) {clashes[:5]}; rename=")
    groups = _files(tensors, max_file_bytes)
    os.makedirs(local, exist_ok=True)
    final = (
        [SINGLE]
        if len(groups) == 1
        else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    token = uuid.uuid4().hex[:8]
    temps = [os.path.join(local, f".{name}.tmp-{token}") for name in final]
    try:
        placed = _write_files(
            found, groups, temps, scalars=scalars, extra=extra, max_host_bytes=max_host_bytes, show=progress
        )
        _commit(local, final, temps, placed)
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    written = [os.path.join(local, name) for name in final]
    return written + ([os.path.join(local, INDEX)] if len(groups) > 1 else [])


def _header(group: list[_Tensor], scalars: dict[str, Any], extra: dict[str, str]) -> bytes:
    ours: dict[str, Any] = {"version": 1, "paths": {t.name: list(t.record.path) for t in group}}
    if scalars:
        ours["scalars"] = scalars
    meta = extra | {META_KEY: json.dumps(ours, separators=(",", ":"))}
    return st.header_bytes([(t.name, t.dtype, t.record.data_shape) for t in group], meta)


def _write_files(
    found: restoring.Located,
    groups: list[list[_Tensor]],
    temps: list[str],
    *,
    scalars: dict[str, Any],
    extra: dict[str, str],
    max_host_bytes: int,
    show: bool | None,
) -> list[list[_Tensor]]:
    """Every file under its temporary name, whole and fsynced; the tensors as placed."""
    budget = max(1, max_host_bytes // 3)
    placed: list[list[_Tensor]] = []
    total = sum(t.nbytes for g in groups for t in g)
    progress = _Progress(total, show)
    writer = _Writer()
    try:
        for index, (group, tmp) in enumerate(zip(groups, temps, strict=True)):
            header = _header(group, scalars if index == 0 else {}, extra)
            at, laid = len(header), []
            for t in group:
                laid.append(dataclasses.replace(t, file=index, offset=at))
                at += t.nbytes
            placed.append(laid)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, at)
                _stream(found, laid, fd, tmp, budget=budget, writer=writer, progress=progress)
                writer.wait()
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        writer.close()
    return placed


def _stream(
    found: restoring.Located,
    tensors: list[_Tensor],
    fd: int,
    tmp: str,
    *,
    budget: int,
    writer: _Writer,
    progress: _Progress,
) -> None:
    """Reads the tensors of one file in batches of at most ``budget`` bytes (distinct leaves
    per batch), each batch written while the next is read."""
    batch: list[tuple[_Tensor, list[Region]]] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        records = [t.record for t, _ in batch]
        targets = [restoring.Target(None, dtype=t.dtype, regions=tuple(regions)) for t, regions in batch]
        values = found.read(records, targets, budget)
        jobs = [(t, r, got[r]) for (t, regions), got in zip(batch, values, strict=True) for r in regions]

        def write() -> None:
            for t, region, data in jobs:
                _write_piece(fd, tmp, t, region, data)
                progress.add(data.size * t.dtype.itemsize)

        writer.submit(write)
        batch, size = [], 0

    for t in tensors:
        for region in _pieces(t, budget):
            nbytes = math.prod(b - a for a, b in region) * t.dtype.itemsize
            if batch and size + nbytes > budget:
                flush()
            if batch and batch[-1][0] is t:  # tensors come one after another: a leaf once per batch
                batch[-1][1].append(region)
            else:
                batch.append((t, [region]))
            size += nbytes
    flush()


def _commit(local: str, final: list[str], temps: list[str], placed: list[list[_Tensor]]) -> None:
    """Renames the whole files into place, removes an older export's files the new one does not
    have, then writes the index (several files) last, under a temporary name renamed."""
    index_path = os.path.join(local, INDEX)
    if os.path.exists(index_path):
        os.unlink(index_path)  # an older export's index must never describe the new files
    for tmp, name in zip(temps, final, strict=True):
        os.replace(tmp, os.path.join(local, name))
    for name in os.listdir(local):
        if (name == SINGLE or SHARD.fullmatch(name)) and name not in final:
            os.unlink(os.path.join(local, name))
    if len(final) > 1:
        weight_map = {t.name: final[t.file] for group in placed for t in group}
        total = sum(t.nbytes for group in placed for t in group)
        body = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
        tmp = os.path.join(local, f".{INDEX}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index_path)
    dir_fd = os.open(local, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
