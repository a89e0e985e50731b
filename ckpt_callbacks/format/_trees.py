"""Pytrees as JSON: a tree's structure (dicts, lists, tuples, leaf references) and key paths.

>>> escape_component("../x")
'%2E%2E%2Fx'
>>> structure, leaves = flatten({"w": 1, "l": [2, 3]})
>>> unflatten(structure, [v for _, v in leaves])
{'l': [2, 3], 'w': 1}
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence
from typing import Any

import jax

from ckpt_callbacks.errors import CheckpointFormatError

KeyPath = tuple[str | int, ...]

_SAFE = frozenset(string.ascii_letters + string.digits + "_-")
_MAX_COMPONENT = 120
_PLAIN = re.compile(f"[A-Za-z0-9_-]{{1,{_MAX_COMPONENT}}}")  # spelled as itself


def escape_component(key: str | int) -> str:
    """A file-name-safe, injective spelling of one key (no '/', '.', or empty names)."""
    text = str(key)
    if _PLAIN.fullmatch(text):
        return text
    if not text:
        return "%"
    out = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in text)
    if len(out) > _MAX_COMPONENT:
        out = out[:96] + "~" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def leaf_dir(path: KeyPath) -> str:
    """The array directory of a leaf, relative to its item directory."""
    return "/".join(escape_component(k) for k in path) if path else "%root"


def _spelled(key: str | int) -> str:
    text = str(key)
    return text.replace("%", "%25").replace("/", "%2F") if text else "%"


def key_string(path: Sequence[str | int]) -> str:
    """The '/'-joined key path that every display, ``keys=``, partition rules and error
    messages use. Inside one key, '/' is written %2F, '%' as %25 and an empty key as %, so
    ``{"a/b": x}`` (key ``a%2Fb``) and ``{"a": {"b": x}}`` (key ``a/b``) never read alike.

    >>> key_string(("params", "a/b", 0)), key_string(("100%", ""))
    ('params/a%2Fb/0', '100%25/%')
    """
    return "/".join(_spelled(k) for k in path)


_ESCAPES = {"%25": "%", "%2F": "/"}
_ESCAPE = re.compile("%(?:25|2F)", re.IGNORECASE)


def parse_key_string(text: str) -> tuple[str, ...]:
    """The key components a ``key_string`` spells (an int index comes back as its digits); an
    empty part (``"params/"``) names nothing, so a leading or trailing '/' does not count.

    >>> parse_key_string("params/a%2Fb/0"), parse_key_string("100%25/%/")
    (('params', 'a/b', '0'), ('100%', ''))
    """
    parts: list[str] = []
    for raw in text.split("/"):
        if raw == "%":
            parts.append("")
        elif raw:
            if "%" in _ESCAPE.sub("", raw):
                raise ValueError(
                    f"key {text!r}: part {raw!r} has a '%' that is not %25 ('%'), %2F ('/') or a whole part "
                    "(an empty key)"
                )
            parts.append(_ESCAPE.sub(lambda m: _ESCAPES[m.group().upper()], raw))
    return tuple(parts)


def _key_of(entry: Any) -> str | int:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            key = getattr(entry, attr)
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise TypeError(f"key {key!r} of type {type(key).__name__}: only str and int keys can be saved")
            return key
    raise TypeError(f"unsupported key path entry {entry!r}")


def path_of(entries: Sequence[Any]) -> KeyPath:
    """A jax key path (DictKey, SequenceKey, GetAttrKey, ...) as plain str/int components."""
    return tuple(_key_of(e) for e in entries)


def _children(node: Any) -> list[tuple[Any, Any]] | None:
    """One level of a pytree: [(key entry, child)], or None when ``node`` is a leaf."""
    if node is None:
        return None
    kind = type(node)
    if kind is dict and all(type(k) is str for k in node):  # the common containers without a jax call per node
        return [(jax.tree_util.DictKey(k), node[k]) for k in sorted(node)]
    if kind is list or kind is tuple:
        return [(jax.tree_util.SequenceKey(i), child) for i, child in enumerate(node)]
    flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(flat) == 1 and not flat[0][0] and flat[0][1] is node:
        return None
    return [(path[0], child) for path, child in flat]


def flatten(tree: Any) -> tuple[dict[str, Any], list[tuple[KeyPath, Any]]]:
    """Walks a pytree into (structure JSON, [(key path, leaf)]); None is a leaf."""
    leaves: list[tuple[KeyPath, Any]] = []

    def walk(node: Any, path: KeyPath) -> dict[str, Any]:
        children = _children(node)
        if children is None:
            leaves.append((path, node))
            return {"leaf": len(leaves) - 1}
        keyed = [(_key_of(entry), child) for entry, child in children]
        if isinstance(node, list | tuple) and not hasattr(node, "_fields"):
            kind = "list" if isinstance(node, list) else "tuple"
            return {kind: [walk(child, (*path, k)) for k, child in keyed]}
        out: dict[str, Any] = {"dict": [[k, walk(child, (*path, k))] for k, child in keyed]}
        if not isinstance(node, dict):
            out["node"] = type(node).__name__
        return out

    return walk(tree, ()), leaves


def unflatten(structure: dict[str, Any], leaves: Sequence[Any], keep: set[int] | None = None) -> Any:
    """Rebuilds nested dicts/lists/tuples; leaves not in ``keep`` drop out, and so do containers
    left empty (with ``keep``, also ones that were empty: optax's ``EmptyState`` does not leak
    into a subset that did not ask for it)."""

    def build(node: dict[str, Any]) -> tuple[bool, Any]:
        if "leaf" in node:
            index = node["leaf"]
            return (keep is None or index in keep), (leaves[index] if keep is None or index in keep else None)
        if "dict" in node:
            built = [(k, build(child)) for k, child in node["dict"]]
            kept = {k: v for k, (ok, v) in built if ok}
            return (bool(kept) or (not built and keep is None)), kept
        kind = "list" if "list" in node else "tuple"
        if kind not in node:
            raise CheckpointFormatError(f"unknown tree node {sorted(node)} in manifest")
        items = [build(child) for child in node[kind]]
        values = [v for ok, v in items if ok]
        return (bool(values) or (not items and keep is None)), (values if kind == "list" else tuple(values))

    return build(structure)[1]
