#!/usr/bin/env bash
# GPU check for a lent GPU machine (needs no internet; finishes in under 8 minutes):
#   1. the CUDA tests (tests whose name contains "cuda"; they skip themselves on a CPU), at most 60 s,
#   2. benchmarks/gpu_bench.py with a 360 s deadline: img/s and peak memory (torch.cuda.max_memory_allocated)
#      of all six one-step methods on the CIFAR-10-sized UNet (bf16 autocast, channels_last, and
#      torch.compile rows for diffratio-js and vsd), time to 1.5x / 1.1x of a digits teacher's FD
#      per method, extraction throughput,
# writing results under $OUT (default benchmarks/out): gpu.txt, cuda_tests.txt, gpu_bench.json and
# gpu_bench.md, the section of benchmarks/RESULTS.md (also written there with --write).
#
#   bash benchmarks/gpu_check.sh               # from the repository root, with .venv or python on PATH
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"
OUT="${OUT:-benchmarks/out}"

"$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", ok); sys.exit(0 if ok else 1)' \
  || { echo "no CUDA device visible: nothing to check" >&2; exit 1; }
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== CUDA tests" >&2
set +e
timeout 60 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then   # 5 = no test selected
  echo "CUDA tests failed (exit $rc)" >&2; exit "$rc"
fi

echo "== throughput, memory, time to quality" >&2
timeout 400 "$PY" benchmarks/gpu_bench.py --device cuda --compile --time-limit 360 --write \
  --json "$OUT/gpu_bench.json" --md "$OUT/gpu_bench.md"
echo "results in $OUT" >&2
