"""Loader of stream_gemv.cu: the few-row decode GEMV whose weights stream through shared memory with bulk
copies (sm_90 and later), the first ones requested while the kernel before it still runs."""
from __future__ import annotations

import functools

import torch

from workers.kernels import tuning
from workers.kernels._nvrtc import (aligned, function, i32, i64, launch, max_shared_per_block, ptr,
                                   set_shared_limit, spec)

MAX_M = 4
CWARPS = 8
THREADS = CWARPS * 32 + 32
MAX_STAGES = 64
SM_SHARED_BYTES = 228 * 1024   # shared memory of one SM on sm_90 and sm_100 (what 2 blocks an SM split)
_DTYPES = (torch.float16, torch.bfloat16)
# (KB a bulk copy aims at, KB of the ring of stages, blocks an SM): what the build times per weight shape
CHOICES = tuple((c, r, b) for c in (4, 8, 16) for r, b in ((192, 1), (128, 1), (112, 2)))


def row_bucket(m: int) -> int:
    """Each row count up to MAX_M is compiled (and tuned) on its own."""
    return m


def available(device: int | None = None) -> bool:
    """Whether this GPU has the bulk copies and transaction-count mbarriers stream_gemv uses (sm_90+)."""
    return _available(torch.cuda.current_device() if device is None else device)


@functools.lru_cache(maxsize=None)
def _available(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def module_specs(dtype: torch.dtype, sm: str | None) -> list:
    """The compiled variants (one per row count) an engine build compiles ahead on an `sm` GPU."""
    if dtype not in _DTYPES or sm is None or int(sm[3:].rstrip("a")) < 90:
        return []
    return [spec("stream_gemv", dtype, MM=m) for m in range(1, MAX_M + 1)]


def chunk_elems(k: int, chunk_kb: int) -> int:
    """Elements a bulk copy moves for rows of k elements: the largest whole fraction of a row, a multiple
    of 8 elements, within chunk_kb KB (a row of 8 elements at least)."""
    pieces = max(1, -(-k // (chunk_kb * 512)))
    while k % pieces or (k // pieces) % 8:
        pieces += 1
    return k // pieces


@functools.lru_cache(maxsize=4096)
def plan(choice: tuple[int, int, int], m: int, n: int, k: int, glu: bool,
         device: int) -> tuple[int, int, int, int] | None:
    """(chunk elements, stages, blocks, shared bytes) of a launch, or None where fewer than CWARPS stages fit.
    Stages are a multiple of CWARPS: a consumer warp then waits on each of its slots' barriers at most one
    phase ahead (a parity wait further ahead would pass on an older phase)."""
    chunk_kb, ring_kb, per_sm = choice
    props = torch.cuda.get_device_properties(device)
    blocks = min(n, per_sm * props.multi_processor_count)
    chunk = chunk_elems(k, chunk_kb)
    parts = (2 if glu else 1) * -(-n // blocks) * (k // chunk) * m * 4
    limit = min(max_shared_per_block(device), SM_SHARED_BYTES // per_sm - 1024)   # (1 KB reserved a block)
    fixed = m * k * 2 + parts + 128
    stages = min(MAX_STAGES, ring_kb * 1024 // (chunk * 2), (limit - fixed) // (chunk * 2 + 16)) // CWARPS * CWARPS
    if stages < CWARPS:   # (consumer warp w takes slots w, w + CWARPS, ..: every round of a slot, in order)
        return None
    return chunk, stages, blocks, ((16 * stages + 127) & ~127) + m * k * 2 + stages * chunk * 2 + parts


def supported(x: torch.Tensor, w: torch.Tensor, choice: tuple[int, int, int] | None = None, glu: bool = False) -> bool:
    """Whether stream_gemv can run x[M,K] @ w[N,K]^T here: 16-bit, M <= MAX_M, K % 8 == 0, rows 16-byte
    aligned, an sm_90+ GPU, and (for `choice`) at least CWARPS stages fit in shared memory."""
    M, K = x.shape
    if not (1 <= M <= MAX_M and x.dtype in _DTYPES and w.dtype == x.dtype and w.shape[1] == K and K % 8 == 0
            and x.stride(1) == 1 and x.stride(0) % 8 == 0 and w.is_contiguous() and aligned(x, w) and x.is_cuda
            and (not glu or w.shape[0] % 2 == 0) and available(x.device.index)):
        return False
    n = w.shape[0] // 2 if glu else w.shape[0]
    return plan(tuple(choice or CHOICES[0]), M, n, K, glu, x.device.index or 0) is not None


def stream_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                choice: tuple[int, int, int] | None = None, *, glu: bool = False) -> torch.Tensor:
    """x[M,K] @ w[N,K]^T (+ bias[N]) -> [M,N] (check `supported` first); `choice` (KB a copy, KB of the
    ring, blocks an SM) defaults to the tuning table's for this shape and row count. With `glu`, w is
    [gate; up] (2I rows) and the result is silu(gate) * up, [M,I], rounded as gemv's glu mode rounds."""
    M, K = x.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    choice = tuple(choice or tuning.CURRENT.stream_choice(w.shape[0], K, M) or CHOICES[0])
    p = plan(choice, M, N, K, glu, x.device.index or 0)
    if p is None:
        raise ValueError(f"stream_gemv choice {choice} fits fewer than {CWARPS} stages at M={M}, K={K}")
    chunk, stages, blocks, smem = p
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    fn = function(spec("stream_gemv", x.dtype, MM=M), "stream_gemv")
    set_shared_limit(fn, smem)
    launch(fn, (blocks,), (THREADS,),
           (ptr(x), i64(x.stride(0)), ptr(w), ptr(None if bias is None else bias.contiguous()), ptr(y), i32(N),
            i32(K), i32(chunk), i32(stages), i32(int(glu))), shared_mem=smem)
    return y
