#!/usr/bin/env bash
# GPU benchmark: one prepared run on a single GPU machine without network (about 4 minutes at 8 GiB).
#   bash benchmarks/gpu.sh [GIB] [OUT_DIR]
# Needs jax (CUDA), flax, optax, orbax-checkpoint, tensorstore, fsspec and ml_dtypes on the machine.
# crc32c, which such a machine may lack, travels as a wheel in benchmarks/wheels/ (cp312, x86-64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d benchmarks/wheels crc32c
# What it measures and the targets: see benchmarks/gpu.py. Results: OUT_DIR/gpu-<date>-<device>.{md,json}.
set -euo pipefail
GIB="${1:-8}"
OUT_DIR="${2:-${OUT:-benchmarks/results}}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
if ! "$PYTHON" -c "import crc32c" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/ckpt-site "$HERE"/benchmarks/wheels/crc32c-*.whl
  export PYTHONPATH="/tmp/ckpt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import jax, orbax.checkpoint, tensorstore; print('jax', jax.__version__, jax.devices())"
exec "$PYTHON" "$HERE/benchmarks/gpu.py" --gib "$GIB" --out "$OUT_DIR" ${GPU_BENCH_ARGS:-}
