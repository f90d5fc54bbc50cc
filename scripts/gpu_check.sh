#!/usr/bin/env bash
# One device call: GPU tests, kernel microbenchmarks and the 8B decode benchmark, results under $OUT.
#   scripts/gpu_check.sh [tests|micro|bench|all]...      (default: all)
# Env: BENCH_ARGS (extra args for benchmarks/bench_decode.py), PYTEST_ARGS.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 ORCH_KERNEL_CACHE=${ORCH_KERNEL_CACHE:-/tmp/orch-kernels}
what=${*:-all}
rc=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
if [[ " $what " == *" tests "* || "$what" == all ]]; then
  t0=$SECONDS
  python3 -m pytest -q -m gpu -p no:cacheprovider -x --timeout 300 ${PYTEST_ARGS:-tests/test_kernels_gpu.py tests/test_gpu_engine.py} \
    2>&1 | tee "$OUT/pytest.log" | tail -40
  rc=$((rc | ${PIPESTATUS[0]}))
  echo "gpu tests: $((SECONDS - t0)) s, rc=$rc"
fi
if [[ " $what " == *" micro "* || "$what" == all ]]; then
  python3 benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/micro.log" | tail -30
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [[ " $what " == *" bench "* || "$what" == all ]]; then
  python3 benchmarks/bench_decode.py --out "$OUT/bench_decode.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -60
  rc=$((rc | ${PIPESTATUS[0]}))
fi
exit $rc
