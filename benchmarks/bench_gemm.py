"""GEMM choices at decode batch sizes for the Llama-3.1-8B shapes (bf16): cuBLAS x @ W^T against the
transposed form W @ x^T (+ the transpose back), under each of torch's BLAS back ends; graph-timed.
Prints achieved weight bandwidth (TB/s) per choice, and writes --out JSON.
    python3 benchmarks/bench_gemm.py [--out FILE] [--m 16,32,64,128,256]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.kernels.autotune import L2_ROTATE_BYTES, time_ms  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--m", default="16,32,64,128,256")
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    dt = torch.bfloat16
    metrics = {}
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(8, L2_ROTATE_BYTES // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5 for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            row = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[f"{lib}_xwT"] = time_ms(lambda i: F.linear(x, ws[i]), copies)
                row[f"{lib}_wxT_T"] = time_ms(lambda i: torch.mm(ws[i], x.t()).t().contiguous(), copies)
                row[f"{lib}_wxT"] = time_ms(lambda i: torch.mm(ws[i], x.t()), copies)
            torch.backends.cuda.preferred_blas_library("cublas")
            gb = n * k * 2 / 1e9
            best = min(row, key=row.get)
            print(f"{name:8s} M={m:4d} " + "  ".join(f"{c} {gb / v:.2f}" for c, v in row.items())
                  + f"   best {best}", flush=True)
            for c, v in row.items():
                metrics[f"{name}_m{m}_{c}_tb_s"] = gb / v
        del ws
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({
            "name": Path(args.out).stem, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "command": shlex.join([sys.executable, *sys.argv]),
            "metrics": metrics}, indent=1) + "\n")


if __name__ == "__main__":
    main()
