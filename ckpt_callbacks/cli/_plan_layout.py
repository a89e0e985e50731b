"""``ckpt-callbacks plan-layout``: objects and bytes per process of both layouts, on paper.

    ckpt-callbacks plan-layout --example llama70b --hosts 256 --devices-per-host 8 --adam
    ckpt-callbacks plan-layout --leaves tree.json --hosts 4 --devices-per-host 8

A ``--leaves`` file is JSON: ``{"mesh": {"fsdp": 32}, "leaves": [{"path": "w", "shape": [8, 4],
"dtype": "bfloat16", "spec": ["fsdp", null]}, ...]}`` (``mesh`` defaults to one ``fsdp`` axis
over every device; a leaf without ``spec`` is sharded FSDP-style, see ``layout_plan.fsdp_spec``).
A leaf past the format's bounds (2**50 bytes, dims in [0, 2**62]), and a tree whose plan takes
more than ``layout_plan.MAX_PLAN_WORK`` steps, are refused before any of it is planned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import stat
from typing import Any

from ckpt_callbacks import format as fmt
from ckpt_callbacks import layouts as layout_plan
from ckpt_callbacks import layouts as process_files
from ckpt_callbacks.format import show

MAX_FILE_BYTES = 64 << 20  # of a --leaves file

_HELP = (
    "Objects and bytes each process writes, and manifest and index sizes, in the zarr3 and the "
    "process layout, for a tree on a mesh of HOSTS x DEVICES_PER_HOST devices; nothing is saved."
)
_EXAMPLES = [
    "--example llama70b --hosts 256 --devices-per-host 8",
    "--example llama70b --hosts 256 --devices-per-host 8 --adam --json",
    "--leaves tree.json --hosts 4 --devices-per-host 8",
]


def add_parser(sub: Any) -> None:
    epilog = "examples:\n" + "\n".join(f"  ckpt-callbacks plan-layout {e}" for e in _EXAMPLES)
    p = sub.add_parser(
        "plan-layout",
        help=_HELP,
        description=_HELP,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=command)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--example", choices=sorted(layout_plan.EXAMPLES), help="a built-in tree")
    source.add_argument("--leaves", metavar="FILE", help="a JSON file of leaves (see the module docs)")
    p.add_argument("--hosts", type=int, required=True, help="processes (one per host)")
    p.add_argument("--devices-per-host", type=int, default=8, metavar="K", help="devices per process (default 8)")
    p.add_argument("--adam", action="store_true", help="with --example: add Adam's fp32 mu and nu")
    p.add_argument("--file-bytes", type=int, default=process_files.FILE_BYTES, help="process layout: data file cap")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _read(path: str) -> Any:
    """The JSON of a ``--leaves`` file: a regular file (a FIFO would block), of bounded size."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"--leaves {path}: not a regular file; expected a JSON file of leaves")
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"--leaves {path}: more than {MAX_FILE_BYTES >> 20} MiB; expected a JSON file of leaves")
    return fmt.loads(raw, f"--leaves {path}")


