#!/usr/bin/env bash
# On the GPU machine, in one call: build with CUDA, run the CUDA tests, run the benchmarks, and leave everything
# under $OUT (default ./out). Usage: bash scripts/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; date -u; git rev-parse HEAD; } \
  > "$OUT/env.txt" 2>&1
PYPERF_CUDA=1 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
$PY -m pyperf.info > "$OUT/info.txt" 2>&1
$PY -m pytest -q -x tests -k "cuda" > "$OUT/pytest_cuda.txt" 2>&1; echo "pytest cuda rc=$?"
tail -3 "$OUT/pytest_cuda.txt"
$PY -m pyperf.bench all --device cuda --json "$OUT/bench_cuda.json" --csv "$OUT/bench_cuda.csv" \
  --plot "$OUT/bench_cuda.png" > "$OUT/bench_cuda.txt" 2>&1; echo "bench rc=$?"
cat "$OUT/bench_cuda.txt" | tail -80
