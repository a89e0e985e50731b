"""One host's local directory: committed parts, each one process's set at one step.

``<root>/step_<s>/set_<j>/``: ``data.bin`` (the set's regions, back to back), ``manifest.json``
(the leaves, each region's offset, size and crc32c, the layout digest, the extras) and
``COMMITTED`` (the step, set, digest, data size and the manifest's crc32c), written in that
order, each fsynced and the last two renamed into place. A part counts only with a
``COMMITTED`` that matches its manifest and a data file of the size it names; anything else is
a part a kill interrupted, ignored by ``scan`` and deleted with its step.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> with PartWriter(root, step=3, set_index=0) as w:
...     w.write_at(0, b"abcd")
...     w.commit({"digest": "d", "save": "5a", "pieces": [], "leaves": []}, data_bytes=4)
>>> [(p.step, p.set_index, p.data_bytes) for p in scan(root)]
[(3, 0, 4)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import crc32c
import numpy as np

from ckpt_callbacks.errors import CheckpointFormatError, CorruptCheckpointError

log = logging.getLogger("ckpt_callbacks")

FORMAT = "ckpt_callbacks.local/1"
COMMITTED = "COMMITTED"
_STEP = re.compile(r"step_(0|[1-9][0-9]{0,18})")
_SET = re.compile(r"set_(0|[1-9][0-9]{0,8})")
_BLOCK = 1 << 20  # data files are written this many bytes at a time
MAX_JSON_BYTES = 64 << 20

# Test seam: called before every write (with "data", "manifest", "commit" or "delete") and may
# raise, to stand for a kill there; a "data" call comes before each block of a data file.
fault: Callable[[str], None] | None = None


def _hit(op: str) -> None:
    if fault is not None:
        fault(op)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step}")


def part_dir(root: str, step: int, set_index: int) -> str:
    return os.path.join(step_dir(root, step), f"set_{set_index}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, value: Any, op: str) -> bytes:
    raw = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    _hit(op)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return raw


class PartWriter:
    """Writes one part: data at offsets (any order), then ``commit`` (manifest, marker).

    A part already there is replaced: its marker is deleted first, so it never counts while
    the new data goes in.
    """

    def __init__(self, root: str, *, step: int, set_index: int) -> None:
        self.path = part_dir(root, step, set_index)
        self.step, self.set_index = step, set_index
        if os.path.exists(os.path.join(self.path, COMMITTED)):
            os.unlink(os.path.join(self.path, COMMITTED))
        os.makedirs(self.path, exist_ok=True)
        self._data = open(os.path.join(self.path, "data.bin"), "wb")  # noqa: SIM115 (closed by commit or close)

    def write_at(self, offset: int, data: Any) -> None:
        view: Any = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else memoryview(data).cast("B")
        self._data.seek(offset)
        for at in range(0, len(view), _BLOCK):
            _hit("data")
            self._data.write(view[at : at + _BLOCK])

    def flush(self) -> None:
        """Makes the data written so far readable through the file's path."""
        self._data.flush()

    def commit(self, manifest: dict[str, Any], *, data_bytes: int) -> None:
        """Makes the part count: data fsynced, the manifest, then the marker (each renamed)."""
        self._data.truncate(data_bytes)
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        manifest = {**manifest, "format": FORMAT, "step": self.step, "set": self.set_index, "data_bytes": data_bytes}
        raw = _write_json(os.path.join(self.path, "manifest.json"), manifest, "manifest")
        marker = {
            "step": self.step,
            "set": self.set_index,
            "save": manifest.get("save"),
            "digest": manifest.get("digest"),
            "data_bytes": data_bytes,
            "manifest_crc32c": int(crc32c.crc32c(raw)),
        }
        _write_json(os.path.join(self.path, COMMITTED), marker, "commit")
        _fsync_dir(self.path)
        _fsync_dir(os.path.dirname(self.path))

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Part:
    """A committed part found on this host."""

    step: int
    set_index: int
    digest: str
    data_bytes: int
    path: str
    save: str = ""  # the save's id: every part of one local save has the same


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointFormatError(f"{path}: over {MAX_JSON_BYTES} bytes")
    return raw, json.loads(raw)


