#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages that each fit one device call (10 minutes):
#
#   bash benchmarks/gpu_session.sh test    # build the CUDA extension; GPU tests of every backend
#   bash benchmarks/gpu_session.sh tune    # time the Triton block sizes -> $OUT/tuned.json
#   bash benchmarks/gpu_session.sh bench   # the benchmark on the GPU -> $OUT/<gpu>-<date>.json, .png
#   bash benchmarks/gpu_session.sh all     # the three in one call, each stage under its own time
#                                          # cap (INFO_S, TEST_S, TUNE_S, OPS_S, WINDOWS_S s), so one
#                                          # that overruns cannot starve the others
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
  all)
    export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
    cap() { local s=$1; shift; timeout -k 5 "$s" "$@" || echo "!! exit $? (cap ${s} s): $*"; }
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
      --format=csv 2>&1 | tee "$OUT/gpu.txt" || true
    { cap "${INFO_S:-100}" "$PY" -m fused_accum info
      cap "${TEST_S:-160}" "$PY" -m pytest tests/test_gpu.py tests/triton -q -rs \
        -p no:cacheprovider --timeout 90; } 2>&1 | tee "$OUT/tests.txt"
    cap "${TUNE_S:-90}" "$PY" -m fused_accum tune --device cuda --repeats 9 \
      --out fused_accum/kernels/triton_ops/tuned.json 2>&1 | tee "$OUT/tune.txt"
    cp fused_accum/kernels/triton_ops/tuned.json "$OUT/" 2>/dev/null || true
    name="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().lower().replace(" ", "-"))')-$(date -u +%F)"
    for level in ops windows; do
      cap "$([ $level = ops ] && echo "${OPS_S:-70}" || echo "${WINDOWS_S:-150}")" \
        "$PY" -m fused_accum bench --device cuda --level $level --json "$OUT/$name-$level.json" \
        2>&1 | tee "$OUT/bench-$level.txt"
    done
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh test|tune|bench|all" >&2
    exit 2
    ;;
esac
