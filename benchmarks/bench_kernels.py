"""Kernel microbenchmarks on the GPU at Llama-3.1-8B shapes: gemv vs cuBLAS (GB/s of weights streamed),
decode attention (GB/s of KV read) and the small fused kernels (us per call). Times are medians of
CUDA-event timings of calls captured in a CUDA graph (no host launch overhead), inputs rotated so that
weights do not sit in L2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.kernels import (cublaslt, gemv, paged_attention, rms_norm, rope_cache, silu_mul, skinny_gemm,  # noqa: E402
                             stream_gemv, tma_gemm)
from workers.kernels.autotune import time_ms  # noqa: E402
from workers.kernels.tuning import LT_BUCKETS  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def _rotated_weights(n: int, k: int, dt: torch.dtype, scale: float = 1.0) -> list[torch.Tensor]:
    """Random [n,k] weight copies, 512 MB or more in all, that the timed calls cycle through (not from L2)."""
    return [torch.randn(n, k, device="cuda", dtype=dt) * scale for _ in range(max(2, (512 << 20) // (n * k * 2)))]


def bench_gemv(out: dict) -> None:
    dt = torch.bfloat16
    for name, (n, k) in SHAPES.items():
        ws = _rotated_weights(n, k, dt)
        copies = len(ws)
        x1 = torch.randn(1, k, device="cuda", dtype=dt)
        for c in gemv.CHOICES:
            ms = time_ms(lambda i, c=c: gemv.gemv(x1, ws[i], choice=c), copies, reps=30)
            tag = f"rows{c[0]}_unroll{c[1]}_{'gpugrid' if c[2] else 'fullgrid'}"
            out[f"gemv_{name}_m1_{tag}_gb_s"] = round(n * k * 2 / 1e9 / (ms / 1e3), 1)
        if name == "gate_up":   # with silu(gate) * up in the epilogue, as decode runs it
            ms = time_ms(lambda i: gemv.gemv(x1, ws[i], glu=True), copies, reps=30)
            out[f"gemv_{name}_m1_glu_gb_s"] = round(n * k * 2 / 1e9 / (ms / 1e3), 1)
        for m in (1, 2, 4, 8):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            ours = time_ms(lambda i: gemv.gemv(x, ws[i]), copies, reps=30)
            cub = time_ms(lambda i: F.linear(x, ws[i]), copies, reps=30)
            gb = n * k * 2 / 1e9
            out[f"gemv_{name}_m{m}_gb_s"] = round(gb / (ours / 1e3), 1)
            out[f"cublas_{name}_m{m}_gb_s"] = round(gb / (cub / 1e3), 1)
        del ws


def _bench_choices(out: dict, tag: str, buckets, choices, run, fits, label: str, lt: bool = False) -> None:
    """A decode GEMM of ours at each row bucket against cuBLAS (and, with `lt`, cuBLASLt's best offered
    algorithm) in the same run: weight bandwidth of every choice that fits and of the best. run(x, w, choice),
    fits(choice, m, n, k); `label` formats a choice into its metric names."""
    dt = torch.bfloat16
    for name, (n, k) in SHAPES.items():
        ws = _rotated_weights(n, k, dt)
        copies, gb = len(ws), n * k * 2 / 1e9
        for m in buckets:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            per = {c: time_ms(lambda i, c=c: run(x, ws[i], c), copies, reps=30) for c in choices if fits(c, m, n, k)}
            for c, ms in per.items():
                out[f"{tag}_{name}_m{m}_{label.format(*c)}_gb_s"] = round(gb / (ms / 1e3), 1)
            best = min(per, key=per.get)
            out[f"{tag}_{name}_m{m}_best_gb_s"] = round(gb / (per[best] / 1e3), 1)
            out[f"{tag}_{name}_m{m}_best_choice"] = label.format(*best)
            cub = time_ms(lambda i: F.linear(x, ws[i]), copies, reps=30)
            out[f"cublas_{name}_m{m}_gb_s"] = round(gb / (cub / 1e3), 1)
            algos = cublaslt.algorithms(x, ws[0]) if lt and cublaslt.supported(x, ws[0]) else []
            if algos:
                t = min(time_ms(lambda i, a=a: cublaslt.matmul(x, ws[i], a), copies, reps=30) for a in algos)
                out[f"cublaslt_best_{name}_m{m}_gb_s"] = round(gb / (t / 1e3), 1)
            print(f"{tag} {name} m{m}: best {out[f'{tag}_{name}_m{m}_best_gb_s']} GB/s ({label.format(*best)}), "
                  f"cuBLAS {out[f'cublas_{name}_m{m}_gb_s']}, cuBLASLt best "
                  f"{out.get(f'cublaslt_best_{name}_m{m}_gb_s')}", flush=True)
        del ws


def bench_skinny(out: dict) -> None:
    """skinny_gemm at decode batch rows against cuBLAS: weight bandwidth, every choice and the best."""
    _bench_choices(out, "skinny", skinny_gemm.ROW_BUCKETS, skinny_gemm.CHOICES,
                   lambda x, w, c: skinny_gemm.skinny_gemm(x, w, choice=c),
                   lambda c, m, n, k: skinny_gemm.fits(c, m, torch.bfloat16), "bn{}_split{}_bk{}_st{}")


def bench_tma(out: dict) -> None:
    """tma_gemm at decode batch rows against cuBLAS (torch's and cuBLASLt's best offered algorithm)."""
    _bench_choices(out, "tma", tma_gemm.ROW_BUCKETS, tma_gemm.CHOICES,
                   lambda x, w, c: tma_gemm.tma_gemm(x, w, choice=c), lambda c, m, n, k: tma_gemm.fits(c, m),
                   "wg{}_split{}_st{}", lt=True)


def bench_stream(out: dict) -> None:
    """stream_gemv at 1-4 rows, every choice that fits, against cuBLAS (gemv's figures: the gemv section)."""
    dev = torch.cuda.current_device()
    _bench_choices(out, "stream", (1, 2, 4), stream_gemv.CHOICES,
                   lambda x, w, c: stream_gemv.stream_gemv(x, w, choice=c),
                   lambda c, m, n, k: stream_gemv.plan(c, m, n, k, False, dev) is not None, "kb{}_ring{}_bps{}")


def bench_lt(out: dict) -> None:
    """cuBLASLt's heuristic algorithms at decode batch rows: the fastest against the first (what torch runs)."""
    dt = torch.bfloat16
    for name, (n, k) in SHAPES.items():
        ws = _rotated_weights(n, k, dt, k ** -0.5)
        copies, gb = len(ws), n * k * 2 / 1e9
        for m in (b for b in LT_BUCKETS if b <= 256):   # decode batches (prefill rows: bench_gemm)
            x = torch.randn(m, k, device="cuda", dtype=dt)
            algos = cublaslt.algorithms(x, ws[0])
            per = [time_ms(lambda i, a=a: cublaslt.matmul(x, ws[i], a), copies, reps=30) for a in algos]
            cub = time_ms(lambda i: F.linear(x, ws[i]), copies, reps=30)
            best = min(range(len(per)), key=per.__getitem__)
            ref = F.linear(x, ws[0]).float()
            err = ((cublaslt.matmul(x, ws[0], algos[best]).float() - ref).norm() / ref.norm()).item()
            out[f"lt_{name}_m{m}_algos"] = len(algos)
            out[f"lt_{name}_m{m}_first_gb_s"] = round(gb / (per[0] / 1e3), 1)
            out[f"lt_{name}_m{m}_best_gb_s"] = round(gb / (per[best] / 1e3), 1)
            out[f"lt_{name}_m{m}_best_index"] = best
            out[f"lt_{name}_m{m}_best_rel_err"] = float(f"{err:.2e}")
            out[f"cublas_{name}_m{m}_gb_s"] = round(gb / (cub / 1e3), 1)
            out[f"lt_{name}_m{m}_all_gb_s"] = [round(gb / (t / 1e3), 1) for t in per]
        del ws


def bench_chain(out: dict) -> None:
    """The batch-1 decode step's kernels at the 8B shape, one CUDA graph per chain, kernel families added in
    turn: gemvs alone (the floor left if every other kernel were fused away), + the two RMSNorms, + rope /
    cache write and attention (context 128): what each family adds to the step, with and without PDL."""
    import os

    from workers.kernels import _nvrtc, autotune, tuning

    dt, L, H, I, V = torch.bfloat16, 32, 4096, 14336, 128256
    nh, nkv, hd, ctx = 32, 8, 128, 128

    def w(n, k):
        return torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5

    layers = [{"qkv": w((nh + 2 * nkv) * hd, H), "o": w(H, nh * hd), "gu": w(2 * I, H), "down": w(H, I),
               "n1": torch.rand(H, device="cuda", dtype=dt) + 0.5, "n2": torch.rand(H, device="cuda", dtype=dt) + 0.5}
              for _ in range(L)]
    lm, nf = w(V, H), torch.rand(H, device="cuda", dtype=dt) + 0.5
    shapes = {"qkv": ((nh + 2 * nkv) * hd, H), "o": (H, nh * hd), "gate_up": (2 * I, H), "down": (H, I), "lm_head": (V, H)}
    t = tuning.Tuning()
    autotune.tune_gemv_into(t, shapes, dt)
    stream = autotune.tune_stream(shapes, dt, t, margin=10.0)   # every shape's fastest stream_gemv choice
    out["chain_stream_choices"] = {key: per.get(1) for key, per in stream.items()}
    per_batch = autotune.tune_attention(nh, nkv, hd, dt, (1,), (ctx,))
    t.attention_splits, t.attention_stages = {1: per_batch[1][0]}, {1: per_batch[1][1]}
    old_table = tuning.CURRENT
    tuning.set_current(t)
    out["chain_attention_choice"] = list(per_batch[1])
    blocks = ctx // 16
    kcs = [torch.randn(blocks, 16, nkv, hd, device="cuda", dtype=dt) for _ in range(L)]
    vcs = [torch.randn(blocks, 16, nkv, hd, device="cuda", dtype=dt) for _ in range(L)]
    bt = torch.arange(blocks, device="cuda", dtype=torch.int32).view(1, blocks)
    cl = torch.full((1,), ctx, device="cuda", dtype=torch.int32)
    pos = torch.full((1,), ctx - 1, device="cuda", dtype=torch.int64)
    cos, sin = torch.rand(ctx, hd // 2, device="cuda"), torch.rand(ctx, hd // 2, device="cuda")
    x0, r0 = torch.randn(1, H, device="cuda", dtype=dt), torch.randn(1, H, device="cuda", dtype=dt)

    def step(norm: bool, attn: bool) -> None:
        mv = (lambda x, w, glu=False: stream_gemv.stream_gemv(x, w, glu=glu)) if t.stream else gemv.gemv
        x, res = x0, r0
        for i, ly in enumerate(layers):
            h = rms_norm.rms_norm(x, ly["n1"], 1e-5, res) if norm else (x, res)
            h, res = h
            qkv = mv(h, ly["qkv"])
            if attn:
                q, k, v = qkv.view(1, nh + 2 * nkv, hd).split([nh, nkv, nkv], dim=1)
                rope_cache.rope_and_cache_write(q, k, v, pos, cos, sin, kcs[i], vcs[i], pos)
                o_in = paged_attention.paged_decode_attention(q, kcs[i], vcs[i], bt, cl, hd ** -0.5).view(1, nh * hd)
            else:
                o_in = qkv[:, :nh * hd]
            x = mv(o_in, ly["o"])
            h, res = rms_norm.rms_norm(x, ly["n2"], 1e-5, res) if norm else (x, res)
            x = mv(mv(h, ly["gu"], glu=True), ly["down"])
        if norm:
            x, _ = rms_norm.rms_norm(x, nf, 1e-5, res)
        mv(x, lm)

    gb = (sum(t.numel() for ly in layers for k, t in ly.items() if k not in ("n1", "n2")) + lm.numel()) * 2 / 1e9
    out["chain_weight_gb"] = round(gb, 3)
    for pdl in ("1", "0"):
        os.environ["ORCH_PDL"] = pdl
        _nvrtc._pdl_enabled.cache_clear()
        for kernel in ("gemv", "stream"):   # the GEMVs on gemv, then on stream_gemv (each shape's fastest choice)
            t.stream = stream if kernel == "stream" else {}
            for name, norm, attn in (("gemv", False, False), ("gemv_norm", True, False), ("full", True, True)):
                if kernel == "stream" and pdl == "0" and name != "full":
                    continue
                ms = time_ms(lambda i: step(norm, attn), 1, reps=4)
                tag = ("" if kernel == "gemv" else "_stream") + ("" if pdl == "1" else "_nopdl")
                out[f"chain_bs1_{name}{tag}_ms"] = round(ms, 4)
                out[f"chain_bs1_{name}{tag}_weight_tb_s"] = round(gb / ms, 3)
                print(f"chain {name}{tag}: {ms:.4f} ms", flush=True)
    t.stream = {}
    del os.environ["ORCH_PDL"]
    _nvrtc._pdl_enabled.cache_clear()
    tuning.set_current(old_table)   # later sections launch with their defaults again


def bench_attention(out: dict) -> None:
    dt, nh, nkv, hd, bs = torch.bfloat16, 32, 8, 128, 16
    for b, ctx in ((1, 128), (1, 2048), (1, 8192), (64, 256), (64, 2048), (256, 256), (256, 1024)):
        per = -(-ctx // bs)
        kc = torch.randn(b * per, bs, nkv, hd, device="cuda", dtype=dt)
        vc = torch.randn_like(kc)
        bt = torch.randperm(b * per, device="cuda").to(torch.int32).view(b, per)
        cl = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, nh, hd, device="cuda", dtype=dt)
        kv_bytes = 2 * b * ctx * nkv * hd * 2
        for st in paged_attention.STAGE_CHOICES:   # default splits; K/V in registers (0) or staged
            ms = time_ms(lambda i: paged_attention.paged_decode_attention(q, kc, vc, bt, cl, hd ** -0.5, stages=st),
                         1, reps=30)
            out[f"attn_b{b}_ctx{ctx}_st{st}_us"] = round(ms * 1e3, 1)
            out[f"attn_b{b}_ctx{ctx}_st{st}_gb_s"] = round(kv_bytes / (ms / 1e3) / 1e9, 1)
        del kc, vc


def bench_small(out: dict) -> None:
    dt = torch.bfloat16
    for t in (1, 256):
        x, r, w = (torch.randn(t, 4096, device="cuda", dtype=dt) for _ in range(3))
        out[f"rms_norm_t{t}_us"] = round(time_ms(lambda i: rms_norm.rms_norm(x, w[0], 1e-5, r), 1, reps=50) * 1e3, 2)
        gu = torch.randn(t, 28672, device="cuda", dtype=dt)
        out[f"silu_mul_t{t}_us"] = round(time_ms(lambda i: silu_mul.silu_mul(gu), 1, reps=50) * 1e3, 2)
        q, k, v = (torch.randn(t, h, 128, device="cuda", dtype=dt) for h in (32, 8, 8))
        cos, sin = torch.rand(4096, 64, device="cuda"), torch.rand(4096, 64, device="cuda")
        kc = torch.zeros(64, 16, 8, 128, device="cuda", dtype=dt)
        pos = torch.arange(t, device="cuda")
        out[f"rope_cache_t{t}_us"] = round(time_ms(lambda i: rope_cache.rope_and_cache_write(
            q, k, v, pos, cos, sin, kc, kc, pos), 1, reps=50) * 1e3, 2)
        out[f"torch_empty_add_t{t}_us"] = round(time_ms(lambda i: x + r, 1, reps=50) * 1e3, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--sections", default="small,attention,gemv,skinny",
                   help="comma-separated: small, attention, gemv, skinny, tma, stream, lt, chain")
    args = p.parse_args()
    out: dict = {}
    sections = {"small": bench_small, "attention": bench_attention, "gemv": bench_gemv, "skinny": bench_skinny,
                "tma": bench_tma, "stream": bench_stream, "lt": bench_lt, "chain": bench_chain}
    for fn in (sections[s] for s in args.sections.split(",")):
        t0 = time.perf_counter()
        fn(out)
        print(f"{fn.__name__}: {time.perf_counter() - t0:.1f} s", flush=True)
    res = {"name": "kernels_8b_shapes", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": torch.cuda.get_device_name(), "command": "python benchmarks/bench_kernels.py", "metrics": out}
    Path(args.out).write_text(json.dumps(res, indent=1))
    for k, v in out.items():
        print(f"{k:40s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
