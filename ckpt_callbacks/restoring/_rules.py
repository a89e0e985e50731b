"""Regex partition rules -> PartitionSpecs -> NamedShardings, with rank and divisibility checks.

A rule is ``(regex, PartitionSpec)``; the regex is searched in the leaf's '/'-joined key path
(``"params/Dense_0/kernel"``), the first match wins, and scalars are always replicated.

>>> import numpy as np
>>> from jax.sharding import PartitionSpec as P
>>> tree = {"dense": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)}, "step": np.zeros(())}
>>> rules = [("kernel", P("data", "model")), (".*", P(None))]
>>> match_partition_rules(rules, tree)["dense"]["kernel"] == P("data", "model")
True
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import ShardingRuleError

Rules = Sequence[tuple[str, PartitionSpec]]

log = logging.getLogger("ckpt_callbacks")


def check_rules(rules: Rules | None) -> None:
    """Refuses, before anything is read, rules that are not ``(regex, PartitionSpec)`` pairs or
    whose regex does not compile (``ShardingRuleError`` naming the rule)."""
    if rules is None:
        return
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise ShardingRuleError(f"rules={rules!r:.200}: expected a list of (regex, PartitionSpec) pairs")
    for i, rule in enumerate(rules):
        if not isinstance(rule, tuple | list) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ShardingRuleError(f"rules[{i}] = {rule!r:.200}: expected a (regex, PartitionSpec) pair")
        if not isinstance(rule[1], PartitionSpec):
            raise ShardingRuleError(
                f"rules[{i}] = {rule!r:.200}: expected a PartitionSpec, got {type(rule[1]).__name__} "
                "(write P(...) for a spec, P() to replicate)"
            )
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ShardingRuleError(f"rules[{i}]: pattern {rule[0]!r} is not a valid regex: {e}") from None


def warn_unmatched(rules: Rules, keys: Sequence[str]) -> list[str]:
    """Logs (and returns) the rules whose regex is found in no key: usually a typo ("kernal")
    that a catch-all rule after it would otherwise hide, silently replicating every kernel."""
    unmatched = [pattern for pattern, _ in rules if not any(re.search(pattern, key) for key in keys)]
    if unmatched and keys:
        log.warning(
            "partition rules %s match no leaf (a typo?); keys look like %s", unmatched, sorted(keys, key=len)[:3]
        )
    return unmatched


def spec_for(key: str, shape: Sequence[int], rules: Rules) -> PartitionSpec:
    """The spec of one leaf: first rule whose regex is found in ``key``; scalars replicated."""
    if len(shape) == 0:
        return PartitionSpec()
    for pattern, spec in rules:
        if re.search(pattern, key):
            if len(spec) > len(shape):
                raise ShardingRuleError(
                    f"leaf {key!r}: rule {pattern!r} gives {spec} for {len(spec)} dims, but the leaf has "
                    f"rank {len(shape)} (shape {tuple(shape)})"
                )
            return spec
    raise ShardingRuleError(
        f"leaf {key!r} (shape {tuple(shape)}): no partition rule matches; rules are {[pattern for pattern, _ in rules]}"
    )


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def check_spec(key: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    """Raises ``ShardingRuleError`` naming leaf, dim, axis and sizes if ``spec`` cannot shard ``shape``."""
    if len(spec) > len(shape):
        raise ShardingRuleError(
            f"leaf {key!r}: spec {spec} has {len(spec)} dims, the leaf has rank {len(shape)} (shape {tuple(shape)})"
        )
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    for dim, entry in enumerate(spec):
        axes = _axes(entry)
        for axis in axes:
            if axis not in sizes:
                raise ShardingRuleError(
                    f"leaf {key!r}: dim {dim} uses mesh axis {axis!r}, but the mesh has axes {tuple(mesh.axis_names)}"
                )
        total = math.prod(sizes[a] for a in axes)
        if shape[dim] % total:
            raise ShardingRuleError(
                f"leaf {key!r}: dim {dim} of size {shape[dim]} is not divisible by mesh axes {axes} of "
                f"total size {total} (shape {tuple(shape)}, spec {spec})"
            )


def _shape_of(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _keys(tree: Any) -> list[str]:
    return [fmt.key_string(fmt.path_of(path)) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def match_partition_rules(rules: Rules, tree: Any) -> Any:
    """A tree of ``PartitionSpec`` matching ``tree`` (leaves need ``.shape``; others are scalars).

    Rules that match no leaf are logged as a warning (see ``warn_unmatched``).
    """
    check_rules(rules)
    warn_unmatched(rules, _keys(tree))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: spec_for(fmt.key_string(fmt.path_of(path)), _shape_of(leaf), rules), tree
    )


def shardings_from_rules(mesh: Mesh, rules: Rules, tree: Any) -> Any:
    """A tree of ``NamedSharding`` on ``mesh``, every spec checked against its leaf's shape."""
    check_rules(rules)
    warn_unmatched(rules, _keys(tree))

    def one(path: Any, leaf: Any) -> NamedSharding:
        key, shape = fmt.key_string(fmt.path_of(path)), _shape_of(leaf)
        spec = spec_for(key, shape, rules)
        check_spec(key, shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)
