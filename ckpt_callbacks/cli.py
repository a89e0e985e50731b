"""The ``ckpt-callbacks`` command: list, find, inspect and verify checkpoints.

    ckpt-callbacks list BASE          committed checkpoints under BASE, by step
    ckpt-callbacks latest BASE        path of the latest committed checkpoint
    ckpt-callbacks inspect PATH       metadata and every leaf: shape, dtype, spec, chunks
                                      (an orbax PyTree checkpoint too)
    ckpt-callbacks verify PATH        re-read every chunk and check its crc32c (exit 1 if bad)

>>> import jax.numpy as jnp, ckpt_callbacks as cc
>>> cc.save("memory://doc/cli/run-3", {"w": jnp.zeros((2, 2))}, step=3)
>>> main(["list", "memory://doc/cli"])
step 3  memory://doc/cli/run-3
0
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence

from ckpt_callbacks import discovery, layout, orbax_format, paths
from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError


def _list(args: argparse.Namespace) -> int:
    for info in discovery.list_checkpoints(args.base):
        flags = " (temporary)" if info.is_temporary else ""
        print(f"step {info.step}  {info.path}{flags}")
    return 0


def _latest(args: argparse.Namespace) -> int:
    path = discovery.find_latest_checkpoint(args.base)
    if path is None:
        print(f"no committed checkpoint under {args.base}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _print_leaf(r: fmt.LeafRecord) -> None:
    if r.kind == "scalar":
        print(f"  {r.key or '<root>'}: {r.value_type} = {r.value!r}")
        return
    spec = "" if r.partition_spec is None else f" spec={list(r.partition_spec)}"
    dtype = r.dtype if r.stored_dtype == r.dtype else f"{r.dtype} stored as {r.stored_dtype}"
    print(f"  {r.key or '<root>'}: {r.kind} {list(r.shape)} {dtype}{spec} chunks={list(r.chunks)}")


def _inspect_orbax(loc: paths.Location, items: dict[str, paths.Location]) -> int:
    print(f"{loc.url}: an orbax checkpoint (read without orbax; no chunk checksums to verify)")
    for name, item_loc in items.items():
        found = orbax_format.read_item(item_loc)
        if found is None:
            print(f"item {name!r}: not a PyTree item (no {orbax_format.METADATA}), not shown")
            continue
        leaves = found.manifest.leaves
        total = sum(r.nbytes for r in leaves)
        print(f"item {name!r}: orbax PyTree ({found.storage}): {len(leaves)} leaves, {total / 1e6:.1f} MB")
        for r in leaves:
            _print_leaf(r)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    try:
        ckpt = layout.open_checkpoint(args.path)
    except CheckpointNotFoundError:
        loc = paths.parse(args.path)
        items = orbax_format.find_items(loc)
        if not items:
            raise
        return _inspect_orbax(loc, items)
    meta = ckpt.metadata
    when = datetime.datetime.fromtimestamp(meta.timestamp, datetime.UTC).isoformat(timespec="seconds")
    print(f"{ckpt.url}: step {meta.step}, saved {when}, temporary={meta.is_temporary}")
    if meta.extras:
        print(f"extras: {json.dumps(meta.extras)}")
    for item in ckpt.items:
        manifest = ckpt.manifest(item)
        total = sum(r.nbytes for r in manifest.leaves)
        print(f"item {item!r}: {len(manifest.leaves)} leaves, {total / 1e6:.1f} MB")
        for r in manifest.leaves:
            _print_leaf(r)
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = discovery.verify(args.path)
    print(f"{report.path}: {report.leaves} leaves, {report.chunks} chunks, {report.bytes_read / 1e6:.1f} MB checked")
    for problem in report.problems:
        print(f"  CORRUPT: {problem}")
    print("OK" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckpt-callbacks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, arg in (
        ("list", _list, "base"),
        ("latest", _latest, "base"),
        ("inspect", _inspect, "path"),
        ("verify", _verify, "path"),
    ):
        sub = commands.add_parser(name)
        sub.add_argument(arg)
        sub.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
