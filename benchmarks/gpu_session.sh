#!/usr/bin/env bash
# The lent-GPU session in one device call of at most 9 minutes, on a bare machine (torch 2.11,
# Triton 3.6, 16 cores, no network), from the repository root:
#
#   bash benchmarks/gpu_session.sh             # on the GPU; results under $OUT
#   bash benchmarks/gpu_session.sh --dry-run   # every stage on this machine's CPU at small sizes
#
# Stages, in order of priority, each under its own cap (seconds, *_S below) and all within the
# session's SESSION_S; a stage that would start with under MIN_STAGE_S left is skipped:
#
#   machine   GPU, driver, clocks (nvidia-smi), torch, Triton, CUDA versions
#   build     the three extensions at once, one process each: CPU ops, CUDA ops, the collector
#   tests     tests/test_gpu.py
#   gemm      benchmarks/linear_gemm.py: accumulate_linear's library GEMM against the Triton GEMM
#   host      benchmarks/host_overhead.py at group bounds 0 (a launch per gradient) and 0.03 MB
#   windows   bench --level windows --configs e,f,b, with peak memory
#   profile   benchmarks/profile_window.py e (torch.profiler: host and device time per op)
#   more      bench --level windows --configs a1,a2,c,d, while time remains
#   ncu       ncu on benchmarks/ncu_accumulate.py (the accumulate kernels against torch's add_)
#
# What comes back ($OUT, written as each stage runs; the device tool returns at most 8 files):
#   session.log          every stage's output, then a summary (also the end of stdout)
#   host-overhead.json   windows.json   windows-more.json    (each rewritten as rows come in)
#   linear-gemm.json
#   profile-e.txt        ncu-accumulate.txt
# Commit them under benchmarks/results/ with the machine and date in their names.
set -uo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "" | __build | __summary) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fused_accum_extensions}   # not under $OUT

if [ "${1:-}" = __build ]; then
  # The three builds at once (each a single source: one compiler each), one log each, then the
  # logs one after another.  A CUDA build without a GPU (the dry run) is reported, not failed.
  tmp=$(mktemp -d)
  declare -A pid
  for kind in cpu cuda collector; do
    "$PY" -c '
import os, sys, time
from fused_accum.kernels import build
kind, start = sys.argv[1], time.perf_counter()
error = build.load_collector()[1] if kind == "collector" else build.load(kind)
print(f"build {kind}:", error or "ok", f"({time.perf_counter() - start:.0f} s)")
dry_no_gpu = kind == "cuda" and os.environ.get("GPU_SESSION_DRY") == "1" and "no CUDA" in (error or "")
sys.exit(0 if error is None or dry_no_gpu else 1)' "$kind" >"$tmp/$kind.log" 2>&1 &
    pid[$kind]=$!
  done
  rc=0
  for kind in cpu cuda collector; do
    wait "${pid[$kind]}" || rc=1
    cat "$tmp/$kind.log"
  done
  rm -rf "$tmp"
  exit $rc
fi

if [ "${1:-}" = __summary ]; then
  exec "$PY" - "$OUT" <<'EOF'
import json, os, re, sys
out = sys.argv[1]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        print(f"{name}: none ({type(exc).__name__})")
        return None

def spread(r, key):
    text = f"{r[key]:.2f}x ({r[key + '_p10']:.2f}-{r[key + '_p90']:.2f})"
    return text + (" *" if r.get(key + "_within_noise") else "  ")

for name in ("windows.json", "windows-more.json"):
    doc = load(name)
    if doc is None:
        continue
    state = "complete" if doc.get("complete") else "INCOMPLETE"
    print(f"{name} ({state}, {doc['machine'].get('gpu') or doc['machine']['cpu']}): time vs torch "
          "best (p10-p90, * within noise), peak memory vs torch best")
    for r in doc["windows"]:
        if r["pipeline"] != "torch best":
            peak = r.get("peak_memory_vs_torch_best")
            print(f"  ({r['config']}) {r['pipeline']:20s} {spread(r, 'time_vs_torch_best')}  "
                  f"{r['time_s'] * 1e3:8.1f} ms  peak {'n/a' if peak is None else f'{peak:.2f}x'}")
    for failure in doc.get("failures", []):
        print(f"  FAILED ({failure['config']}): {failure['error']}")
