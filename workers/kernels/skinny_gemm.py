"""Loader of skinny_gemm.cu: decode-batch GEMMs (up to 128 rows) on the tensor cores, weights streamed once."""
from __future__ import annotations

import torch

from workers.kernels import tuning
from workers.kernels._nvrtc import (aligned, function, i32, i64, launch, max_shared_per_block, ptr, set_shared_limit,
                                   spec)

ROW_BUCKETS = (16, 32, 64, 128)   # compiled row counts: M runs padded to the next one
MAX_M = ROW_BUCKETS[-1]
# (weight rows per block, K splits, K columns per stage, stages): the launch choices the build times per
# weight shape and row bucket (the tiles that won somewhere on an H100, results/kernels_8b_h100_v20.json)
CHOICES = tuple((bn, s, bk, st) for bn, bk, st in ((64, 128, 4), (128, 128, 3)) for s in (1, 2, 4, 8))
_counters: list[torch.Tensor] = []   # per-tile split counters, zero between launches (kept alive: graphs hold them)


def row_bucket(m: int) -> int:
    """The compiled row count that runs an M-row GEMM."""
    return next(b for b in ROW_BUCKETS if b >= m)


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether skinny_gemm can run x[M,K] @ w[N,K]^T: 16-bit, M <= MAX_M, K % 8 == 0, 16-byte aligned rows."""
    M, K = x.shape
    return (1 <= M <= MAX_M and x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype
            and K % 8 == 0 and w.shape[1] == K and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and w.is_contiguous() and aligned(x, w))


def shared_bytes(choice: tuple[int, int, int, int], m: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of a launch: its stages of weight and x slices."""
    bn, _, bk, stages = choice
    return stages * (bn + row_bucket(m)) * bk * dtype.itemsize


def fits(choice: tuple[int, int, int, int], m: int, dtype: torch.dtype) -> bool:
    """Whether a choice's stages fit one block's shared memory on this GPU at m rows."""
    return shared_bytes(choice, m, dtype) + 1024 <= max_shared_per_block(torch.cuda.current_device())


def module_specs(dtype: torch.dtype) -> list:
    """The compiled variants the choices use (what an engine build compiles ahead)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    return [spec("skinny_gemm", dtype, MP=mp, BN=bn, BK=bk, STAGES=st)
            for mp in ROW_BUCKETS for bn, bk, st in sorted({c[::2] + c[3:] for c in CHOICES})]


def _counter_buffer(device: torch.device, n: int) -> torch.Tensor:
    for buf in _counters:
        if buf.device == device and buf.numel() >= n:
            return buf
    if torch.cuda.is_current_stream_capturing():   # zeros made now would only be written at replay
        raise RuntimeError("skinny_gemm: run it once outside CUDA graph capture first (its split counters)")
    buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    _counters.append(buf)
    return buf


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                choice: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x[M,K] @ w[N,K]^T (+ bias[N]) -> [M,N] (check `supported` first); `choice` (weight rows per block, K
    splits, K columns per stage, stages) defaults to the tuning table's for this shape and row bucket."""
    M, K = x.shape
    N = w.shape[0]
    mp = row_bucket(M)
    choice = choice or tuning.CURRENT.skinny_choice(N, K, M) or CHOICES[0]
    if not fits(choice, M, x.dtype):
        raise ValueError(f"skinny_gemm choice {choice} needs {shared_bytes(choice, M, x.dtype)} B of shared memory "
                         f"at {M} rows: more than a block may have here")
    bn, splits, bk, stages = choice
    k_tiles = -(-K // bk)
    k_per_split = -(-k_tiles // max(1, min(splits, k_tiles))) * bk
    splits = -(-K // k_per_split)
    tiles = -(-N // bn)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = counters = None
    if splits > 1:
        ws = torch.empty(splits * tiles * bn * mp, dtype=torch.float32, device=x.device)
        counters = _counter_buffer(x.device, tiles)
    fn = function(spec("skinny_gemm", x.dtype, MP=mp, BN=bn, BK=bk, STAGES=stages), "skinny_gemm")
    smem = shared_bytes(choice, M, x.dtype)
    set_shared_limit(fn, smem)
    launch(fn, (tiles, splits), (bn // 16 * 32,),
           (ptr(x), i64(x.stride(0)), ptr(w), ptr(None if bias is None else bias.contiguous()), ptr(y), ptr(ws),
            ptr(counters), i32(M), i32(N), i32(K), i32(k_per_split)), shared_mem=smem)
    return y
