"""Loader of tma_gemm.cu: decode-batch GEMMs (up to 128 rows) on Hopper's TMA copies and warpgroup MMAs
(sm_90 only), weights streamed once, split-K reduced across a thread-block cluster."""
from __future__ import annotations

import ctypes
import functools

import torch

from workers.kernels import tuning
from workers.kernels._nvrtc import (TensorMapArg, _driver, _error_name, aligned, arch, clusters_supported, function,
                                   i32, launch, max_shared_per_block, ptr, set_shared_limit, spec)

ROW_BUCKETS = (8, 16, 32, 64, 128)   # compiled row counts (the MMA's N): M runs padded to the next one
MAX_M = ROW_BUCKETS[-1]
BK = 64                               # K columns a stage: one 128-byte line of each row
# (consumer warpgroups of 64 weight rows, K splits = cluster size, stages): what the build times per weight
# shape and row bucket
CHOICES = tuple((wg, s, st) for wg in (1, 2) for s in (1, 2, 4) for st in (4, 6, 8))   # (8 splits never won)
_DTYPES = {torch.float16: 6, torch.bfloat16: 9}   # CUtensorMapDataType
_SWIZZLE_128B, _L2_PROMOTION_256B = 3, 3


def row_bucket(m: int) -> int:
    """The compiled row count that runs an M-row GEMM."""
    return next(b for b in ROW_BUCKETS if b >= m)


def available(device: int | None = None) -> bool:
    """Whether this GPU runs tma_gemm: an sm_90 (its wgmma instructions exist there only), clusters."""
    return _available(torch.cuda.current_device() if device is None else device)


@functools.lru_cache(maxsize=None)
def _available(device: int) -> bool:
    return arch(device) == "sm_90" and clusters_supported(device)


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether tma_gemm can run x[M,K] @ w[N,K]^T here: 16-bit, M <= MAX_M, K and N multiples of 8, rows
    16-byte aligned (what a tensor map takes), on an sm_90 GPU."""
    M, K = x.shape
    return (1 <= M <= MAX_M and x.dtype in _DTYPES and w.dtype == x.dtype and K % 8 == 0 and w.shape[1] == K
            and w.shape[0] % 8 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and w.is_contiguous()
            and aligned(x, w) and x.is_cuda and available(x.device.index))


def shared_bytes(choice: tuple[int, int, int], m: int) -> int:
    """Dynamic shared memory of a launch: mbarriers, alignment slack, then its stages of weight and x tiles
    (or the fp32 tile the split-K reduction parks there, if larger)."""
    wg, _, stages = choice
    mp = row_bucket(m)
    tiles = stages * (64 * wg + mp) * BK * 2
    return 16 * stages + 1023 + max(tiles, mp * (64 * wg + 4) * 4)


def fits(choice: tuple[int, int, int], m: int) -> bool:
    """Whether a choice fits one block's shared memory on this GPU at m rows."""
    return shared_bytes(choice, m) <= max_shared_per_block(torch.cuda.current_device())


def module_specs(dtype: torch.dtype, sm: str | None) -> list:
    """The compiled variants (one per row bucket) an engine build compiles ahead on an `sm` GPU."""
    if dtype not in _DTYPES or sm != "sm_90":
        return []
    return [spec("tma_gemm", dtype, MP=mp) for mp in ROW_BUCKETS]


@functools.lru_cache(maxsize=4096)
def _tensor_map(addr: int, rows: int, cols: int, row_stride: int, box_rows: int, dtype: torch.dtype) -> TensorMapArg:
    """A tensor map over a [rows, cols] 16-bit matrix at `addr` (rows `row_stride` elements apart) that
    copies boxes of [box_rows, 64] 128-byte-swizzled; rows and columns past the edge read as zeros."""
    drv = _driver()
    fn = drv.cuTensorMapEncodeTiled
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    buf = (ctypes.c_uint64 * 24)()   # the map is written 64-byte aligned inside it
    at = -ctypes.addressof(buf) % 64
    rc = fn(ctypes.c_void_p(ctypes.addressof(buf) + at), ctypes.c_int(_DTYPES[dtype]), u32(2), ctypes.c_void_p(addr),
            (u64 * 2)(cols, rows), (u64 * 1)(row_stride * 2), (u32 * 2)(BK, box_rows), (u32 * 2)(1, 1),
            ctypes.c_int(0), ctypes.c_int(_SWIZZLE_128B), ctypes.c_int(_L2_PROMOTION_256B), ctypes.c_int(0))
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled([{rows}, {cols}], box [{box_rows}, {BK}]) failed: "
                           f"{_error_name(rc)}")
    return TensorMapArg(bytes(buf)[at:at + 128])


def tma_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             choice: tuple[int, int, int] | None = None, *, glu: bool = False) -> torch.Tensor:
    """x[M,K] @ w[N,K]^T (+ bias[N]) -> [M,N] (check `supported` first); `choice` (warpgroups, K splits,
    stages) defaults to the tuning table's for this shape and row bucket. With `glu`, w is [gate; up] (2I
    rows, no bias) and the result is silu(x @ gate^T) * (x @ up^T), [M,I], rounded as the GEMM followed by
    silu_mul rounds."""
    M, K = x.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    if glu and (bias is not None or N % 8):
        raise ValueError("tma_gemm with glu takes no bias and [gate; up] halves of a multiple of 8 rows")
    mp = row_bucket(M)
    choice = tuple(choice or tuning.CURRENT.tma_choice(w.shape[0], K, M) or CHOICES[0])
    if not fits(choice, M):
        raise ValueError(f"tma_gemm choice {choice} needs {shared_bytes(choice, M)} B of shared memory at {M} "
                         f"rows: more than a block may have here")
    wg, splits, stages = choice
    cols = 32 * wg if glu else 64 * wg     # output columns a block
    k_tiles = -(-K // BK)
    splits = max(1, min(splits, k_tiles, 8))
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    fn = function(spec("tma_gemm", x.dtype, MP=mp), "tma_gemm")
    smem = shared_bytes(choice, M)
    set_shared_limit(fn, smem)
    w_map = _tensor_map(w.data_ptr(), w.shape[0], K, K, cols, w.dtype)
    x_map = _tensor_map(x.data_ptr(), M, K, x.stride(0), mp, x.dtype)
    launch(fn, (-(-N // cols), splits), (wg * 128 + 32,),
           (w_map, x_map, ptr(None if bias is None else bias.contiguous()), ptr(y), i32(M), i32(N), i32(k_tiles),
            i32(wg), i32(stages), i32(N if glu else 0)), shared_mem=smem, cluster=(1, splits, 1))
    return y
