#!/usr/bin/env bash
# A/B of kernel sources in one device call: the tree with old_kernels/* copied over workers/kernels/ (A)
# against the working tree (B), bench_decode sections run alternately A, B, A, B. Results under $OUT.
#   scripts/gpu_ab.sh NAME [bench_decode args...]     (old_kernels/ holds the A versions of changed files)
set -uo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-ab}; shift || true
OUT=${OUT:-/tmp/gpu_ab_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ORCH_KERNEL_CACHE=${ORCH_KERNEL_CACHE:-/tmp/orch-kernels}
rm -rf /tmp/ab_a && mkdir -p /tmp/ab_a
tar --exclude=./.devbundle --exclude=./.git -cf - . | (cd /tmp/ab_a && tar xf -)
cp old_kernels/* /tmp/ab_a/workers/kernels/
SITE=${PYTHONPATH#*:}
for round in 1 2; do
  for side in a b; do
    dir=$PWD; [ "$side" = a ] && dir=/tmp/ab_a
    echo "=== round $round side $side"
    (cd "$dir" && PYTHONPATH="$dir:$SITE" timeout 200 python3 benchmarks/bench_decode.py \
       --out "$OUT/${NAME}_${side}${round}.json" --name "${NAME}_${side}${round}" "$@" 2>&1 | grep "bench_decode batch\|bench_decode thr\|Error\|error" | tail -4)
  done
done
