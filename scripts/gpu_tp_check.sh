#!/usr/bin/env bash
# Tensor-parallel check on a multi-GPU host (device kinds nvidia-h100-x2 / -x4): the kernel cache warmed by
# the single-GPU fp32 engine tests, then the kernels-over-NCCL GPU test alone (TP_K: its pytest -k) with the
# ranks' logs and NCCL / c10d debug output; if it still runs after TP_TIMEOUT seconds, every rank's Python
# and native stacks are dumped (py-spy, in .devbundle) into $OUT/tp_stacks.txt before it is killed. Then,
# unless SKIP_BENCH=1, benchmarks/bench_tp.py --tp ${TP:-2}.
#   OUT=... scripts/gpu_tp_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_tp_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ORCH_KERNEL_CACHE=${ORCH_KERNEL_CACHE:-/tmp/orch-kernels}
t0=$SECONDS
say() { echo "=== [$((SECONDS - t0)) s] $*"; }
say "warm the kernel cache"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py -k "fp32_greedy and True" 2>&1 | tail -1
say "kernels over NCCL: -k ${TP_K:-kernels_match and 2-1}"
TORCH_CPP_LOG_LEVEL=INFO NCCL_DEBUG=WARN TORCH_NCCL_ENABLE_MONITORING=1 TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=60 \
  python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_engine.py -k "${TP_K:-kernels_match and 2-1}" \
  > "$OUT/tp_test.log" 2>&1 &
pid=$!
for _ in $(seq "${TP_TIMEOUT:-150}"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
if kill -0 "$pid" 2>/dev/null; then
  say "still running: stacks of every rank into $OUT/tp_stacks.txt"
  for p in $(pgrep -f "multiprocessing.spawn|pytest"); do
    echo "--- pid $p: $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-120)"; py-spy dump --native --pid "$p" 2>&1 | head -80
  done > "$OUT/tp_stacks.txt"
  grep -B2 -A12 "Thread.*MainThread\|active" "$OUT/tp_stacks.txt" | head -60
  kill "$pid"; pkill -f multiprocessing.spawn
fi
wait "$pid" 2>/dev/null
grep -v "^\s*$" "$OUT/tp_test.log" | grep -iv "^I.*ProcessGroupNCCL.cpp.*\(NCCL_\|TORCH_\)" | tail -40
if [ -z "${SKIP_BENCH:-}" ]; then
  say "bench_tp --tp ${TP:-2}"
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_tp.py --tp "${TP:-2}" --out "$OUT/decode_8b_tp${TP:-2}.json" \
    --name "decode_8b_tp${TP:-2}" --batches "${BATCHES:-1,64}" --budget-s 5 --bs1-steps 128 2>&1 | grep "bench_tp tp\|Error"
fi
say "done"
