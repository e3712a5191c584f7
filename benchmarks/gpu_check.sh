#!/usr/bin/env bash
# GPU check for a lent GPU machine (needs no internet; finishes well within 10 minutes):
#   1. the CUDA tests (tests whose name contains "cuda"; they skip themselves on a CPU),
#   2. one-step training throughput (img/s) and peak memory of diffratio-js and vsd on the
#      CIFAR-10-sized UNet (preset "cifar", random weights, random data),
#   3. extraction throughput,
# writing results under $OUT (default benchmarks/out): cuda_tests.txt, gpu_bench.json, and
# gpu_bench.md, the section to paste into benchmarks/RESULTS.md (or rerun gpu_bench.py --write).
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
timeout 180 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then   # 5 = no test selected
  echo "CUDA tests failed (exit $rc)" >&2; exit "$rc"
fi

echo "== throughput and memory" >&2
timeout 390 "$PY" benchmarks/gpu_bench.py --device cuda --json "$OUT/gpu_bench.json" --md "$OUT/gpu_bench.md"
echo "results in $OUT" >&2
