"""Restoring into a structure that changed: renamed modules, new heads, removed layers.

``restore(..., template=..., rename=[(regex, replacement)], missing=init_tree, drop=...)``:

- ``rename`` applies to the saved key paths ('/'-joined): the first rule whose regex is found
  in a saved key rewrites it (``re.sub``, once); two saved keys may not land on one name.
- template leaves not on disk raise by default, listing them; with ``missing=`` (a tree with
  the template's structure, e.g. the freshly initialised state) they are taken from it. A leaf
  saved as ``None`` where the template has a value (not checkpointed: the Levanter/equinox
  convention) counts as not on disk, as does every template leaf under a subtree saved as None.
- saved leaves the template does not have raise by default; ``drop=True`` drops them all,
  ``drop=[regex, ...]`` only those whose (renamed) key matches one.

What was renamed, filled and dropped is logged and returned by ``plan``.

>>> changes = plan(["params/dense/kernel", "head/w"], ["params/Dense_0/kernel", "head2/w"],
...                rename=[("dense", "Dense_0")], missing={"head2/w": 0.0}, drop=["^head/"])
>>> changes.renamed, changes.filled, changes.dropped
([('params/dense/kernel', 'params/Dense_0/kernel')], ['head2/w'], ['head/w'])
>>> plan(["a", "b"], ["a", "b/w"], unsaved=["b"]).missing  # 'b' was saved as None
['b/w']
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax

from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import RestoreMismatchError

log = logging.getLogger("ckpt_callbacks")

Rename = Sequence[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Changes:
    """How a saved tree maps onto a template: saved key -> template key, and what was done."""

    target: dict[str, str]  # saved key -> template key, for saved leaves that are used
    renamed: list[tuple[str, str]]
    filled: list[str]
    dropped: list[str]
    missing: list[str]  # template keys with no saved leaf and nothing to fill them
    unexpected: list[str]  # saved keys the template does not have, not dropped
    unsaved: list[str] = dataclasses.field(default_factory=list)  # template keys saved as None (filled or missing)

    def log(self, where: str) -> None:
        if self.renamed or self.filled or self.dropped:
            log.info(
                "restore %s: renamed %d %s, filled %d from missing= %s, dropped %d %s",
                where,
                len(self.renamed),
                self.renamed[:5],
                len(self.filled),
                self.filled[:5],
                len(self.dropped),
                self.dropped[:5],
            )


def check_arguments(template: Any, rename: Any, missing: Any, drop: Any) -> None:
    """Refuses, before anything is read, a ``rename``, ``missing`` or ``drop`` that cannot
    work (``ValueError`` naming the argument): regexes that do not compile, a rename that is
    not (regex, replacement) pairs, any of the three without a template (there is nothing to
    match them to), a ``missing`` that is no tree of the template's keys."""
    if isinstance(rename, str | bytes) or not isinstance(rename, Sequence):
        raise ValueError(f"rename={rename!r:.200}: expected a list of (regex, replacement) pairs")
    for i, pair in enumerate(rename):
        if not isinstance(pair, tuple | list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ValueError(f"rename[{i}] = {pair!r:.200}: expected a (regex, replacement) pair of strings")
        _compile("rename", i, pair[0])
    if not isinstance(drop, bool):
        if isinstance(drop, str | bytes) or not isinstance(drop, Sequence):
            raise ValueError(f"drop={drop!r:.200}: expected True, False or a list of regexes (drop=[{drop!r:.50}])")
        for i, pattern in enumerate(drop):
            if not isinstance(pattern, str):
                raise ValueError(f"drop[{i}] = {pattern!r:.200}: expected a regex (a str)")
            _compile("drop", i, pattern)
    given = [
        name for name, unset in (("rename", not rename), ("missing", missing is None), ("drop", not drop)) if not unset
    ]
    if template is None and given:
        raise ValueError(
            f"{'= and '.join(given)}= restructure a restore into template=, and no template was given: pass the "
            "tree to restore into (restore_or_init takes its template from init_fn)"
        )
    if template is not None and missing is not None:
        _check_missing(template, missing)


def _compile(argument: str, index: int, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{argument}[{index}]: pattern {pattern!r} is not a valid regex: {e}") from None


def _check_missing(template: Any, missing: Any) -> None:
    """``missing`` shares leaves with the template: a tree of its structure, or a part of it."""
    wanted, fill = flat_values(template), flat_values(missing)
    if set(wanted) & set(fill) or (not wanted and not fill):
        return
    shown = sorted(fill)[:5] if list(fill) != [""] else f"a single {type(missing).__name__}"
    raise ValueError(
        f"missing= gives {shown}, no leaf of the template (keys like {sorted(wanted, key=len)[:3]}): expected a "
        "tree with the template's structure, such as the freshly initialised state (missing=init_fn()), whose "
        "leaves fill the template leaves absent from the checkpoint"
    )


def _renamed(key: str, rename: Rename) -> str:
    for pattern, replacement in rename:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return key


def _dropping(drop: bool | Sequence[str], key: str) -> bool:
    if isinstance(drop, bool):
        return drop
    return any(re.search(pattern, key) for pattern in drop)


def plan(
    saved: Sequence[str],
    wanted: Sequence[str],
    *,
    rename: Rename = (),
    missing: Mapping[str, Any] | None = None,
    drop: bool | Sequence[str] = False,
    where: str = "",
    unsaved: Collection[str] = (),
    empty: Collection[str] = (),
) -> Changes:
    """Maps saved keys onto template keys (pure; see the module docstring).

    ``unsaved``: saved keys holding None (not checkpointed); ``empty``: template keys whose leaf
    is None (a saved None restores into them as None).
    """
    target: dict[str, str] = {}
    renamed = []
    for key in saved:
        new = _renamed(key, rename)
        if new in target.values():
            first = next(k for k, v in target.items() if v == new)
            raise RestoreMismatchError(f"{where}: rename maps both {first!r} and {key!r} to {new!r}")
        target[key] = new
        if new != key:
            renamed.append((key, new))
    wanted_set = set(wanted)
    nones = set(unsaved)
    holes = _holes(target, [k for k in saved if k in nones], wanted, set(empty))
    produced = set(target.values()) | {k for k in holes if k in empty}
    filled = [k for k in wanted if k not in produced and missing is not None and k in missing]
    absent = [k for k in wanted if k not in produced and k not in filled]
    extra = [k for k in saved if k in target and target[k] not in wanted_set]
    dropped = [k for k in extra if _dropping(drop, target[k])]
    used = {k: v for k, v in target.items() if v in wanted_set}
    unexpected = [target[k] if target[k] == k else f"{k} (renamed {target[k]})" for k in extra if k not in dropped]
    return Changes(used, renamed, filled, dropped, absent, unexpected, [k for k in holes if k not in empty])


def _holes(target: dict[str, str], unsaved: Sequence[str], wanted: Sequence[str], empty: set[str]) -> list[str]:
    """The template keys at or under a saved None's (renamed) key, that None taken out of
    ``target``; a None saved where the template has None too stays (it restores as None)."""
    holes: list[str] = []
    leaves = set(wanted)
    for key in unsaved:
        new = target[key]
        under = [new] if new in leaves else [w for w in wanted if w.startswith(new + "/")]
        if under and not (under == [new] and new in empty):
            del target[key]
            holes += under
    return holes


def match_key(path: fmt.KeyPath) -> str:
    """The '/'-joined key a leaf is matched and renamed by: ``format.key_string``, so
    ``{"a/b": x}`` and ``{"a": {"b": y}}`` never collide."""
    return fmt.key_string(path)


def saved_none(record: fmt.LeafRecord) -> bool:
    """Whether ``record`` is a None saved in place of a leaf (a leaf that was not checkpointed)."""
    return record.kind == "scalar" and record.value_type == "none"


def flat_values(tree: Any) -> dict[str, Any]:
    """A tree's leaves by ``match_key`` (None counts as a leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return {match_key(fmt.path_of(p)): leaf for p, leaf in flat}
