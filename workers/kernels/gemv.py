"""Loader of gemv.cu: the skinny GEMM of small-batch decode (weights streamed once)."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from workers.kernels import tuning
from workers.kernels._nvrtc import (aligned, blocks_per_sm, function, i32, i64, launch, max_shared_per_block,
                                   ptr, spec)

MAX_M = 8
WARPS = 4


class Choice(NamedTuple):
    """One launch of gemv for a weight shape. stages == 0, the register kernel: `rows` output rows per
    warp, `unroll` 16-byte loads in flight per lane and row, grid sized to the GPU (grid-stride) or one
    row group per warp. stages > 0, the bulk-copy kernel: one row per warp (a gate and an up row for glu)
    streamed into shared memory in chunks of unroll x 256 elements, `stages` chunks in flight per warp, a
    grid of as many blocks as are resident at once (rows and gpu_grid are 1 and True)."""

    rows: int
    unroll: int
    gpu_grid: bool
    stages: int = 0


# the launch choices the build times for each weight shape
CHOICES = (*(Choice(r, u, g) for r, u in ((1, 4), (1, 8), (2, 4)) for g in (True, False)),
           *(Choice(1, u, True, s) for u, s in ((8, 2), (8, 4), (4, 4), (4, 8))))


@functools.lru_cache(maxsize=None)
def bulk_copies() -> bool:
    """Whether this GPU has the bulk-copy engine and mbarrier transactions (sm_90+) the stages > 0 choices
    use (no GPU: True, so that a CPU-side listing names every variant)."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 9


def choices() -> tuple[Choice, ...]:
    """The launch choices this GPU can run."""
    return CHOICES if bulk_copies() else tuple(c for c in CHOICES if not c.stages)


def module_specs(dtype: torch.dtype) -> list:
    """The compiled variants the choices use (what an engine build compiles ahead)."""
    out = []
    for c in choices():
        s = (spec("gemv", dtype, UNROLL=c.unroll, STAGES=c.stages) if c.stages
             else spec("gemv", dtype, ROWS=c.rows, UNROLL=c.unroll))
        if s not in out:
            out.append(s)
    return out


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
         choice: tuple | None = None, *, glu: bool = False) -> torch.Tensor:
    """x[M,K] @ w[N,K]^T (+ bias[N]) -> [M,N], for M <= MAX_M (check `supported` first); `choice` (a
    Choice) defaults to the tuning table's. With `glu`, w is [gate; up] (2I rows) and the result is
    silu(gate) * up, [M,I] (each warp streams rows j and j + I: two rows in flight whatever the choice's
    rows per warp)."""
    M, K = x.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    c = Choice(*(choice or tuning.CURRENT.gemv_choice(w.shape[0], K)))
    if c.stages and not bulk_copies():
        c = Choice(1, c.unroll, True)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    name = f"gemv_m{M}{'_glu' if glu else ''}"
    smem = 0
    if c.stages:
        slot = WARPS * (2 if glu else 1) * c.unroll * 256 * x.element_size()   # one stage of every warp
        stages = max(1, min(c.stages, max_shared_per_block(x.device.index) // slot))   # float32: fewer fit
        fn = function(spec("gemv", x.dtype, UNROLL=c.unroll, STAGES=stages), name)
        smem = stages * slot
        blocks = blocks_per_sm(fn, WARPS * 32, smem) * _sms(x.device)
    else:
        fn = function(spec("gemv", x.dtype, ROWS=c.rows, UNROLL=c.unroll), name)
        per_block = WARPS * (1 if glu else c.rows)
        blocks = (N + per_block - 1) // per_block
        if c.gpu_grid:
            blocks = min(blocks, _max_blocks(fn, x.device))
    launch(fn, (blocks,), (WARPS * 32,),
           (ptr(x), i64(x.stride(0)), ptr(w), ptr(None if bias is None else bias.contiguous()), ptr(y),
            i32(N), i32(K)), shared_mem=smem)
    return y


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
