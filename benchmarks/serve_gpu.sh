#!/usr/bin/env bash
# Serve a random ~1B Llama-shaped model with `orch serve` on one GPU and drive it with `orch bench`.
# Usage (repo root, GPU machine): benchmarks/serve_gpu.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/serve-gpu}
mkdir -p "$out"
work=$(mktemp -d)
python3 - <<'PY' 2>&1
import sys, torch, grpc, google.protobuf as pb
print(sys.version.split()[0], "torch", torch.__version__, "grpcio", grpc.__version__, "protobuf", pb.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
from protos.orch.v1 import orch_pb2, orch_pb2_grpc
from protos.kserve import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
import grpc_health.v1.health, grpc_reflection.v1alpha.reflection, prometheus_client, tokenizers, safetensors
print("imports ok")
PY
t0=$(date +%s)
python3 - "$work" <<'PY'
import sys, time
from pathlib import Path
from workers.models.tiny import write_random_checkpoint
from workers.convert import convert_checkpoint
w = Path(sys.argv[1]); t = time.time()
m = write_random_checkpoint(w / "m", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=32000,
                            max_position_embeddings=4096)
convert_checkpoint(m, w / "shards", 1, 1, "bfloat16")
print(f"checkpoint + convert {time.time() - t:.1f} s")
PY
python3 -m orchestrator.cli serve --shards "$work/shards" --device cuda --port 50051 --metrics-port 51051 \
  --max-num-seqs 64 --max-seq-len 1024 --max-num-batched-tokens 2048 --kv-cache-fraction 0.5 > "$out/serve.log" 2>&1 &
pid=$!
python3 - $pid <<'PY' || { echo "server did not start"; kill $pid; exit 1; }
import os, sys, time
from orchestrator.client import OrchClient
pid, end = int(sys.argv[1]), time.time() + 300
with OrchClient("127.0.0.1:50051") as c:
    while True:
        try:
            c.wait_ready(5); print("ready"); break
        except Exception:
            if time.time() > end or not os.path.exists(f"/proc/{pid}"):
                sys.exit(1)
PY
for c in 1 16 64; do
  n=$((c < 8 ? 16 : 4 * c))
  python3 -m orchestrator.cli bench --endpoint 127.0.0.1:50051 --input-len 128 --output-len 128 \
    --concurrency $c --num-requests $n --wait-ready 300 --no-progress 2>&1 | tail -16
  echo "concurrency $c: rc=$?"
done
python3 -m orchestrator.cli bench --endpoint 127.0.0.1:50051 --protocol kserve --model model --input-len 128 \
  --output-len 128 --concurrency 64 --num-requests 256 --no-progress 2>&1 | tail -16
python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:51051/metrics').read().decode())" \
  | grep -E "^orch_(requests_total|prefix|preempt|kv_blocks|generated|step_tokens_(sum|count))"
kill -TERM $pid; wait $pid; echo "serve exit $?"
echo "total $(( $(date +%s) - t0 )) s"
