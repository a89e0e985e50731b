"""Leftovers of saves that died: found once their claims are dead, then deleted.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/leftovers/run-1", {"w": jnp.ones(2)}, step=1)
>>> loc = paths.parse("memory://doc/leftovers/run-1")
>>> paths.write_bytes(loc.join("state.ckpt-0badc0de"), "manifest.json", b"{}")  # a save killed mid-write
>>> find(loc)
['state.ckpt-0badc0de']
>>> clean(loc)
['state.ckpt-0badc0de']
>>> paths.list_entries(loc)
['COMMITTED', 'metadata.json', 'state']

A leftover is an entry of ours (``ckpt_callbacks.layout``'s names) in a checkpoint directory
that the marker does not name and no live claim holds: a killed save's item directory and
metadata file, an overwritten version whose deletion was cut short, and dead claims
themselves (``ckpt_callbacks.claims`` says when a claim is dead). A directory with a
``.deleting`` record is left to ``deletes.finish_delete``. Claims go last, so a save that
lists the directory meanwhile still sees them and keeps to fresh names.
"""

from __future__ import annotations

import logging

from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import _claims as claims
from ckpt_callbacks.directory import _open as layout

log = logging.getLogger("ckpt_callbacks")


def find(loc: paths.Location) -> list[str]:
    """The leftovers under checkpoint directory ``loc`` (see the module doc), sorted."""
    entries = paths.list_entries(loc)
    if layout.DELETING in entries:
        return []
    # Claims before the marker: a save that commits in between has its new names in the marker
    # read after (its claim goes only once its marker is written).
    claim_names = [n for n in entries if n.startswith(layout.CLAIM_PREFIX)]
    busy, dead = claims.held(loc, claim_names)
    commit = layout.read_commit_quietly(loc)
    if commit is None and layout.COMMIT_MARKER in entries:
        return []  # a marker we cannot read: a damaged checkpoint, left whole for verify, never cleaned
    named = {layout.COMMIT_MARKER, commit.metadata, *commit.items.values()} if commit else {layout.COMMIT_MARKER}
    known = set(commit.items) if commit else set()
    known |= claims.item_names(loc, dead)
    found = [n for n in entries if layout.is_ours(n, known) and n not in named and n not in busy]
    return sorted(n for n in found if not n.startswith(layout.CLAIM_PREFIX) or n in dead)


def clean(loc: paths.Location) -> list[str]:
    """Deletes the leftovers under ``loc``, claims last; the directory too if nothing is left.
    Returns what it deleted."""
    doomed = find(loc)
    for name in sorted(doomed, key=lambda n: n.startswith(layout.CLAIM_PREFIX)):
        paths.delete_entry(loc, name)
    if doomed and not paths.list_entries(loc):
        paths.delete_tree(loc)
    if doomed:
        log.info("deleted leftovers of saves that died in %s: %s", loc.url, ", ".join(doomed))
    return doomed
