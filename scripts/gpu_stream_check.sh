#!/usr/bin/env bash
# One device call checking stream_gemv: its GPU tests (each test capped at 60 s: a hang fails fast), the
# kernel micro-benchmark and the batch-1 chain (bench_kernels stream,chain), then the 8B engine at batch 1.
# Logs land under $OUT as each step ends.   scripts/gpu_stream_check.sh NAME
set -uo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-stream_check}
OUT=${OUT:-/tmp/gpu_stream_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ORCH_KERNEL_CACHE=${ORCH_KERNEL_CACHE:-/tmp/orch-kernels}
t0=$SECONDS
say() { echo "=== [$((SECONDS - t0)) s] $*"; }
say "tests (-k ${TESTS_K:=stream or programmatic})"
timeout "${TESTS_S:-170}" python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 60 tests/test_kernels_gpu.py \
  -k "$TESTS_K" > "$OUT/tests_$NAME.txt" 2>&1
grep "^FAILED\|^ERROR\|Timeout" "$OUT/tests_$NAME.txt" | head -8; tail -1 "$OUT/tests_$NAME.txt"
if [ -n "${KERNELS-stream,chain}" ]; then
  say "bench_kernels ${KERNELS-stream,chain}"
  timeout "${KERNELS_S:-200}" python3 benchmarks/bench_kernels.py --out "$OUT/kernels_$NAME.json" \
    --sections "${KERNELS-stream,chain}" > "$OUT/kernels_$NAME.log" 2>&1
  grep "^chain\|best\|Error" "$OUT/kernels_$NAME.log" | cut -c1-150 | tail -40
fi
if [ -n "${SECTIONS-copy,build,bs1}" ]; then
  say "bench_decode ${SECTIONS-copy,build,bs1}"
  timeout "${DECODE_S:-200}" python3 benchmarks/bench_decode.py --out "$OUT/$NAME.json" --name "$NAME" \
    --sections "${SECTIONS-copy,build,bs1}" ${BENCH_EXTRA:-} > "$OUT/decode_$NAME.log" 2>&1
  grep "bench_decode\|Error" "$OUT/decode_$NAME.log" | cut -c1-200 | tail -12
  python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print({k: v for k, v in m.items() if 'bs1' in k or 'build' in k}); print('stream', json.dumps(m.get('tuning', {}).get('stream')))" "$OUT/$NAME.json"
fi
say done
