#!/usr/bin/env bash
# One device call for an engine-speed iteration: quick kernel checks, the 8B decode benchmark (with and
# without programmatic dependent launch), GEMM choices at decode batch sizes. Results under $OUT.
#   scripts/gpu_perf_round.sh NAME          (e.g. decode_8b_h100_v4)
# Env: TESTS_K (pytest -k of the quick kernel checks), KERNELS (bench_kernels.py sections to run first, e.g.
#      gemv), SECTIONS (bench_decode sections), BENCH_EXTRA (more bench_decode args), SKIP_NOPDL=1, FULL_TESTS=1 also runs every GPU test; SKIP_GEMM=1 skips bench_gemm.py; SERVE=1 also runs the
#      served-vs-engine bench (bench_serving.py run, `orch serve` on the decode benchmark's shard) at
#      128/128 c64,256 with a py-spy profile of the server's threads (benchmarks/pyspy_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-decode_8b_round}
OUT=${OUT:-/tmp/gpu_perf_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ORCH_KERNEL_CACHE=${ORCH_KERNEL_CACHE:-/tmp/orch-kernels}
t0=$SECONDS
say() { echo "=== [$((SECONDS - t0)) s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
if [ -z "${FULL_TESTS:-}" ]; then  # FULL_TESTS runs every GPU test further down instead
  say "quick kernel checks"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "${TESTS_K:-programmatic or graph or gemv or skinny}" 2>&1 | tail -5
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py 2>&1 | tail -3
fi
if [ -n "${KERNELS:-}" ]; then
  say "kernel micro-benchmarks ($KERNELS)"
  timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT/kernels_$NAME.json" --sections "$KERNELS" 2>&1 | tail -80
fi
say "decode benchmark"
timeout 330 python3 benchmarks/bench_decode.py --out "$OUT/$NAME.json" --name "$NAME" \
  --sections "${SECTIONS:-copy,build,bs1,throughput,hf}" --workloads 128/128 --batches 64,256 --budget-s 10 ${BENCH_EXTRA:-} 2>&1 \
  | grep -v "^ \|^{\|^}" | tail -30
python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; [print(k, v) for k, v in m.items() if k != 'tuning']; print('tuning', json.dumps(m.get('tuning')))" "$OUT/$NAME.json"
if [ -z "${SKIP_NOPDL:-}" ]; then
  say "batch 1 without PDL"
  ORCH_PDL=0 timeout 120 python3 benchmarks/bench_decode.py --out "$OUT/${NAME}_nopdl.json" --name "${NAME}_nopdl" \
    --sections copy,bs1 2>&1 | tail -6
fi
if [ -n "${FULL_TESTS:-}" ]; then
  say "all GPU tests"
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 300 tests/test_kernels_gpu.py \
    tests/test_gpu_engine.py 2>&1 | tail -8
fi
if [ -n "${SERVE:-}" ]; then
  say "served vs engine (orch serve on /tmp/bench_decode/shard)"
  ( for _ in $(seq 120); do pid=$(pgrep -f "orchestrator.cli serve" | head -1); [ -n "$pid" ] && break; sleep 1; done
    sleep "${PYSPY_DELAY:-25}"; [ -n "$pid" ] && py-spy record --pid "$pid" --duration 15 --threads --nonblocking \
      --format raw -o "$OUT/pyspy_serve.txt" >/dev/null 2>&1 ) &
  timeout 360 python3 benchmarks/bench_serving.py run --shards /tmp/bench_decode/shard --name "serve_$NAME" \
    --results-dir "$OUT" --grid 128/128 --concurrency ${SERVE_CONC:-64,256} --min-requests 16 --warmup 8 --max-seq-len 4096 \
    --kv-cache-fraction 0.9 2>&1 | grep -v "^starting" | tail -14
  wait
  [ -f "$OUT/pyspy_serve.txt" ] && python3 benchmarks/pyspy_summary.py "$OUT/pyspy_serve.txt" | tail -40
fi
if [ -z "${SKIP_GEMM:-}" ]; then
  say "GEMM choices"
  timeout 120 python3 benchmarks/bench_gemm.py --out "$OUT/gemm_${NAME}.json" --m 16,64,256 2>&1 | tail -16
fi
say "done"
