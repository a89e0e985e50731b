"""The ``ckpt-callbacks`` command: what is in a checkpoint directory, from a terminal.

    ckpt-callbacks list gs://bucket/run                       # step, time, kind, size, metrics
    ckpt-callbacks list gs://bucket/run --metric eval_loss    # ... with best-k ranks
    ckpt-callbacks list gs://bucket/run --local /local/run    # ... and this host's LocalTier steps
    ckpt-callbacks inspect gs://bucket/run/run-1000           # every leaf: shape, dtype, spec, chunks
    ckpt-callbacks verify gs://bucket/run                     # re-read every chunk; exit 1 if damaged
    ckpt-callbacks prune gs://bucket/run --keep-last 3        # what would be deleted (--yes: delete)
    ckpt-callbacks plan --every 500 --until 5000 --every 1000 --steps 20000
    ckpt-callbacks diff run/run-1000 run/run-2000             # leaves added, removed, changed

``--json`` prints machine-readable output. Errors are one line on stderr and exit status 2.

>>> import jax.numpy as jnp, ckpt_callbacks as cc
>>> cc.save("memory://doc/cli/run-3", {"w": jnp.zeros((2, 2))}, step=3)
>>> main(["latest", "memory://doc/cli"])
memory://doc/cli/run-3
0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ckpt_callbacks import directory as deletes
from ckpt_callbacks import directory as discovery
from ckpt_callbacks import directory as layout
from ckpt_callbacks import directory as leftovers
from ckpt_callbacks import format as fmt
from ckpt_callbacks import interop as orbax_format  # orbax and safetensors
from ckpt_callbacks import storage as paths
from ckpt_callbacks.cli import _checks as cli_checks
from ckpt_callbacks.cli import _local_rows as local_rows
from ckpt_callbacks.cli import _plan as cli_plan
from ckpt_callbacks.cli import _plan_layout as cli_layout
from ckpt_callbacks.cli import _render as show
from ckpt_callbacks.cli._checks import found_instead, leaf_json, shown
from ckpt_callbacks.cli._plan import keep_text
from ckpt_callbacks.cli._rows import base_rows, best_ranks, checkpoint_rows, exists, row_of, saved_at
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.manager import CheckpointReader, KeepPolicy, discover

Command = Callable[[argparse.Namespace], int]


def _list(args: argparse.Namespace) -> int:
    if args.replicas is not None and (args.local is None or args.replicas < 0):
        raise ValueError(f"--replicas {args.replicas}: expected a count >= 0, with --local PATH")
    if args.local is None:
        rows = base_rows(args.base, args.metric, args.mode)
    else:  # a run whose persistent tier has no checkpoint yet is still listed with its local steps
        local = local_rows.local_data(args.local, args.replicas)
        fresh = not exists(paths.parse(args.base))
        rows = [] if fresh else base_rows(args.base, args.metric, args.mode)
    if args.json:
        show.print_json(rows if args.local is None else {"persistent": rows, "local": local})
        return 0
    out = show.console()
    if args.local is not None:
        out.print(f"persistent tier: {args.base}", soft_wrap=True)
    show.show_list(out, args.base, rows, best=bool(args.metric))
    if args.local is not None:
        out.print("")
        local_rows.show_local(out, local)
    return 0


def _latest(args: argparse.Namespace) -> int:
    found = discover(args.base)
    if not found:
        print(f"no committed checkpoint under {args.base}", file=sys.stderr)
        return 1
    print(found[-1].path)  # the path alone, for scripts; whose it is, on stderr when not ours
    if found[-1].source != discovery.OURS:
        print(f"(an {found[-1].source} checkpoint: restore reads it; new saves go beside it)", file=sys.stderr)
    return 0


def _item(leaves: Sequence[fmt.LeafRecord], **more: Any) -> dict[str, Any]:
    return {**more, "bytes": sum(r.nbytes for r in leaves), "leaves": [leaf_json(r) for r in leaves]}


def _orbax(loc: paths.Location, items: dict[str, paths.Location]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, item_loc in items.items():
        found = orbax_format.read_item(item_loc)
        out[name] = {"not_pytree": True} if found is None else _item(found.manifest.leaves, storage=str(found.storage))
    return {"kind": "orbax", "path": loc.url, "items": out}


def _safetensors(loc: paths.Location, found: orbax_format.SafetensorsSet) -> dict[str, Any]:
    files = [
        {"file": f, "tensors": len(h.tensors), "bytes": sum(t.stop - t.start for t in h.tensors.values())}
        for f, h in found.headers.items()
    ]
    metadata = {f: h.metadata for f, h in found.headers.items() if h.metadata}
    return {
        "kind": "safetensors", "path": loc.url, "files": files, "metadata": metadata,
        "items": {"state": _item(found.manifest.leaves)},
    }  # fmt: skip


def inspect_data(path: str) -> dict[str, Any]:
    """What ``inspect`` shows: our checkpoint, an orbax one, safetensors files, or a base
    directory's checkpoints."""
    try:
        ckpt = layout.open_checkpoint(path)
    except CheckpointNotFoundError:
        loc = paths.parse(path)
        items = orbax_format.find_items(loc)
        if items:
            return _orbax(loc, items)
        tensors = orbax_format.open_safetensors(loc)
        if tensors is not None:
            return _safetensors(loc, tensors)
        rows = checkpoint_rows(path)
        if rows:
            return {"kind": "base", "path": path, "checkpoints": rows}
        raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}: {found_instead(loc)}") from None
    meta = ckpt.metadata
    return {
        "kind": "ckpt_callbacks",
        "path": ckpt.url,
        "step": meta.step,
        "saved": f"{saved_at(meta.timestamp)} UTC",
        "timestamp": meta.timestamp,
        "temporary": meta.is_temporary,
        "extras": meta.extras,
        "items": {item: _item(ckpt.manifest(item).leaves) for item in ckpt.items},
    }


