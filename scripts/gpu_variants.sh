#!/usr/bin/env bash
# Several versions of the code measured in one device call. Side "base" is the working tree; each folder
# variants/NAME/ (the repository's paths, holding that variant's versions of the files it changes: see
# scripts/make_variant.sh) is copied over the tree as side NAME. Optionally each side's GPU tests first
# (TESTS_K: a pytest -k expression; TESTS_K_<side> overrides it for one side, '-' in the side's name
# written as '_', 'all' runs every GPU test, empty skips the side; PAR_TESTS=1 runs the sides' tests
# concurrently), then bench_decode run round-robin (ROUNDS rounds, default 2), results under $OUT as
# NAME_<side><round>.json and a summary of the graph replay times at the end.
#   scripts/gpu_variants.sh RUN_NAME [bench_decode args...]      e.g. --sections copy,build,bs1
# variants/ is git-ignored: name it in the device call's carry (with .devbundle).
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-variants}; shift || true
OUT=${OUT:-/tmp/gpu_variants_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ORCH_KERNEL_CACHE=${ORCH_KERNEL_CACHE:-/tmp/orch-kernels}
SITE=${PYTHONPATH#*:}
declare -A DIR=([base]=$PWD)
SIDES=base
for v in variants/*/; do
  [ -d "$v" ] || continue
  name=$(basename "$v")
  rm -rf "/tmp/variant_$name" && mkdir -p "/tmp/variant_$name"
  tar --exclude=./.devbundle --exclude=./.git --exclude=./variants -cf - . | (cd "/tmp/variant_$name" && tar xf -)
  cp -r "$v." "/tmp/variant_$name/"
  DIR[$name]=/tmp/variant_$name
  SIDES="$SIDES $name"
done
run_tests() {  # side, -k expression
  local sel=(-k "$2"); [ "$2" = all ] && sel=()
  (cd "${DIR[$1]}" && PYTHONPATH="${DIR[$1]}:$SITE" timeout "${TESTS_TIMEOUT:-150}" \
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_gpu_engine.py \
    "${sel[@]}" > "$OUT/tests_${RUN}_$1.txt" 2>&1)
  echo "=== tests ($1, -k $2) [$SECONDS s]: $(grep "^FAILED\|^ERROR" "$OUT/tests_${RUN}_$1.txt" | head -5) $(tail -1 "$OUT/tests_${RUN}_$1.txt")"
}
for side in $SIDES; do  # PAR_TESTS=1: all sides at once (NVRTC compiles dominate and use one core each)
  var="TESTS_K_${side//-/_}"; k=${!var-${TESTS_K:-}}
  [ -n "$k" ] || continue
  if [ -n "${PAR_TESTS:-}" ]; then run_tests "$side" "$k" & else run_tests "$side" "$k"; fi
done
wait
for round in $(seq "${ROUNDS:-2}"); do
  for side in $SIDES; do
    echo "=== round $round side $side"
    (cd "${DIR[$side]}" && PYTHONPATH="${DIR[$side]}:$SITE" timeout 200 python3 benchmarks/bench_decode.py \
       --out "$OUT/${RUN}_${side}${round}.json" --name "${RUN}_${side}${round}" "$@" 2>&1 \
       | grep "bench_decode batch\|bench_decode thr\|Error\|error" | tail -4)
  done
done
python3 - "$OUT" "$RUN" $SIDES <<'PY'
import json, sys, glob
out, run, sides = sys.argv[1], sys.argv[2], sys.argv[3:]
for side in sides:
    rows = []
    for f in sorted(glob.glob(f"{out}/{run}_{side}[0-9]*.json")):
        m = json.load(open(f))["metrics"]
        rows.append({k: v for k, v in m.items() if k.endswith("graph_replay_ms") or k.endswith("step_graph_ms")})
    print(side, rows)
PY