doc = load("host-overhead.json")
if doc is not None:
    print(f"host-overhead.json ({'complete' if doc.get('complete') else 'INCOMPLETE'}):")
    for r in doc["rows"]:
        print(f"  {r['hook']:24s} group {r['group_mb']:<5g} MB  {r['ratio']:.2f}x "
              f"({r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}){' *' if r['ratio_within_noise'] else '  '}"
              f" extra {r['extra_us_per_gradient']:6.2f} us/gradient")
    for failure in doc.get("failures", []):
        print(f"  FAILED {failure['hook']} (exit {failure['returncode']})")
# What the device tool brings back: at most 8 files, 16 MiB each, 2 folders down, plain names.
files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
print(f"$OUT: {len(files)} files, "
      + ", ".join(f"{os.path.relpath(f, out)} {os.path.getsize(f) // 1024} KB" for f in sorted(files)))
bad = [f for f in files if os.path.getsize(f) > 16 * 2**20 or os.path.relpath(f, out).count("/") > 2
       or not re.fullmatch(r"[A-Za-z0-9._/-]+", os.path.relpath(f, out))]
if len(files) > 8 or bad:
    print(f"WARNING: the device tool will not bring all of this back: {len(files)} files; {bad}")
EOF
fi

if [ $DRY = 1 ]; then
  # The same stages on this CPU at small sizes, with caps no slow machine reaches; one thread
  # each (tiny tensors: more threads only wait on each other on a busy machine).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEV=cpu
  OUT=${OUT:-/tmp/fused_accum_dry_run}
  SESSION_S=${SESSION_S:-3600}
  HOST_ARGS=(--layers 4 --repeats 3)
  GEMM_ARGS=(--scale 0.02 --repeats 2)
  BENCH_ARGS=(--quick --repeats 2)
  PROFILE_ARGS=(--quick)
  MORE_CONFIGS=${MORE_CONFIGS:-d}
  cap() { echo "${!1:-900}"; }
else
  DEV=cuda
  OUT=${OUT:-/tmp/fused_accum_gpu_session}
  SESSION_S=${SESSION_S:-540}
  HOST_ARGS=()
  GEMM_ARGS=()
  BENCH_ARGS=(--config-timeout "${CONFIG_S:-120}")
  PROFILE_ARGS=()
  MORE_CONFIGS=${MORE_CONFIGS:-a1,a2,c,d}
  cap() { echo "${!1:-$2}"; }
fi
export GPU_SESSION_DRY=$DRY OUT
mkdir -p "$OUT"
LOG=$OUT/session.log
for f in session.log host-overhead.json windows.json windows-more.json profile-e.txt ncu-accumulate.txt \
         linear-gemm.json; do
  rm -f "$OUT/$f"   # this script's own files, from an earlier run here
done
RESERVE_S=${RESERVE_S:-15}     # kept for the summary
MIN_STAGE_S=${MIN_STAGE_S:-20}
T0=$SECONDS
SUMMARY=()
say() { echo "$*" | tee -a "$LOG"; }

