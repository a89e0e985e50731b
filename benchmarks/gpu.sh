#!/usr/bin/env bash
# GPU benchmark: one prepared run on a single GPU machine without network (<= 8 minutes).
#   bash benchmarks/gpu.sh [GIB] [OUT_DIR]
# Needs jax (CUDA), flax, optax, orbax-checkpoint, tensorstore, fsspec on the machine. Wheels
# that are missing there (crc32c) travel in benchmarks/wheels/; fetch them beforehand with
#   pip download --no-deps --only-binary=:all: crc32c -d benchmarks/wheels
# Measures, in one run on the same state: the disk's direct-I/O write rate (dd), orbax async
# save (blocking, total) and restore, ckpt_callbacks save_async (blocking, total) and restore.
set -euo pipefail
GIB="${1:-8}"
OUT_DIR="${2:-${OUT:-benchmarks/results}}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${CKPT_BENCH_DIR:-$(mktemp -d /tmp/ckpt-gpu-XXXX)}"
mkdir -p "$OUT_DIR" "$WORK"
if ! python3 -c "import crc32c" 2>/dev/null; then
  python3 -m pip install --no-index --find-links "$HERE/benchmarks/wheels" crc32c >/dev/null
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Disk limit: direct I/O, 16 MiB blocks, the same byte count as the state.
COUNT=$(( GIB * 64 ))
DD_OUT=$(dd if=/dev/zero of="$WORK/dd.bin" bs=16M count="$COUNT" oflag=direct conv=fsync 2>&1 | tail -1)
rm -f "$WORK/dd.bin"
echo "dd: $DD_OUT"
PYTHONPATH="$HERE" DD_LINE="$DD_OUT" python3 - "$GIB" "$WORK" "$OUT_DIR" <<'PY'
import datetime, json, os, re, shutil, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
import ckpt_callbacks as cc

gib, work, out_dir = float(sys.argv[1]), sys.argv[2], sys.argv[3]
m = re.search(r"([\d.]+) ([GM])B/s", os.environ["DD_LINE"])
disk = float(m.group(1)) * (1 if m.group(2) == "G" else 1e-3) if m else float("nan")
n = 32
rows = int(gib * 2**30 / 4 / n / 8192)
state = {f"w{i:02d}": jax.random.normal(jax.random.key(i), (rows, 8192), jnp.float32) for i in range(n)}
jax.block_until_ready(state)
nbytes = sum(x.nbytes for x in state.values())
targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

def fresh(name, k):
    path = os.path.join(work, f"{name}-{k}")
    shutil.rmtree(path, ignore_errors=True)
    return path

results = {"orbax": [], "ours": []}
ckptr = ocp.StandardCheckpointer()
for k in range(3):
    path = fresh("orbax", k)
    t0 = time.perf_counter(); ckptr.save(path, state); t1 = time.perf_counter(); ckptr.wait_until_finished()
    t2 = time.perf_counter()
    r0 = time.perf_counter(); jax.block_until_ready(ckptr.restore(path, targets)); r1 = time.perf_counter()
    results["orbax"].append({"blocking": t1 - t0, "total": t2 - t0, "restore": r1 - r0})
    shutil.rmtree(path, ignore_errors=True)
    path = fresh("ours", k)
    t0 = time.perf_counter(); h = cc.save_async(path, state); t1 = time.perf_counter(); h.wait(); t2 = time.perf_counter()
    r0 = time.perf_counter(); jax.block_until_ready(cc.restore(path, template=targets)); r1 = time.perf_counter()
    results["ours"].append({"blocking": t1 - t0, "total": t2 - t0, "restore": r1 - r0})
    shutil.rmtree(path, ignore_errors=True)
ckptr.close()
med = {who: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for who, rs in results.items()}
gb = nbytes / 1e9
report = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ"), "device": str(jax.devices()[0]),
          "gb": gb, "disk_direct_write_gb_s": disk, "median": med, "runs": results}
o, c = med["orbax"], med["ours"]
lines = [f"# GPU benchmark {report['date']} on {report['device']}", "",
         f"{gb:.2f} GB float32 state ({n} leaves) on one GPU, median of 3; disk direct-I/O write {disk:.2f} GB/s.", "",
         "| | blocking s | save total s | save GB/s | restore s | restore GB/s |", "|---|---|---|---|---|---|"]
for who, r in (("orbax StandardCheckpointer", o), ("ckpt_callbacks", c)):
    lines.append(f"| {who} | {r['blocking']:.3f} | {r['total']:.2f} | {gb / r['total']:.2f} | {r['restore']:.2f} | "
                 f"{gb / r['restore']:.2f} |")
lines += ["", f"- blocking vs orbax: {c['blocking'] / o['blocking']:.3f}x (target <= 0.1)",
          f"- save throughput vs disk direct-I/O: {gb / c['total'] / disk:.2f}x (target >= 0.9)",
          f"- restore vs orbax: {o['restore'] / c['restore']:.2f}x (target >= 1.0)"]
text = "\n".join(lines) + "\n"
os.makedirs(out_dir, exist_ok=True)
stem = f"gpu-{report['date']}"
open(os.path.join(out_dir, stem + ".md"), "w").write(text)
open(os.path.join(out_dir, stem + ".json"), "w").write(json.dumps(report, indent=1))
print(text)
PY
rm -rf "$WORK"
