"""Loader of gemv.cu: the skinny GEMM of small-batch decode (weights streamed once)."""
from __future__ import annotations

import torch

from workers.kernels._nvrtc import aligned, function, i32, i64, launch, ptr, spec

MAX_M = 8
WARPS = 4


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether gemv can run x[M,K] @ w[N,K]^T: 1 <= M <= MAX_M, K % 8 == 0, rows 16-byte aligned."""
    M, K = x.shape
    return (1 <= M <= MAX_M and K % 8 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and w.is_contiguous() and x.dtype == w.dtype and aligned(x, w))


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[M,K] @ w[N,K]^T (+ bias[N]) -> [M,N], for M <= MAX_M (check `supported` first)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    fn = function(spec("gemv", x.dtype), f"gemv_m{M}")
    launch(fn, ((N + WARPS - 1) // WARPS,), (WARPS * 32,),
           (ptr(x), i64(x.stride(0)), ptr(w), ptr(None if bias is None else bias.contiguous()), ptr(y),
            i32(N), i32(K)))
    return y
