"""Loader of gemv.cu: the skinny GEMM of small-batch decode (weights streamed once)."""
from __future__ import annotations

import functools

import torch

from workers.kernels import tuning
from workers.kernels._nvrtc import aligned, function, i32, i64, launch, ptr, spec

MAX_M = 8
WARPS = 4
# (output rows per warp, 16-byte loads in flight per lane and row), grid (True: sized to the GPU, grid-
# stride; False: one row group per warp): the launch choices the build times for each weight shape.
VARIANTS = ((1, 4), (1, 8), (2, 4))
CHOICES = tuple((r, u, g) for r, u in VARIANTS for g in (True, False))


REGS_PER_SM = 65536


@functools.lru_cache(maxsize=None)
def _max_blocks(fn: object, device: torch.device) -> int:
    """Blocks of a grid-stride launch: as many as are resident at once on every SM (by registers)."""
    regs = int(getattr(fn, "num_regs", 0) or 64)
    per_sm = max(1, min(16, REGS_PER_SM // (regs * WARPS * 32)))
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether gemv can run x[M,K] @ w[N,K]^T: 1 <= M <= MAX_M, K % 8 == 0, rows 16-byte aligned."""
    M, K = x.shape
    return (1 <= M <= MAX_M and K % 8 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and w.is_contiguous() and x.dtype == w.dtype and aligned(x, w))


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         choice: tuple[int, int, bool] | None = None, *, glu: bool = False) -> torch.Tensor:
    """x[M,K] @ w[N,K]^T (+ bias[N]) -> [M,N], for M <= MAX_M (check `supported` first); `choice`
    (rows per warp, loads in flight per lane and row, GPU-sized grid) defaults to the tuning table's.
    With `glu`, w is [gate; up] (2I rows) and the result is silu(gate) * up, [M,I] (each warp streams
    rows j and j + I: two rows in flight whatever the choice's rows per warp)."""
    M, K = x.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    rows, unroll, gpu_grid = choice or tuning.CURRENT.gemv_choice(w.shape[0], K)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    fn = function(spec("gemv", x.dtype, ROWS=rows, UNROLL=unroll), f"gemv_m{M}{'_glu' if glu else ''}")
    per_block = WARPS * (1 if glu else rows)
    blocks = (N + per_block - 1) // per_block
    if gpu_grid:
        blocks = min(blocks, _max_blocks(fn, x.device))
    launch(fn, (blocks,), (WARPS * 32,),
           (ptr(x), i64(x.stride(0)), ptr(w), ptr(None if bias is None else bias.contiguous()), ptr(y),
            i32(N), i32(K)))
    return y