# stage NAME CAP_S [--to FILE] COMMAND...: runs COMMAND under min(CAP_S, what the session has
# left), its output to the log (or to FILE, whose end goes to the log).
stage() {
  local name=$1 cap=$2 to=""
  shift 2
  if [ "$1" = --to ]; then to=$2; shift 2; fi
  local left=$(( SESSION_S - (SECONDS - T0) - RESERVE_S ))
  (( cap > left )) && cap=$left
  if (( cap < MIN_STAGE_S )); then
    say "=== $name: skipped, ${left} s left in the session"
    SUMMARY+=("$(printf '%-9s %-8s %5s %6s' "$name" skipped - -)")
    return
  fi
  say "=== $name (cap ${cap} s, $(( SECONDS - T0 )) s into the session): $*"
  local t=$SECONDS rc
  if [ -n "$to" ]; then
    timeout -k 5 "$cap" "$@" >"$to" 2>&1
    rc=$?
    tail -n 25 "$to" | tee -a "$LOG"
    say "(all of it in $(basename "$to"))"
  else
    timeout -k 5 "$cap" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  local status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=capped; elif [ $rc != 0 ]; then status=failed; fi
  say "=== $name: $status (exit $rc) in $(( SECONDS - t )) s"
  SUMMARY+=("$(printf '%-9s %-8s %5s %6s' "$name" "$status" "$rc" "$(( SECONDS - t ))")")
}

say "fused_accum GPU session$([ $DRY = 1 ] && echo ', DRY RUN on the CPU') at $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null) on $(hostname), $(nproc) cores; session cap ${SESSION_S} s"

machine() {
  if [ $GPU_SESSION_DRY = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    nvcc --version | tail -n 2
  fi
  "$PY" -c '
import importlib.metadata as meta, os, platform
def version(name):
    try:
        return meta.version(name)
    except meta.PackageNotFoundError:
        return "not installed"
print("python", platform.python_version(), "| torch", version("torch"), "| triton", version("triton"),
      "| cores", os.cpu_count())'
}
export -f machine
export PY GPU_SESSION_DRY
stage machine "$(cap MACHINE_S 30)" bash -c machine

stage build "$(cap BUILD_S 180)" bash "$SCRIPT" __build

pytest_args=(-q -rs -p no:cacheprovider)
"$PY" -c 'import pytest_timeout' 2>/dev/null && pytest_args+=(--timeout 90)
stage tests "$(cap TESTS_S 150)" "$PY" -m pytest tests/test_gpu.py "${pytest_args[@]}"

stage gemm "$(cap GEMM_S 40)" "$PY" benchmarks/linear_gemm.py --device $DEV "${GEMM_ARGS[@]}" \
  --json "$OUT/linear-gemm.json"

stage host "$(cap HOST_S 100)" "$PY" benchmarks/host_overhead.py --device $DEV --group-mb 0,0.03 \
  "${HOST_ARGS[@]}" --json "$OUT/host-overhead.json"

stage windows "$(cap WINDOWS_S 200)" "$PY" -m fused_accum bench --device $DEV --level windows \
  --configs e,f,b "${BENCH_ARGS[@]}" --json "$OUT/windows.json"

stage profile "$(cap PROFILE_S 60)" --to "$OUT/profile-e.txt" "$PY" benchmarks/profile_window.py \
  --device $DEV "${PROFILE_ARGS[@]}" e

stage more "$(cap MORE_S 200)" "$PY" -m fused_accum bench --device $DEV --level windows \
  --configs "$MORE_CONFIGS" "${BENCH_ARGS[@]}" --json "$OUT/windows-more.json"

if [ $DRY = 1 ]; then   # no ncu here: the script's calls alone, small
  stage ncu "$(cap NCU_S 60)" --to "$OUT/ncu-accumulate.txt" "$PY" benchmarks/ncu_accumulate.py \
    --device cpu --mb 4
else
  stage ncu "$(cap NCU_S 60)" --to "$OUT/ncu-accumulate.txt" ncu --clock-control none \
    --kernel-name regex:'accumulate_kernel|elementwise' --section SpeedOfLight --section Occupancy \
    --section WarpStateStats "$PY" benchmarks/ncu_accumulate.py
fi

say ""
say "=== summary after $(( SECONDS - T0 )) s (stage, status, exit, seconds)"
for line in "${SUMMARY[@]}"; do say "$line"; done
bash "$SCRIPT" __summary 2>&1 | tee -a "$LOG"
failed=$(printf '%s\n' "${SUMMARY[@]}" | grep -c -E ' (failed|capped) ' || true)
say "=== $failed stage(s) failed or capped; everything is in $LOG"
[ "$failed" = 0 ]
