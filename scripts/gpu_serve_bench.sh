#!/usr/bin/env bash
# One device call for the served system: `orch smoke` on the GPU, then the 8B shape served by
# `orch apply configs/single-gpu.yaml` and benched with `orch bench` against the engine alone.
#   scripts/gpu_serve_bench.sh            (GPU machine; results under $OUT and benchmarks/results/)
# Env: TOPO (topology, default configs/single-gpu.yaml), GRID1/CONC1 and GRID2/CONC2 (bench points),
#      MAKE_MODEL=8b|tiny (what to write at the topology's model.path), NAME (results name), SKIP_SMOKE=1,
#      SKIP_ENGINE=1 (no engine-alone baseline; it runs after the served bench, on the freed GPU),
#      REQ_ARGS (request counts for both, e.g. "--min-requests 16 --warmup 8"), GRID2= (empty: one grid only),
#      PYSPY=1 (py-spy the rank actor and its front end during the bench; PYSPY_DELAY seconds in).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_serve_out}; mkdir -p "$OUT"
TOPO=${TOPO:-configs/single-gpu.yaml}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
NAME=${NAME:-serving-8b-$(echo "$GPU" | tr ' ' '-' | tr 'A-Z' 'a-z' | cut -c1-20)}
GRID1=${GRID1:-128/128}; CONC1=${CONC1:-1,8,64,256}
GRID2=${GRID2-2048/128}; CONC2=${CONC2:-1,8,64}     # 256 x 2176 tokens of KV do not fit 80 GB
export ORCH_HOME=${ORCH_HOME:-/tmp/orch-home}
t0=$SECONDS
step() {  # results so far go to $OUT at every step: a run cut short still returns them
  cp benchmarks/results/"$NAME"*.json benchmarks/results/"$NAME"*.png "$OUT"/ 2>/dev/null
  echo "=== [$((SECONDS - t0)) s] $*"
}

if [ -z "${SKIP_SMOKE:-}" ]; then
  step "orch smoke (tiny model through Ray, checked against the CPU reference)"
  timeout 300 orch smoke 2>&1 | tail -12 | tee "$OUT/smoke.log"
fi

model=$(python3 -c "from orchestrator.topology import load_topology as l; print(l('$TOPO').model.path)")
serve=$(python3 -c "
from orchestrator.topology import load_topology as l; s = l('$TOPO').serve
t = l('$TOPO'); print(f'--device {\"cpu\" if t.device == \"cpu\" else \"cuda\"} --max-num-seqs {s.max_num_seqs} --max-seq-len {s.max_seq_len} --max-num-batched-tokens '
      f'{s.max_num_batched_tokens} --block-size {s.block_size} --kv-cache-fraction {s.kv_cache_fraction}')")
if [ ! -f "$model/config.json" ]; then
  step "writing a random ${MAKE_MODEL:-8b} checkpoint to $model"
  if [ "${MAKE_MODEL:-8b}" = tiny ]; then orch tiny-model "$model"
  else python3 -c "
import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from bench_convert import write_checkpoint
print(write_checkpoint(Path('$model'), 32) / 1e9, 'GB')"; fi
fi
shards=$(python3 -c "
from orchestrator.topology import load_topology as l; from workers.convert import shards_root
t = l('$TOPO'); print(shards_root(t.build.artifacts, t.model.path) / 'tp1-pp1')")
step "orch convert $TOPO"
timeout 300 orch convert "$TOPO" 2>&1 | tail -3
step "orch apply $TOPO"
timeout 600 orch apply "$TOPO" 2>&1 | tail -12 | tee "$OUT/apply.log"
endpoint=$(tail -1 "$OUT/apply.log")
step "orch bench against $endpoint"
if [ -n "${PYSPY:-}" ]; then   # py-spy the serving rank actor and its gRPC front end during the first points
  ( sleep "${PYSPY_DELAY:-20}"
    rank=$(pgrep -f "ray::RankActor" | head -1); front=$(pgrep -P "$rank" -f multiprocessing | head -1)
    [ -n "$rank" ] && py-spy record --pid "$rank" --duration 12 --threads --nonblocking --format raw -o "$OUT/pyspy_rank.txt" >/dev/null 2>&1 &
    [ -n "$front" ] && py-spy record --pid "$front" --duration 12 --threads --nonblocking --format raw -o "$OUT/pyspy_frontend.txt" >/dev/null 2>&1 &
    wait ) &
fi
timeout 600 python3 benchmarks/bench_serving.py client --endpoint "$endpoint" --name "$NAME" \
  --engine-results "benchmarks/results/$NAME-engine.json" --device-name "$GPU" --grid "$GRID1" --concurrency "$CONC1" ${REQ_ARGS:-} 2>&1 | tail -12
[ -n "$GRID2" ] && timeout 600 python3 benchmarks/bench_serving.py client --endpoint "$endpoint" --name "$NAME" --merge \
  --engine-results "benchmarks/results/$NAME-engine.json" --device-name "$GPU" --grid "$GRID2" --concurrency "$CONC2" ${REQ_ARGS:-} 2>&1 | tail -12
wait
for f in "$OUT"/pyspy_rank.txt "$OUT"/pyspy_frontend.txt; do [ -f "$f" ] && python3 benchmarks/pyspy_summary.py "$f" --top 8; done
step "orch status / delete"
orch status 2>&1 | tail -8
orch delete "$TOPO" 2>&1 | tail -2
if [ -z "${SKIP_ENGINE:-}" ]; then
step "engine alone (the baseline): $GRID1 @ $CONC1, $GRID2 @ $CONC2"
timeout 600 python3 benchmarks/bench_serving.py engine --shards "$shards" --name "$NAME-engine" \
  --grid "$GRID1" --concurrency "$CONC1" $serve ${REQ_ARGS:-} 2>&1 | tail -8
[ -n "$GRID2" ] && timeout 600 python3 benchmarks/bench_serving.py engine --shards "$shards" --name "$NAME-engine" --merge \
  --grid "$GRID2" --concurrency "$CONC2" $serve ${REQ_ARGS:-} 2>&1 | tail -8
fi
if [ -z "${SKIP_ENGINE:-}" ]; then
  step "served/engine ratios"
  python3 benchmarks/bench_serving.py ratios --name "$NAME" --engine-results "benchmarks/results/$NAME-engine.json" 2>&1 | tail -12
fi
step "done"
