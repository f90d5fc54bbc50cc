"""Summarize a `py-spy record --threads --format raw` file: samples per thread, and per thread the
functions that hold the most samples on top of the stack (self) and anywhere in it (total).
    python3 benchmarks/pyspy_summary.py pyspy.txt [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    per_thread: collections.Counter = collections.Counter()
    self_t: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total_t: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in open(args.path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        funcs = [re.sub(r" \(.*?:\d+\)$", "", f).strip() for f in frames[1:]] or ["?"]
        per_thread[thread] += int(n)
        self_t[thread][funcs[-1]] += int(n)
        for f in set(funcs):
            total_t[thread][f] += int(n)
    grand = sum(per_thread.values()) or 1
    for thread, n in per_thread.most_common():
        print(f"\n{thread}: {n} samples ({100 * n / grand:.0f}%)")
        print("  self:  " + "; ".join(f"{f} {100 * c / n:.0f}%" for f, c in self_t[thread].most_common(args.top)))
        print("  total: " + "; ".join(f"{f} {100 * c / n:.0f}%" for f, c in total_t[thread].most_common(args.top)))


if __name__ == "__main__":
    main()
