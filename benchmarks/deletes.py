"""Deleting a checkpoint of many objects on the test servers: batched deletes against the old path.

    python benchmarks/deletes.py [--objects 10000] [--runs 3] [--stores s3 gs] [--paths old batched]

Starts moto (S3) and, with ``--stores ... gs``, fake-gcs-server on 127.0.0.1 as the tests do,
saves a checkpoint of about N objects (one zarr3 array in chunks of 4 float32,
``pack_bytes=0``) and deletes it, through a recording proxy that counts the requests; per
run, once by ``deletes.delete_checkpoint`` and once by the old path (fsspec ``rm`` of each
entry: s3fs batches DeleteObjects itself, gcsfs sends one DELETE per object to an emulator).
Prints the median and range over runs. Both servers keep objects in memory on this
machine: the figures show request counts and protocol cost, not cloud latency.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import http_proxy
import numpy as np
import object_stores

import ckpt_callbacks as cc
from ckpt_callbacks import directory as deletes
from ckpt_callbacks import directory as layout
from ckpt_callbacks import storage as paths

_ENDPOINT_VARS = {"s3": ("AWS_ENDPOINT_URL_S3",), "gs": ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}


def old_delete(loc: paths.Location) -> None:
    """The delete before this change: the marker, then fsspec's recursive ``rm`` of each entry."""
    commit = layout.read_commit_quietly(loc)
    paths.delete_entry(loc, layout.COMMIT_MARKER)
    items = set(commit.items) if commit else set()
    named = {commit.metadata, *commit.items.values()} if commit else set()
    entries = paths.list_entries(loc)
    ours = [n for n in entries if n in named or layout.is_ours(n, items)]
    for name in ours:
        paths.delete_entry(loc, name)
    if len(ours) == len(entries):
        paths.delete_tree(loc)


def measure(scheme: str, upstream: str, objects: int, delete: Callable[[paths.Location], None]) -> tuple[float, int]:
    url = f"{scheme}://{object_stores.BUCKET}/bench-{uuid.uuid4().hex}/run-1"
    chunks = max(1, objects - 3)  # plus zarr.json, manifest.json, metadata.json and COMMITTED: ~objects
    cc.save(url, {"w": np.arange(4 * chunks, dtype=np.float32)}, step=1, pack_bytes=0, max_host_bytes=128)
    loc = paths.parse(url)
    with http_proxy.recording_proxy(upstream) as proxy:
        saved = {k: os.environ[k] for k in _ENDPOINT_VARS[scheme]}
        os.environ.update(dict.fromkeys(saved, http_proxy.endpoint(proxy)))
        try:
            start = time.perf_counter()
            delete(loc)
            seconds = time.perf_counter() - start
        finally:
            os.environ.update(saved)
    if paths.has_any(loc):
        raise RuntimeError(f"{url}: objects left after the delete")
    return seconds, len(proxy.requests)


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stores", nargs="+", default=["s3"], choices=["s3", "gs"])
    parser.add_argument("--paths", nargs="+", default=["old", "batched"], choices=["old", "batched"])
    args = parser.parse_args(argv)
    print(f"a checkpoint of ~{args.objects} objects; median (range) of {args.runs} runs")
    print("| store | delete | seconds | requests |\n|---|---|---|---|")
    with contextlib.ExitStack() as stack:
        endpoints = {
            "s3": stack.enter_context(object_stores.s3_server()) if "s3" in args.stores else None,
            "gs": stack.enter_context(object_stores.gcs_server()) if "gs" in args.stores else None,
        }
        for scheme in args.stores:
            upstream = endpoints[scheme]
            assert upstream is not None
            cases = {"old": ("old: fsspec rm per entry", old_delete), "batched": ("batched", deletes.delete_checkpoint)}
            for name, delete in (cases[p] for p in args.paths):
                runs = [measure(scheme, upstream, args.objects, delete) for _ in range(args.runs)]
                seconds = [s for s, _ in runs]
                requests = [float(n) for _, n in runs]
                print(f"| {scheme} | {name} | {spread(seconds, '.2f')} | {spread(requests, '.0f')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