def _inspect(args: argparse.Namespace) -> int:
    data = inspect_data(args.path)
    if args.json:
        show.print_json(data)
    else:
        show.show_inspect(show.console(), data)
    return 0


def _prune(args: argparse.Namespace) -> int:
    keep = KeepPolicy(
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        keep_best=args.keep_best,
        metric=args.metric,
        mode=args.mode,
    )
    ruled = any(v is not None for v in (args.keep_last, args.keep_every, args.keep_best))
    if args.after is not None and args.after < 0:
        raise ValueError(f"--after {args.after}: expected a step >= 0")
    policy = None if args.after is not None and not ruled else keep  # --after alone deletes only what is newer
    data = prune_data(args.base, policy, delete=args.yes, after=args.after)
    if args.json:
        show.print_json(data)
    else:
        show.show_prune(show.console(), data)
    return 0


def prune_data(base_url: str, keep: KeepPolicy | None, *, delete: bool, after: int | None = None) -> dict[str, Any]:
    """What ``prune`` shows: each checkpoint under ``base_url`` kept or deleted (deleted, with its
    recorded metrics, only when ``delete``), and the leftovers of saves that died.

    ``after``: every checkpoint of ours with a step above it goes (a rewind); ``keep`` (None:
    no rule) applies to the rest. Checkpoints of other writers (orbax) are never deleted.
    """
    base_rows(base_url)  # refuses a missing base or a checkpoint path
    base = paths.parse(base_url)
    infos = CheckpointReader(base).checkpoints()
    later = [c for c in infos if after is not None and c.step is not None and c.step > after]
    ours = {c.path for c in infos if c.checkpoint is not None}
    rest = [c for c in infos if c not in later and c.path in ours]  # keep rules count ours, as retention does
    doomed = ({c.path for c in later} | {c.path for c in (keep.to_delete(rest) if keep else [])}) & ours
    ranks = best_ranks(infos, keep.metric, keep.mode) if keep else {}
    rows = [
        {**row_of(base_url, c, ranks.get(c.path)), "action": "delete" if c.path in doomed else "keep"} for c in infos
    ]
    deleted: list[str] = []
    # The newest first: a prune killed part-way leaves the oldest, never a resume point past STEP.
    for info, row in reversed(list(zip(infos, rows, strict=True))):
        if delete and info.path in doomed:
            deletes.delete_checkpoint(paths.parse(info.path), info.checkpoint.commit if info.checkpoint else None)
            if info.step is not None:  # its recorded metrics, as retention deletes them
                paths.delete_entry(base.join(layout.METRICS_DIR), layout.metrics_name(info.step))
            deleted.insert(0, row["path"])
    policy = [f"steps up to {after} (--after)"] if after is not None else []
    policy += [keep_text(keep)] if keep else []
    data = {"base": base_url, "policy": "; ".join(policy), "dry_run": not delete, "after": after}
    data |= {"best": bool(keep and keep.metric), "checkpoints": rows, "deleted": deleted}
    data["not_ours"] = [shown(base_url, paths.parse(c.path)) for c in later if c.checkpoint is None]
    data["leftovers"] = _prune_leftovers(base, delete)
    return data


