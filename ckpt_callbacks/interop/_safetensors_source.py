"""safetensors files and directories as a ``restoring`` source (issue 23, "Read"), registered
after orbax when ``interop`` is imported.

Recognised, on local disk or at a URL (``memory://``, ``s3://``...: headers and tensors read
by TensorStore byte ranges): one ``*.safetensors`` file; a directory with one
``*.safetensors.index.json`` (Hugging Face's ``{"metadata": {"total_size": N},
"weight_map": {tensor: file}}``), the files its map names; a directory of ``*.safetensors``
files without an index, all of them (a numbered set ``model-00001-of-00003.safetensors`` must
be whole). Every header, index and shard set is
checked before use. Each tensor is one array leaf; its key path is the one our exporter
recorded in ``__metadata__["ckpt_callbacks"]``, else its name split on ``'.'`` (a flat tree
``{name: leaf}`` if splitting clashes). Reads fetch each region's bytes only (its C-order
runs, neighbours coalesced; ``os.preadv`` on local disk), counted in ``READ_STATS``.

>>> runs((4, 6), 4, ((1, 3), (0, 6)))  # rows 1-2 of a 4x6 float32: one run of 48 bytes at 24
([24], 48)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import tensorstore as ts

from ckpt_callbacks import format as fmt
from ckpt_callbacks import restoring
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointFormatError, CorruptCheckpointError
from ckpt_callbacks.format import show
from ckpt_callbacks.format._schema import check_scalar
from ckpt_callbacks.interop import _safetensors_format as stf
from ckpt_callbacks.interop._orbax_metadata import Entry, build_tree
from ckpt_callbacks.interop._safetensors_reads import READ_STATS, _Handle, _LocalFile, read_region, runs, spans  # noqa: F401

log = logging.getLogger("ckpt_callbacks")

SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20
META_KEY = "ckpt_callbacks"  # our exporter's entry in a header's __metadata__
_SET_NAME = re.compile(r"(.+)-([0-9]{1,6})-of-([0-9]{1,6})\.safetensors")


def _temporary(name: str) -> bool:
    return name.startswith(".") or ".tmp" in name


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _listing(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if not _temporary(e.name) and _regular(os.path.join(root, e.name)))


class _LocalDir:
    """A local directory of safetensors files: ids are local paths."""

    def __init__(self, root: str) -> None:
        self.root = root

    def join(self, name: str) -> str:
        return os.path.join(self.root, name)

    def names(self) -> list[str]:
        return _listing(self.root)

    def is_file(self, file: str) -> bool:
        return _regular(file)

    def read_small(self, file: str, limit: int) -> bytes:
        with open(file, "rb") as f:
            return f.read(limit + 1)

    def header(self, file: str) -> stf.Header:
        return stf.read_header(file)

    def open(self, file: str) -> _Handle:
        if not _regular(file):
            raise CorruptCheckpointError(f"{file}: expected a regular safetensors file, found none")
        return _LocalFile(os.open(file, os.O_RDONLY))


class _RemoteDir:
    """A directory of safetensors objects in a store (``memory://``, ``s3://``, ...) read by
    TensorStore byte ranges: ids are URLs."""

    def __init__(self, loc: paths.Location) -> None:
        self.loc = loc
        self.kv = ts.KvStore.open(paths.kvstore_spec(loc), context=paths.context()).result()

    def join(self, name: str) -> str:
        return self.loc.join(name).url

    def key(self, file: str) -> str:
        return file[len(self.loc.url) :].lstrip("/")

    def names(self) -> list[str]:
        return sorted(n for n in paths.list_entries(self.loc) if not _temporary(n))

    def is_file(self, file: str) -> bool:
        return self.range(file, 0, 1) is not None

    def range(self, file: str, start: int, stop: int) -> bytes | None:
        """Bytes [start, stop) of an object; None where the object is shorter or missing."""
        try:
            result = self.kv.read(self.key(file), byte_range=slice(start, stop)).result()
        except ValueError as e:
            if "OUT_OF_RANGE" in str(e):
                return None
            raise paths.as_storage_error(e, file) from e
        return bytes(result.value) if result.state == "value" else None

    def read_small(self, file: str, limit: int) -> bytes:
        raw = paths.read_bytes(self.loc, self.key(file))
        return b"" if raw is None else raw[: limit + 1]

    def header(self, file: str) -> stf.Header:
        head = self.range(file, 0, 8) or b""
        n = stf.header_length(file, head, 8 + stf.MAX_HEADER_BYTES if len(head) == 8 else len(head))
        raw = self.range(file, 8, 8 + n)
        if raw is None:
            raise stf._refuse(file, f"a header of {n} bytes, in a shorter object")
        size = 8 + n + _declared_data(file, raw)
        if (size > 8 + n and self.range(file, size - 1, size) is None) or self.range(file, size, size + 1) is not None:
            raise stf._refuse(file, f"its header declares {size} bytes, the object holds another number")
        return stf.parse_header(file, raw, size)

    def open(self, file: str) -> _Handle:
        return _RemoteFile(self, file)


class _RemoteFile:
    def __init__(self, store: _RemoteDir, file: str) -> None:
        self.store, self.file = store, file

    def readinto(self, view: memoryview, offset: int) -> int:
        raw = self.store.range(self.file, offset, offset + len(view))
        if raw is None:
            return 0
        view[: len(raw)] = raw
        return len(raw)

    def close(self) -> None:
        pass


def _declared_data(file: str, raw: bytes) -> int:
    """The data bytes a header claims (the largest tensor end), to size the object by."""
    value = stf._parse(file, raw)
    ends = [
        e["data_offsets"][1]
        for k, e in value.items()
        if k != "__metadata__" and isinstance(e, dict) and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2 and stf._int(e["data_offsets"][1]) and e["data_offsets"][1] >= 0
    ]  # fmt: skip
    return max(ends, default=0)


_Dir = _LocalDir | _RemoteDir


def _index_json(store: _Dir, path: str) -> dict[str, Any]:
    """The checked index: bounded, a JSON object without duplicate keys, its fields typed."""
    raw = store.read_small(path, MAX_INDEX_BYTES)
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{path}: an index of more than {MAX_INDEX_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=stf._no_duplicates)
    except (ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{path}: expected a JSON object, found unreadable JSON ({str(e)[:200]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(
            f"{path}: expected an object with a weight_map of tensor -> file, found {show(data)}"
        )
    for name, file in weight_map.items():
        if not file.endswith(SUFFIX) or any(c in file for c in "/\\\0") or file.startswith(".") or _temporary(file):
            raise CheckpointFormatError(
                f"{path}: weight_map[{show(name)}] = {show(file)}; expected a *.safetensors file name in its directory"
            )
    meta = data.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path}: metadata: expected an object, found {show(meta)}")
    return data


def _set_files(root: str, names: Sequence[str]) -> None:
    """A numbered shard set (``model-00002-of-00003``) with a member missing is refused."""
    sets: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
    for name in names:
        m = _SET_NAME.fullmatch(name)
        if m:
            sets[(m.group(1), int(m.group(3)))].add(int(m.group(2)))
    for (prefix, total), have in sorted(sets.items()):
        missing = sorted(set(range(1, total + 1)) - have)
        if missing or not have <= set(range(1, total + 1)):
            raise CorruptCheckpointError(
                f"{root}: the shard set {prefix}-*-of-{total}{SUFFIX} is not whole: expected shards 1..{total}, "
                f"found {sorted(have)} (missing {missing})"
            )


class _Files:
    """The checked headers of a file set, and each tensor's file."""

    def __init__(self, where: str, store: _Dir, files: Sequence[str]) -> None:
        self.where, self.store = where, store
        self.headers = {path: store.header(path) for path in files}
        self.tensors: dict[str, tuple[str, stf.TensorInfo]] = {}
        for path, header in self.headers.items():
            for name, info in header.tensors.items():
                if name in self.tensors:
                    raise CheckpointFormatError(
                        f"{where}: tensor {name!r} is in two files: {self.tensors[name][0]} and {path}"
                    )
                self.tensors[name] = (path, info)


def _check_index(index: str, data: dict[str, Any], found: _Files) -> None:
    weight_map: dict[str, str] = data["weight_map"]
    for name, file in weight_map.items():
        path = found.store.join(file)
        if name not in found.headers[path].tensors:
            raise CheckpointFormatError(f"{index}: weight_map names tensor {name!r} in {path}, which does not hold it")
    extra = sorted(set(found.tensors) - set(weight_map))
    if extra:
        raise CheckpointFormatError(
            f"{index}: {len(extra)} tensors in the files are not in its weight_map (e.g. {extra[:3]}, in "
            f"{found.tensors[extra[0]][0]}); expected every tensor listed"
        )
    total = data.get("metadata", {}).get("total_size")
    actual = sum(info.stop - info.start for _, info in found.tensors.values())
    if total is not None and total != actual:
        raise CheckpointFormatError(f"{index}: metadata.total_size is {show(total)}, the tensors hold {actual} bytes")


def _from_index(store: _Dir, index: str) -> _Files:
    data = _index_json(store, index)
    files = sorted({store.join(f) for f in data["weight_map"].values()})
    for path in files:
        if not store.is_file(path):
            raise CheckpointFormatError(f"{index}: its weight_map names {path}, expected a file, found none")
    found = _Files(index, store, files)
    _check_index(index, data, found)
    return found


def _files_in(store: _Dir, where: str) -> _Files | None:
    """The file set of a directory (None: no safetensors there)."""
    names = store.names()
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1 and DEFAULT_INDEX not in indexes:
        raise CheckpointFormatError(f"{where}: several indexes {indexes}; expected one, or {DEFAULT_INDEX}")
    if indexes:
        return _from_index(store, store.join(DEFAULT_INDEX if len(indexes) > 1 else indexes[0]))
    files = [n for n in names if n.endswith(SUFFIX)]
    if not files:
        return None
    _set_files(where, files)
    return _Files(where, store, [store.join(n) for n in files])


def _files_at(loc: paths.Location) -> _Files | None:
    """The file set at a local path or URL (None: no safetensors there)."""
    local = paths.local_path(loc)
    if local is not None:
        if _regular(local):
            return _Files(local, _LocalDir(os.path.dirname(local)), [local]) if local.endswith(SUFFIX) else None
        return _files_in(_LocalDir(local), local) if os.path.isdir(local) else None
    if loc.url.endswith(SUFFIX):
        parent, _, name = loc.url.rpartition("/")
        store = _RemoteDir(paths.parse(parent, loc.options))
        if store.is_file(loc.url):
            return _Files(loc.url, store, [store.join(name)])
    return _files_in(_RemoteDir(loc), loc.url)


def _key_path(value: Any, at: str) -> fmt.KeyPath:
    ok = isinstance(value, list) and 1 <= len(value) <= fmt.MAX_DEPTH
    ok = ok and all(
        (isinstance(k, str) and len(k) <= fmt.MAX_STR) or (type(k) is int and 0 <= k < 1 << 31) for k in value
    )
    if not ok:
        raise CheckpointFormatError(
            f"{at}: expected a key path of 1 to {fmt.MAX_DEPTH} str or int keys, found {show(value)}"
        )
    return tuple(value)


def _ours(path: str, header: stf.Header) -> tuple[dict[str, fmt.KeyPath], list[fmt.LeafRecord]]:
    """Our exporter's key paths and scalar leaves from a header's ``__metadata__`` (if any)."""
    raw = header.metadata.get(META_KEY)
    if raw is None:
        return {}, []
    at = f"{path}: __metadata__[{META_KEY!r}]"
    try:
        data = json.loads(raw, object_pairs_hook=stf._no_duplicates)
    except (ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{at}: expected a JSON object, found unreadable JSON ({str(e)[:200]})") from None
    keys, scalars = (data.get("paths", {}), data.get("scalars", {})) if isinstance(data, dict) else (None, None)
    if not isinstance(keys, dict) or not isinstance(scalars, dict):
        raise CheckpointFormatError(f"{at}: expected an object with objects 'paths' and 'scalars', found {show(data)}")
    out = {str(name): _key_path(p, f"{at}: paths[{show(name)}]") for name, p in keys.items()}
    records = []
    for name, entry in scalars.items():
        where = f"{at}: scalars[{show(name)}]"
        if not isinstance(entry, dict) or set(entry) != {"path", "value", "value_type"}:
            raise CheckpointFormatError(f"{where}: expected path, value and value_type, found {show(entry)}")
        try:
            check_scalar(entry["value"], entry["value_type"])
        except ValueError as e:
            raise CheckpointFormatError(f"{where}: {e}") from None
        key = _key_path(entry["path"], where)
        records.append(fmt.LeafRecord(path=key, kind="scalar", value=entry["value"], value_type=entry["value_type"]))
    return out, records


def _record(path: fmt.KeyPath, name: str, info: stf.TensorInfo) -> fmt.LeafRecord:
    dtype = info.dtype.name
    chunks = tuple(max(n, 1) for n in info.shape)
    return fmt.LeafRecord(
        path=path, kind="array", source="jax", shape=info.shape, dtype=dtype, stored_dtype=dtype,
        zarr_dtype=dtype, chunks=chunks, array=name,
    )  # fmt: skip


def _order(entry: Entry) -> tuple[tuple[bool, int, str], ...]:
    return tuple((isinstance(k, str), k if isinstance(k, int) else 0, str(k)) for k in entry.path)


def manifest_of(found: _Files) -> tuple[fmt.Manifest, dict[fmt.KeyPath, tuple[str, stf.TensorInfo]]]:
    """The manifest of a file set, and each array leaf's file and tensor."""
    named: dict[str, fmt.KeyPath] = {}
    scalars: list[fmt.LeafRecord] = []
    for path, header in found.headers.items():
        keys, more = _ours(path, header)
        named.update(keys)
        scalars += more
    split = {name: named.get(name) or tuple(name.split(".")) for name in found.tensors}
    records = {split[n]: _record(split[n], n, info) for n, (_, info) in found.tensors.items()}
    entries = [Entry(path=k, value_type="jax.Array") for k in records]
    entries += [Entry(path=r.path, value_type="scalar") for r in scalars]
    entries.sort(key=_order)  # dict keys in sorted order, as a pytree flattens them
    records.update({r.path: r for r in scalars})
    try:
        if len(records) != len(found.tensors) + len(scalars):
            raise CheckpointFormatError(f"{found.where}: two leaves share a key path")
        tree, leaves = build_tree(entries, found.where)
    except CheckpointFormatError as e:
        if named or scalars:
            raise
        log.info("%s: tensor names do not split on '.' into a tree (%s); restoring a flat tree", found.where, e)
        split = {name: (name,) for name in found.tensors}
        records = {split[n]: _record(split[n], n, info) for n, (_, info) in found.tensors.items()}
        tree, leaves = build_tree(
            sorted((Entry(path=k, value_type="jax.Array") for k in records), key=_order), found.where
        )
    manifest = fmt.Manifest(tree=tree, leaves=tuple(records[e.path] for e in leaves))
    files = {split[n]: where for n, where in found.tensors.items()}
    return manifest, files


def reader(store: _Dir, files: dict[fmt.KeyPath, tuple[str, stf.TensorInfo]]) -> Callable[..., list[Any]]:
    """The read of a file set's array leaves: each leaf's regions, finished as it is read (so
    no more than one leaf's bytes are held unfinished, whatever the ``window``)."""

    def read(records: Sequence[fmt.LeafRecord], targets: Sequence[Any], window: int) -> list[Any]:
        fds: dict[str, _Handle] = {}
        try:
            out = []
            for record, target in zip(records, targets, strict=True):
                file, info = files[record.path]
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = store.open(file)
                regions = restoring.regions_of(record, target)
                out.append(restoring.finish_leaf(record, target, {r: read_region(fd, file, info, r) for r in regions}))
            return out
        finally:
            for handle in fds.values():
                handle.close()

    return read


@dataclasses.dataclass(frozen=True)
class SafetensorsSet:
    """A checked safetensors file set, for listings (``ckpt-callbacks inspect``): each file's
    header (by local path) and the manifest a restore reads."""

    headers: dict[str, stf.Header]
    manifest: fmt.Manifest


def open_safetensors(loc: paths.Location) -> SafetensorsSet | None:
    """The safetensors file set at ``loc`` (None: none there; see ``SafetensorsSource.open``)."""
    found = _files_at(loc)
    return None if found is None else SafetensorsSet(found.headers, manifest_of(found)[0])


class SafetensorsSource:
    """``restoring.Source`` for safetensors files and directories (see the module). ``item``
    is ignored: a safetensors file set is one tree."""

    name: ClassVar[str] = "safetensors"

    def open(self, loc: paths.Location, item: str) -> restoring.Located | None:
        found = _files_at(loc)
        if found is None:
            return None
        manifest, files = manifest_of(found)
        return restoring.Located(loc, manifest, reader(found.store, files))


restoring.register_source(SafetensorsSource())
