#!/usr/bin/env bash
# A/B of source versions in one device call: the tree with old_tree/ copied over it (A; old_tree/ mirrors
# the repository's paths and holds the A versions of the changed files) against the working tree (B),
# bench_decode sections run alternately A, B, A, B. Results under $OUT.
#   mkdir -p old_tree && git diff --name-only | xargs -I{} sh -c 'mkdir -p old_tree/$(dirname {}) && git show HEAD:{} > old_tree/{}'
#   scripts/gpu_ab.sh NAME [bench_decode args...]     (delete old_tree/ afterwards)
# With alt_tree/ (same layout, overlaid on the working tree) a third side C runs too: A, B, C, A, B, C.
set -uo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-ab}; shift || true
OUT=${OUT:-/tmp/gpu_ab_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ORCH_KERNEL_CACHE=${ORCH_KERNEL_CACHE:-/tmp/orch-kernels}
SIDES="a b"
for side in a c; do   # a: old_tree/ over the tree; c (when alt_tree/ exists): alt_tree/ over it, a third variant
  overlay=old_tree; [ "$side" = c ] && overlay=alt_tree
  [ -d "$overlay" ] || continue
  [ "$side" = c ] && SIDES="a b c"
  rm -rf /tmp/ab_$side && mkdir -p /tmp/ab_$side
  tar --exclude=./.devbundle --exclude=./.git --exclude=./old_tree --exclude=./alt_tree -cf - . | (cd /tmp/ab_$side && tar xf -)
  cp -r "$overlay/." /tmp/ab_$side/
done
SITE=${PYTHONPATH#*:}
for round in 1 2; do
  for side in $SIDES; do
    dir=$PWD; [ "$side" != b ] && dir=/tmp/ab_$side
    echo "=== round $round side $side"
    (cd "$dir" && PYTHONPATH="$dir:$SITE" timeout 200 python3 benchmarks/bench_decode.py \
       --out "$OUT/${NAME}_${side}${round}.json" --name "${NAME}_${side}${round}" "$@" 2>&1 | grep "bench_decode batch\|bench_decode thr\|Error\|error" | tail -4)
  done
done