def _prune_leftovers(base: paths.Location, delete: bool) -> list[dict[str, Any]]:
    """Leftovers of saves that died (``ckpt_callbacks.leftovers``) in every ``run-*`` directory
    under ``base``: listed, and deleted with ``--yes``."""
    found = []
    for name in paths.list_dirs(base):
        if layout.step_of(name) is None:
            continue
        loc = base.join(name)
        entries = leftovers.clean(loc) if delete else leftovers.find(loc)
        if entries:
            found.append({"path": loc.url, "entries": entries})
    return found


# What ``--help`` says of each command, and its examples.
_HELP = {
    "list": (
        "Committed checkpoints under BASE: step, time saved, temporary or permanent, size, items, "
        "recorded metrics; leftovers of unfinished saves are flagged.",
        [
            "gs://bucket/run",
            "gs://bucket/run --metric eval_loss",
            "/ckpts/run --json",
            "gs://bucket/run --local /local/ckpt/run   # and this host's local tier",
        ],
    ),
    "latest": ("Path of the latest committed checkpoint under BASE (exit 1 if none).", ["gs://bucket/run"]),
    "inspect": (
        "Metadata and every leaf of a checkpoint (ours or orbax's): shape, dtype, saved partition "
        "spec, size, chunk shape.",
        ["gs://bucket/run/run-1000", "ckpts/1000   # an orbax CheckpointManager step", "/ckpts/run/run-10 --json"],
    ),
    "verify": (
        "Re-read every chunk of a checkpoint, or of every checkpoint under a base, against its "
        "crc32c; report each missing or corrupt leaf; exit 1 on damage.",
        ["gs://bucket/run/run-1000", "gs://bucket/run"],
    ),
    "diff": (
        "Compare two checkpoints, item by item: leaves added, removed, reshaped, and the largest "
        "absolute change of each leaf in both.",
        ["run/run-1000 run/run-2000", "a/run-5 b/run-5 --item state --json"],
    ),
    "export": (
        "Write a committed checkpoint's item as safetensors files (model.safetensors, or shards plus "
        "model.safetensors.index.json) into the local directory OUT, streamed within --max-host-mib.",
        [
            "gs://bucket/run/run-1000 serve/",
            "ckpts/run-1000 serve/ --dtype bfloat16 --keys params --rename '^params\\.' 'model.'",
        ],
    ),
    "prune": (
        "Apply a keep policy to the checkpoints under BASE: a dry run that shows what would be "
        "deleted and kept, unless --yes.",
        ["gs://bucket/run --keep-last 3", "gs://bucket/run --keep-best 2 --metric eval_loss --keep-last 1 --yes"],
    ),
    "plan": (
        "Simulate a save policy before a run: which steps are saved, permanent or temporary, and "
        "which a keep policy keeps at the end.",
        [
            "--every 500 --until 5000 --every 1000 --steps 20000",
            "--every 1000 --save-interval 600 --step-time 0.8 --steps 10000 --keep-last 2",
        ],
    ),
}


def _add(sub: Any, name: str, func: Command) -> argparse.ArgumentParser:
    text, examples = _HELP[name]
    epilog = "examples:\n" + "\n".join(f"  ckpt-callbacks {name} {e}" for e in examples)
    parser = sub.add_parser(
        name, help=text, description=text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(func=func)
    if name != "latest":
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _metric_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--metric", help=f"eval metric to rank by ({what})")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="min: lower is better (default)")


def _add_reading(sub: Any) -> None:
    p = _add(sub, "list", _list)
    p.add_argument("base", help="the directory holding run-<step> checkpoints")
    _metric_options(p, "adds a best-k rank column")
    p.add_argument(
        "--local",
        metavar="PATH",
        help="also this host's LocalTier directory: per local step, the sets committed here, size, digest, "
        "and whether the step is complete on this host",
    )
    p.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="with --local: the LocalTier's replicas (default: as its manifests record)",
    )
    _add(sub, "latest", _latest).add_argument("base")
    p = _add(sub, "inspect", _inspect)
    p.add_argument("path", help="a checkpoint directory (a base directory lists its checkpoints)")
    _add(sub, "verify", cli_checks.verify_command).add_argument(
        "path", help="a checkpoint, or a base directory of checkpoints"
    )
    p = _add(sub, "diff", cli_checks.diff_command)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--item", help="compare only this item (default: every item both have)")