def _committed(path: str, step: int, set_index: int) -> Part:
    """The part at ``path`` if committed and whole; raises ``CheckpointFormatError`` saying why not."""
    try:
        _, marker = _read_json(os.path.join(path, COMMITTED))
        raw, manifest = _read_json(os.path.join(path, "manifest.json"))
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: unreadable marker or manifest ({e})") from e
    expected = {"step": step, "set": set_index, "manifest_crc32c": int(crc32c.crc32c(raw))}
    if not isinstance(marker, dict) or any(marker.get(k) != v for k, v in expected.items()):
        raise CheckpointFormatError(f"{path}: {COMMITTED} does not match its manifest or its directory")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path}: manifest of another format ({str(manifest)[:80]})")
    size, digest, save = marker.get("data_bytes"), marker.get("digest"), marker.get("save")
    if not isinstance(size, int) or not isinstance(digest, str) or manifest.get("digest") != digest:
        raise CheckpointFormatError(f"{path}: {COMMITTED} names no data size or digest")
    if not isinstance(save, str) or manifest.get("save") != save:
        raise CheckpointFormatError(f"{path}: {COMMITTED} names no save id, or another than its manifest's")
    try:
        found = os.path.getsize(os.path.join(path, "data.bin"))
    except OSError as e:
        raise CheckpointFormatError(f"{path}: no data.bin ({e})") from e
    if found != size:
        raise CheckpointFormatError(f"{path}: data.bin holds {found} bytes, {COMMITTED} says {size}")
    return Part(step, set_index, digest, size, path, save)


def _numbered(path: str, pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((int(m.group(1)), os.path.join(path, n)) for n in names if (m := pattern.fullmatch(n)))


def steps(root: str) -> list[int]:
    """Every step directory under ``root``, committed or not."""
    return [s for s, _ in _numbered(root, _STEP)]


def scan(root: str, problems: list[str] | None = None) -> list[Part]:
    """The committed parts under ``root``, by step and set. Parts that do not count are left
    out; ``problems`` gets why, one line each (a part without a marker is no problem: a save
    in flight or interrupted)."""
    parts = []
    for step, sdir in _numbered(root, _STEP):
        for set_index, pdir in _numbered(sdir, _SET):
            if not os.path.exists(os.path.join(pdir, COMMITTED)):
                continue
            try:
                parts.append(_committed(pdir, step, set_index))
            except CheckpointFormatError as e:
                if problems is not None:
                    problems.append(str(e))
    return parts


def manifest(part: Part) -> dict[str, Any]:
    raw, value = _read_json(os.path.join(part.path, "manifest.json"))
    if int(crc32c.crc32c(raw)) != _read_json(os.path.join(part.path, COMMITTED))[1].get("manifest_crc32c"):
        raise CheckpointFormatError(f"{part.path}: manifest.json changed since it was committed")
    return value


def data(part: Part) -> np.ndarray:
    """The part's data file, mapped read-only (bytes are read as they are used)."""
    if part.data_bytes == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(os.path.join(part.path, "data.bin"), dtype=np.uint8, mode="r", shape=(part.data_bytes,))


def checked(buffer: Any, offset: int, nbytes: int, crc: int, where: str) -> np.ndarray:
    """``buffer[offset:offset+nbytes]`` as uint8, after its crc32c is checked."""
    view = np.asarray(buffer[offset : offset + nbytes], dtype=np.uint8)
    got = int(crc32c.crc32c(view.data)) if nbytes else 0
    if got != crc:
        raise CorruptCheckpointError(f"{where}: crc32c 0x{got:08x}, the manifest says 0x{crc:08x}")
    return view


def verify(part: Part) -> str | None:
    """Why ``part``'s data does not match its manifest's crc32c (every region read), or None."""
    try:
        rows = manifest(part)["pieces"]
        buffer = data(part)
        for leaf, _, offset, nbytes, crc in rows:
            checked(buffer, offset, nbytes, crc, f"{part.path}, region at {offset} of leaf {leaf}")
    except (CheckpointFormatError, CorruptCheckpointError, OSError, ValueError, TypeError, KeyError) as e:
        return str(e)
    return None


def delete_step(root: str, step: int) -> None:
    """Deletes a step's parts: every marker first, so a partial delete never leaves one counting;
    then the parts, and the step's directory if nothing else is in it (foreign files stay)."""
    sdir = step_dir(root, step)
    parts = _numbered(sdir, _SET)
    for _, pdir in parts:
        _hit("delete")
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(os.path.join(pdir, COMMITTED))
    for _, pdir in parts:
        if os.path.isdir(pdir) and not os.path.islink(pdir):
            shutil.rmtree(pdir, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(sdir)


CLAIMS = ".claims"


def claim(root: str, run: str, process: int) -> None:
    """Marks ``root`` as process ``process``'s in run ``run`` (claims of earlier runs go)."""
    path = os.path.join(root, CLAIMS)
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if not name.startswith(f"{run}-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
    with open(os.path.join(path, f"{run}-{process}"), "w") as f:
        f.write(str(os.getpid()))


def claimants(root: str, run: str) -> list[int]:
    """The processes of run ``run`` that claimed ``root``."""
    try:
        names = os.listdir(os.path.join(root, CLAIMS))
    except FileNotFoundError:
        return []
    return sorted(int(n.rsplit("-", 1)[1]) for n in names if n.startswith(f"{run}-") and n.rsplit("-", 1)[1].isdigit())