def _fields(entry: Any, where: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, found {show(entry)}")
    missing, unknown = sorted(required - set(entry)), sorted(set(entry) - required - optional)
    if missing or unknown:
        problem = f"missing {missing}" if missing else f"unknown keys {show(unknown)}"
        raise ValueError(f"{where}: {problem}; expected keys {sorted(required)}, optionally {sorted(optional)}")
    return entry


def _mesh(value: Any, where: str) -> dict[str, int]:
    sizes = value.values() if isinstance(value, dict) else ()
    if not isinstance(value, dict) or not value or not all(type(n) is int and n > 0 for n in sizes):
        raise ValueError(
            f"{where}: mesh {show(value)}; expected an object of axis name -> positive int, one axis or more"
        )
    return value


def _leaf(entry: Any, where: str, devices: int, axis: str) -> layout_plan.LeafShape:
    entry = _fields(entry, where, {"path", "shape", "dtype"}, {"spec"})
    shape, spec = entry["shape"], entry.get("spec")
    if not isinstance(entry["path"], str) or not isinstance(shape, list) or not isinstance(spec, list | None):
        found = ", ".join(f"{k} {show(entry.get(k))}" for k in ("path", "shape", "spec"))
        raise ValueError(f"{where}: expected a string path, a list shape and a list spec or none; found {found}")
    entries = () if spec is None else tuple(tuple(e) if isinstance(e, list) else e for e in spec)
    leaf = layout_plan.LeafShape(path=entry["path"], shape=tuple(shape), dtype=entry["dtype"], spec=entries)
    if spec is None:  # validated first: fsdp_spec computes with the dims
        leaf = dataclasses.replace(leaf, spec=layout_plan.fsdp_spec(leaf.shape, devices, axis))
    return leaf


def _load(path: str, devices: int) -> tuple[list[layout_plan.LeafShape], dict[str, int]]:
    data = _fields(_read(path), f"--leaves {path}", {"leaves"}, {"mesh"})
    mesh = _mesh(data.get("mesh", {"fsdp": devices}), f"--leaves {path}")
    if not isinstance(data["leaves"], list) or len(data["leaves"]) > layout_plan.MAX_LEAVES:
        raise ValueError(f"--leaves {path}: 'leaves' is {show(data['leaves'])}; expected a list of leaf objects")
    leaves = []
    for i, entry in enumerate(data["leaves"]):
        try:
            leaves.append(_leaf(entry, f"leaves[{i}]", devices, next(iter(mesh))))
        except ValueError as e:
            raise ValueError(f"--leaves {path}: {e}") from None
    return leaves, mesh


def plan_data(args: argparse.Namespace) -> dict[str, Any]:
    """What ``plan-layout`` prints, as JSON."""
    devices = args.hosts * args.devices_per_host
    if args.hosts < 1 or args.devices_per_host < 1 or devices > layout_plan.MAX_DEVICES:
        raise ValueError(
            f"--hosts {args.hosts} --devices-per-host {args.devices_per_host}: expected positive counts, "
            f"at most {layout_plan.MAX_DEVICES:,} devices in all"
        )
    if args.file_bytes < 1:
        raise ValueError(f"--file-bytes {args.file_bytes}: expected a positive byte count")
    if args.example:
        leaves, mesh = layout_plan.EXAMPLES[args.example](devices, adam=args.adam), {"fsdp": devices}
        name = args.example + (" + Adam (fp32 mu, nu)" if args.adam else "")
    else:
        leaves, mesh = _load(args.leaves, devices)
        name = args.leaves
    if math.prod(mesh.values()) != devices:
        raise ValueError(
            f"mesh {show(mesh)} has {math.prod(mesh.values())} devices; --hosts x --devices-per-host is {devices}"
        )
    plans = [
        layout_plan.plan_layout(leaves, mesh, args.hosts, layout=kind, file_bytes=args.file_bytes)
        for kind in process_files.kinds()
    ]
    nbytes = sum(math.prod(leaf.shape) * _itemsize(leaf.dtype) for leaf in leaves)
    return {
        "tree": name,
        "leaves": len(leaves),
        "bytes": nbytes,
        "mesh": mesh,
        "processes": args.hosts,
        "layouts": [p.summary() for p in plans],
    }


def _itemsize(dtype: str) -> int:
    return fmt.dtype_from_name(dtype).itemsize


def _spread(values: dict[str, float], unit: str = "") -> str:
    def one(x: float) -> str:
        return f"{x / 2**20:,.1f}" if unit == "MiB" else f"{x:,.0f}"

    return f"{one(values['min'])} / {one(values['median'])} / {one(values['max'])}"


def command(args: argparse.Namespace) -> int:
    data = plan_data(args)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(
        f"{data['tree']}: {data['leaves']} array leaves, {data['bytes'] / 2**30:,.1f} GiB, mesh {data['mesh']}, "
        f"{data['processes']} processes"
    )
    header = ("layout", "objects", "chunks", "objects/process", "MiB/process", "manifest MiB", "index KiB/process")
    rows = [header]
    for s in data["layouts"]:
        index = s["index_bytes_per_process"]
        rows.append(
            (
                s["layout"],
                f"{s['objects']:,}",
                f"{s['chunks']:,}",
                _spread(s["objects_per_process"]),
                _spread(s["bytes_per_process"], "MiB"),
                f"{s['manifest_bytes'] / 2**20:,.2f}",
                "-" if not index["max"] else f"{index['min'] / 1024:,.0f} / {index['max'] / 1024:,.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("(min / median / max over processes; process 0 also writes the manifest, metadata and marker)")
    return 0
