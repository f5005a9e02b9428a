#!/usr/bin/env bash
# A second, shorter GPU call after fixes: the GPU tests, the host time per gradient
# (benchmarks/host_overhead.py), the windows that regressed, a profile of
# where their time goes, and ncu on the accumulate kernel against torch's add_.  Each stage under
# its own cap (seconds).  Logs to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/fused_accum_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=16
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fused_accum_extensions}
cap() { local s=$1; shift; timeout -k 5 "$s" "$@" || echo "!! exit $? (cap ${s} s): $*"; }
name="$(python3 -c 'import torch; print(torch.cuda.get_device_name().lower().replace(" ", "-"))')-$(date -u +%F)"
cap "${TEST_S:-100}" python3 -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider --timeout 60 \
  2>&1 | tee "$OUT/tests.txt"
cap "${HOST_S:-45}" python3 benchmarks/host_overhead.py --device cuda \
  --json "$OUT/$name-host-overhead.json" 2>&1 | tee "$OUT/host-overhead.txt"
cap "${WINDOWS_S:-80}" python3 -m fused_accum bench --device cuda --level windows \
  --configs "${CONFIGS:-b,e,f}" --json "$OUT/$name-windows.json" 2>&1 | tee "$OUT/windows.txt"
cap "${PROFILE_S:-25}" python3 benchmarks/profile_window.py e > "$OUT/profile.txt" 2>&1
cap "${NCU_S:-30}" ncu --clock-control none --kernel-name regex:'accumulate_kernel|elementwise' \
  --section SpeedOfLight --section Occupancy --section WarpStateStats \
  python3 benchmarks/ncu_accumulate.py > "$OUT/ncu.txt" 2>&1
tail -5 "$OUT/tests.txt"; grep -c "" "$OUT/profile.txt" "$OUT/ncu.txt"
