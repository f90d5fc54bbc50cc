#!/usr/bin/env bash
# Regenerate the Python modules of protos/*.proto (committed, because the GPU machine has no
# grpcio-tools). Run from anywhere: scripts/gen_protos.sh
#
# After protoc, three edits keep the modules importable everywhere:
# - the protobuf/grpcio version guards are removed (the modules only use long-stable APIs);
# - the KServe messages go into a private descriptor pool, so that a process may also import
#   tritonclient, whose own copy of the `inference` package would otherwise clash with ours.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
protos=(protos/orch/v1/orch.proto protos/kserve/grpc_predict_v2.proto)
python3 -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "${protos[@]}"
for d in protos/orch protos/orch/v1 protos/kserve; do
  [ -f "$d/__init__.py" ] || echo '"""Generated protobuf modules (scripts/gen_protos.sh)."""' > "$d/__init__.py"
done
python3 - <<'PY'
import re
from pathlib import Path

for path in Path("protos").rglob("*_pb2*.py"):
    src = path.read_text()
    # protobuf runtime guard: drop the import and the call
    src = re.sub(r"from google\.protobuf import runtime_version as _runtime_version\n", "", src)
    src = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\((?:.|\n)*?\)\n", "", src)
    # grpcio guard in *_pb2_grpc.py: drop the version check block
    src = re.sub(r"GRPC_GENERATED_VERSION = .*?\nGRPC_VERSION = .*?\n_version_not_supported = False\n"
                 r"(?:.|\n)*?if _version_not_supported:\n(?:    .*\n|\n)*", "", src)
    if path.name == "grpc_predict_v2_pb2.py":
        src = src.replace("_descriptor_pool.Default().AddSerializedFile(",
                          "_descriptor_pool.DescriptorPool().AddSerializedFile(")
    path.write_text(src)
PY
echo "generated: $(ls protos/orch/v1/*_pb2*.py protos/kserve/*_pb2*.py | tr '\n' ' ')"