def _export(args: argparse.Namespace) -> int:
    import ml_dtypes

    dtype = None if args.dtype is None else getattr(ml_dtypes, args.dtype, args.dtype)
    files = orbax_format.export_safetensors(
        args.path,
        args.out,
        item=args.item,
        keys=args.keys or None,
        rename=[tuple(r) for r in args.rename],
        dtype=dtype,
        max_file_bytes=int(args.max_file_mib * 2**20),
        max_host_bytes=int(args.max_host_mib * 2**20),
        overwrite=args.overwrite,
    )
    if args.json:
        show.print_json({"path": args.path, "out": args.out, "files": files})
    else:
        for name in files:
            print(name)
    return 0


def _add_export(sub: Any) -> None:
    p = _add(sub, "export", _export)
    p.add_argument("path", help="a committed checkpoint (ours, either layout; or orbax's)")
    p.add_argument("out", help="local output directory")
    p.add_argument("--item", default="state", help="the item to export (default: state)")
    p.add_argument("--keys", action="append", default=[], metavar="KEY", help="only leaves under KEY (repeat)")
    p.add_argument(
        "--rename",
        nargs=2,
        action="append",
        default=[],
        metavar=("REGEX", "REPLACEMENT"),
        help="rename tensors ('.'-joined key paths), first match wins (repeat)",
    )
    p.add_argument("--dtype", help="write floating leaves in this dtype (bfloat16, float16, float32)")
    p.add_argument("--max-file-mib", type=float, default=5 * 1024, help="largest file before a new shard (MiB)")
    p.add_argument("--max-host-mib", type=float, default=256, help="host memory for data in flight (MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in OUT")


def _add_policies(sub: Any) -> None:
    p = _add(sub, "prune", _prune)
    p.add_argument("base")
    for name, text in (("last", "the N newest"), ("every", "steps that are multiples of N"), ("best", "the N best")):
        p.add_argument(f"--keep-{name}", type=int, metavar="N", help=f"keep {text} permanent checkpoints")
    _metric_options(p, "for --keep-best")
    p.add_argument(
        "--after",
        type=int,
        metavar="STEP",
        help="delete every checkpoint with a step above STEP (a rewind: a later resume continues from STEP's "
        "trajectory); with --keep-* too, those rules apply to the checkpoints up to STEP",
    )
    p.add_argument("--yes", action="store_true", help="delete (only the library's own files)")
    p = _add(sub, "plan", cli_plan.plan_command)
    p.add_argument("--every", type=int, action="append", default=[], metavar="N", help="save every N steps (repeat)")
    p.add_argument("--until", type=int, action="append", default=[], metavar="STEP", help="... up to STEP (repeat)")
    p.add_argument("--save-interval", type=float, metavar="SECONDS", help="a temporary checkpoint after SECONDS")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="the run's last step")
    p.add_argument("--step-time", type=float, default=1.0, metavar="SECONDS", help="seconds per step (default 1)")
    p.add_argument("--no-final", action="store_true", help="no forced save at the last step (on_train_end)")
    for name in ("last", "every"):
        p.add_argument(f"--keep-{name}", type=int, metavar="N", help=f"retention at the end: --keep-{name} N")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2, as every other error (subcommands'
    parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    """The command's argument parser (``ckpt-callbacks --help``)."""
    doc = (__doc__ or "").split("\n\n")
    top = _Parser(
        prog="ckpt-callbacks",
        description="List, inspect, verify, prune and compare checkpoints written by ckpt_callbacks\n"
        "(local paths, file://, s3://, gs://); plan a save policy before a run.",
        epilog="examples:\n"
        + doc[1].replace("    ckpt-callbacks", "  ckpt-callbacks")
        + "\n\n"
        + doc[2].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_reading(sub)
    _add_export(sub)
    _add_policies(sub)
    cli_layout.add_parser(sub)
    return top


def _quiet_stdout() -> None:
    """After ``| head`` closed the pipe: nothing more reaches it, not even the exit-time flush."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor (a doctest's stdout)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except (CheckpointError, OSError, ValueError) as e:  # ValueError: TensorStore's storage errors, bad options
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, never a traceback, on whatever input
        print(
            f"error: internal error, please report it: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
