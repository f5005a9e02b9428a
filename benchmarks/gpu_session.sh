#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages that each fit one device call (10 minutes):
#
#   bash benchmarks/gpu_session.sh test    # build the CUDA extension; GPU tests of every backend
#   bash benchmarks/gpu_session.sh tune    # time the Triton block sizes -> $OUT/tuned.json
#   bash benchmarks/gpu_session.sh bench   # the benchmark on the GPU -> $OUT/<gpu>-<date>.json, .png
#
# From the repository root, without installing (the device machine has no network; its image
# has torch, triton, ninja and pytest).  Logs and results go to $OUT; copy tuned.json to
# fused_accum/kernels/triton_ops/ and the results to benchmarks/results/, then commit them.
set -euo pipefail
OUT=${OUT:-/tmp/fused_accum_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fused_accum_extensions}   # not under $OUT
PY=${PYTHON:-python3}

case "${1:-}" in
  test)
    "$PY" -m fused_accum info 2>&1 | tee "$OUT/info.txt"
    "$PY" -m pytest tests/test_gpu.py tests/ops tests/triton -q -rs 2>&1 | tee "$OUT/tests.txt"
    ;;
  tune)
    "$PY" -m fused_accum tune --device cuda --out "$OUT/tuned.json" 2>&1 | tee "$OUT/tune.txt"
    ;;
  bench)
    name="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().lower().replace(" ", "-"))')-$(date -u +%F)"
    "$PY" -m fused_accum bench --device cuda --json "$OUT/$name.json" --plot "$OUT/$name.png" \
      2>&1 | tee "$OUT/bench.txt"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh test|tune|bench" >&2
    exit 2
    ;;
esac
