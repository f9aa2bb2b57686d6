#!/usr/bin/env bash
# On the GPU machine, in one command of at most 8 minutes, the build included: build pyperf with CUDA (sm_90, every
# core), run every CUDA test (no stop at the first failure, a per-test timeout), compute-sanitizer memcheck, racecheck
# and synccheck on a short program that calls every CUDA kernel once (scripts/gpu_smoke.py), and the benchmarks in a
# quick mode. Writes at most 8 files under $OUT (default ./out):
#   env.txt  build.txt  pytest.txt  sanitizer.txt  bench.json  bench.csv  bench.png  steps.txt
# and prints the time of each step. Needs only what the GPU machine has: python3 with torch (2.11 there), nvcc,
# ninja, pytest (pytest-timeout when present), compute-sanitizer; no network.
#   bash scripts/gpu_check.sh            PY=python3 OUT=/path; the steps' time limits (s), sized for the H100
#                                         machine's 16 cores: BUILD_S=240 TEST_S=150 SAN_S=60 (each tool) BENCH_S=120
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PY:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
START=$SECONDS
rm -f "$OUT"/{steps,pytest,sanitizer,build}.txt "$OUT"/bench.{json,csv,png}
: > "$OUT/steps.txt"
# step NAME LIMIT_S LOG CMD...: runs CMD under `timeout`, its output appended to LOG; prints and records its time
# and exit status
step() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  printf '%-12s rc=%-3s %4ss (limit %ss; %ss since start)\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" \
    "$((SECONDS - START))" | tee -a "$OUT/steps.txt"
  return $rc
}

{ nvidia-smi; $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)";
  nvcc --version | tail -2; date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head; } \
  > "$OUT/env.txt" 2>&1

# 1. build (CUDA kernels for sm_90 only)
rm -f "$OUT/build.log.full"
step build "${BUILD_S:-240}" "$OUT/build.log.full" env PYPERF_CUDA=1 $PY setup.py -q build_ext --inplace
build_rc=$?
tail -40 "$OUT/build.log.full" > "$OUT/build.txt"; rm -f "$OUT/build.log.full"
$PY -m pyperf.info >> "$OUT/build.txt" 2>&1
if [ $build_rc -ne 0 ]; then cat "$OUT/build.txt"; exit 1; fi

# 2. every CUDA test: device="cuda" cases and the CUDA-only tests; no -x, a timeout per test
timeout_opt=()
$PY -c "import pytest_timeout" 2>/dev/null && timeout_opt=(-p timeout --timeout 120)
step pytest "${TEST_S:-150}" "$OUT/pytest.txt" \
  $PY -m pytest -q -rfE -p no:cacheprovider "${timeout_opt[@]}" tests -k "cuda"
tail -5 "$OUT/pytest.txt"

# 3. compute-sanitizer on every kernel once: memory errors, shared-memory races, barrier misuse
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    echo "== $tool" >> "$OUT/sanitizer.txt"
    step "$tool" "${SAN_S:-60}" "$OUT/sanitizer.txt" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 $PY scripts/gpu_smoke.py
  done
  grep -E "ERROR SUMMARY|gpu_smoke:|RACECHECK SUMMARY" "$OUT/sanitizer.txt"
else
  echo "compute-sanitizer not found: sanitizer step skipped" | tee "$OUT/sanitizer.txt"
fi

# 4. the benchmarks, quick
rm -f "$OUT/bench.txt.full"
step bench "${BENCH_S:-120}" "$OUT/bench.txt.full" $PY -m pyperf.bench all --device cuda --quick --no-progress \
  --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/bench.png"
tail -60 "$OUT/bench.txt.full"; rm -f "$OUT/bench.txt.full"

echo "gpu_check: $((SECONDS - START)) s in all; results in $OUT:"; ls "$OUT"
cat "$OUT/steps.txt"
