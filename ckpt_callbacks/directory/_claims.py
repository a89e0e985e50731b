"""Save claims: which names a save in flight may write, who owns it, and when it is dead.

>>> claim = Claim(names=("metadata.json", "state"), owner=this_process(), renewed=100.0, lease_s=60.0)
>>> Claim.from_bytes(claim.to_bytes(), "x").names
('metadata.json', 'state')
>>> claim.dead(now=150.0), claim.dead(now=161.0)
(False, True)

Process 0 of a save writes ``.claim.<nonce>`` before it lists the directory, naming every name
the save may use; another save never takes those names for leftovers while the claim lives.
A claim is **live** while its owner renews it: process 0 rewrites it every third of its lease
(``SaveOptions.claim_lease_s``, 120 s by default) until the save ends. It is **dead** once
  - it was not renewed within its lease, by the reader's clock (a killed process, a crashed
    host, or a failed save, whose claim is left to age out so that writes the store may still
    apply never land in names another save reuses), or
  - its owner ran on this host and that process is gone (same boot and pid namespace, its pid
    gone or reused by a process started later): a save killed on a single machine is dead at
    once. Containers sharing a host name and a volume have their own pid namespaces: there
    only the lease tells.
Clocks of the hosts sharing a store are assumed to agree to well within a lease (NTP).
A claim in the list form older versions wrote names no owner, and is dead.

Leftovers (entries of ours no marker names, and dead claims) are deleted by the next save into
that directory, by retention and by ``ckpt-callbacks prune``; a live claim's names never are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import socket
import time
from collections.abc import Collection
from typing import Any, TypeGuard

from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointFormatError

DEFAULT_LEASE_S = 120.0


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_namespace() -> str:
    """This process's pid namespace (a pid means something only inside its namespace)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@functools.cache
def this_process() -> dict[str, Any]:
    """Who writes a claim: host, boot, pid namespace, pid and the pid's start time (pids are reused)."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pidns": _pid_namespace(),
        "pid": pid,
        "start": _start_ticks(pid),
    }


def _gone(owner: dict[str, Any]) -> bool:
    """Whether ``owner`` ran on this host (this boot, this pid namespace) and is no longer running."""
    mine = this_process()
    if not mine["boot"] or not mine["pidns"]:
        return False
    if any(owner.get(key) != mine[key] for key in ("host", "boot", "pidns")):
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    started = _start_ticks(pid)
    return started is None or started != owner.get("start")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Claim:
    """The content of a ``.claim.<nonce>`` file."""

    names: tuple[str, ...]
    owner: dict[str, Any] = dataclasses.field(default_factory=dict)
    renewed: float = 0.0  # the owner's clock, seconds since the epoch
    lease_s: float = 0.0  # 0: a claim in the old list form (no owner): dead

    def to_bytes(self) -> bytes:
        data = {"names": list(self.names), "owner": self.owner, "renewed": self.renewed, "lease_s": self.lease_s}
        return fmt.dumps(data)

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Claim:
        """Parses a claim; anything unreadable is a claim of nothing, and dead."""
        try:
            data = fmt.loads(raw, where)
        except CheckpointFormatError:
            return cls(names=())
        if isinstance(data, list):  # written by an older version
            return cls(names=tuple(str(n) for n in data))
        if not isinstance(data, dict):
            return cls(names=())
        names, owner = data.get("names"), data.get("owner")
        renewed, lease = data.get("renewed"), data.get("lease_s")
        if not isinstance(names, list) or not isinstance(owner, dict) or not _seconds(renewed) or not _seconds(lease):
            return cls(names=tuple(str(n) for n in names) if isinstance(names, list) else ())
        return cls(names=tuple(str(n) for n in names), owner=owner, renewed=float(renewed), lease_s=float(lease))

    def dead(self, now: float | None = None) -> bool:
        """Whether the save that wrote this claim can no longer write (see the module doc)."""
        if self.lease_s <= 0:
            return True
        now = time.time() if now is None else now
        return now - self.renewed > self.lease_s or _gone(self.owner)


def _seconds(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def new_claim(names: list[str], lease_s: float) -> Claim:
    """A claim by this process, renewed now."""
    return Claim(names=tuple(names), owner=this_process(), renewed=time.time(), lease_s=lease_s)


_ITEM = re.compile(r"[A-Za-z0-9_-]+")


def read(loc: paths.Location, names: Collection[str]) -> dict[str, Claim]:
    """The claims ``names`` (``.claim.<nonce>`` entries of ``loc``), read; a vanished one claims nothing."""
    return {n: Claim.from_bytes(paths.read_bytes(loc, n) or b"", loc.join(n).url) for n in names}


def held(loc: paths.Location, claim_names: Collection[str]) -> tuple[set[str], list[str]]:
    """The names the live claims among ``claim_names`` hold, and the dead claims."""
    found = read(loc, claim_names)
    busy: set[str] = set()
    for claim in found.values():
        if not claim.dead():
            busy |= set(claim.names)
    return busy, sorted(n for n, claim in found.items() if claim.dead())


def item_names(loc: paths.Location, dead: Collection[str]) -> set[str]:
    """Plain item names the claims ``dead`` name whose directories hold only what a save
    writes (a claim's word alone never gets a user's ``tensorboard/`` deleted)."""
    named = {n for claim in read(loc, dead).values() for n in claim.names if _ITEM.fullmatch(n)}
    return {n for n in named if _only_ours(loc.join(n))}


_OUR_FILE = re.compile(r"manifest\.json|zarr\.json|pack\.[0-9]+-[0-9]+|index\.[0-9]+")


def _only_ours(item: paths.Location) -> bool:
    """Whether directory ``item`` holds only files an item directory holds: manifest, pack, data
    and index files, and zarr3 arrays (``zarr.json``, chunks under ``c/``); or no file at all."""
    return all(_is_item_file(k) for k in paths.list_keys_under(item))


def _is_item_file(key: str) -> bool:
    *dirs, base = key.split("/")
    if _OUR_FILE.fullmatch(base):
        return True
    return "c" in dirs and base.isdigit() and all(d.isdigit() for d in dirs[dirs.index("c") + 1 :])
