"""GPU backend: the ops of workers.backends.Backend on our CUDA kernels (NVRTC via CuPy), cuBLAS for
large GEMMs and torch's fused attention for prefill. Same signatures and semantics as backends/cpu.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from workers.backends import cpu as _ref
from workers.kernels import cublaslt as _lt
from workers.kernels import gemv as _gemv
from workers.kernels import paged_attention as _attn
from workers.kernels import skinny_gemm as _skinny
from workers.kernels import stream_gemv as _stream
from workers.kernels import tma_gemm as _tma
from workers.kernels import tuning
from workers.kernels.rms_norm import rms_norm
from workers.kernels.rope_cache import rope_and_cache_write
from workers.kernels.silu_mul import silu_mul

__all__ = ["embedding", "rms_norm", "linear", "linear_glu", "rope_and_cache_write", "prefill_attention",
           "paged_decode_attention", "silu_mul", "all_reduce", "all_gather_last_dim"]

embedding = _ref.embedding
all_reduce = _ref.all_reduce
all_gather_last_dim = _ref.all_gather_last_dim


def _on_gemv(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T runs on our gemv: few rows (per the tuning table), a shape it takes."""
    return x.shape[0] <= tuning.CURRENT.gemv_limit(w.shape[0], w.shape[1]) and _gemv.supported(x, w)


def _stream_choice(x: torch.Tensor, w: torch.Tensor, glu: bool = False) -> tuple[int, int, int] | None:
    """stream_gemv's launch for x @ w.T where the tuning table has it no slower than what runs otherwise
    (gemv, tma_gemm or cuBLAS) at this many rows."""
    c = tuning.CURRENT.stream_choice(w.shape[0], w.shape[1], x.shape[0])
    return c if c is not None and _stream.supported(x, w, c, glu) else None


def _skinny_choice(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int] | None:
    """skinny_gemm's launch for x @ w.T where the tuning table has it beating cuBLAS at this many rows."""
    c = tuning.CURRENT.skinny_choice(w.shape[0], w.shape[1], x.shape[0])
    return c if c is not None and _skinny.supported(x, w) else None


def _tma_choice(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int] | None:
    """tma_gemm's launch for x @ w.T where the tuning table has it beating the other GEMMs at this many rows."""
    c = tuning.CURRENT.tma_choice(w.shape[0], w.shape[1], x.shape[0])
    return c if c is not None and _tma.supported(x, w) else None


def _lt_algo(x: torch.Tensor, w: torch.Tensor) -> list[int] | None:
    """The cuBLASLt algorithm the build found faster than torch's matmul for this shape's row bucket, if it
    runs this exact shape."""
    a = tuning.CURRENT.lt_algo(w.shape[0], w.shape[1], x.shape[0])
    return a if a is not None and _lt.supported(x, w) and _lt.usable(x, w, a) else None


def _matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) past gemv's rows: tma_gemm or skinny_gemm where tuned faster, else cuBLAS (with the
    cuBLASLt algorithm the build chose where it beat torch's)."""
    t = _tma_choice(x, w)
    if t:
        return _tma.tma_gemm(x, w, bias, t)
    c = _skinny_choice(x, w)
    if c:
        return _skinny.skinny_gemm(x, w, bias, c)
    a = _lt_algo(x, w)
    if a is None:
        return F.linear(x, w, bias)
    y = _lt.matmul(x, w, a)
    return y if bias is None else y.add_(bias)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias): stream_gemv or our gemv for the few-row shapes where they beat cuBLAS, our
    tensor-core GEMMs for decode batches where they do (all per the tuning table), cuBLAS otherwise
    (cuBLASLt with a tuned algorithm at decode row counts)."""
    s = _stream_choice(x, w)
    if s:
        return _stream.stream_gemv(x, w, bias, s)
    return _gemv.gemv(x, w, bias) if _on_gemv(x, w) else _matmul(x, w, bias)


def linear_glu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the epilogue of stream_gemv or gemv (few rows) or tma_gemm (decode batches, where
    tuned): no silu_mul kernel; a GEMM + silu_mul otherwise."""
    s = _stream_choice(x, w, glu=True)
    if s:
        return _stream.stream_gemv(x, w, choice=s, glu=True)
    if _on_gemv(x, w):
        return _gemv.gemv(x, w, glu=True)
    t = _tma_choice(x, w)
    return _tma.tma_gemm(x, w, choice=t, glu=True) if t else silu_mul(_matmul(x, w))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """Decode attention through the split-context kernel (reference for shapes it does not cover)."""
    if not _attn.supported(q, k_cache):
        return _ref.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
    return _attn.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)


@dataclass
class _Group:
    """Chunks of one step with equal (length n, context ctx), batched into one attention call."""

    n: int
    ctx: int
    rows: torch.Tensor | None       # [S*n] their token rows; None when they are all the step's rows, in order
    slots: torch.Tensor             # [S, ctx] int64 cache slots of their keys
    mask: torch.Tensor | None       # [n, ctx] visible keys; None = plain causal (n == ctx, no window)


_memo: dict[int, tuple[torch.Tensor, tuple, list[_Group]]] = {}
# Not cuDNN's attention: it plans per new shape on the host (milliseconds), and a serving step's chunk
# shapes keep changing; a py-spy profile at 256 streams had a quarter of the engine thread in it.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# torch >= 2.5 takes K/V with fewer heads than q (enable_gqa); its flash kernel does so without a copy, for
# causal chunks (an explicit mask would leave flash for a backend that expands them anyway)
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _plan(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
          window: int | None) -> list[_Group]:
    """The step's chunks grouped by (length, context), with every index tensor the attention needs.
    Built once per step (one host sync) and reused by every layer: each layer passes the same tensors."""
    key = (id(context_lens), id(block_tables), block_size, window)
    hit = _memo.get(id(cu_seqlens_q))
    if hit is not None and hit[0] is cu_seqlens_q and hit[1] == key:
        return hit[2]
    cu, ctxs = cu_seqlens_q.tolist(), context_lens.tolist()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for s, ctx in enumerate(ctxs):
        by_shape.setdefault((cu[s + 1] - cu[s], ctx), []).append(s)
    dev = cu_seqlens_q.device
    plan = []
    for (n, ctx), seqs in by_shape.items():
        k_pos = torch.arange(ctx, device=dev)
        rows = [r for s in seqs for r in range(cu[s], cu[s + 1])]
        slots = block_tables[torch.tensor(seqs, device=dev)][:, k_pos // block_size].long() * block_size \
            + k_pos % block_size
        mask = None
        if n != ctx or window is not None:
            q_pos = k_pos[ctx - n:]
            mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
            if window is not None:
                mask &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - window
        whole = len(by_shape) == 1 and rows == list(range(cu[-1]))
        plan.append(_Group(n, ctx, None if whole else torch.tensor(rows, device=dev), slots, mask))
    if len(_memo) >= 8:
        _memo.clear()
    _memo[id(cu_seqlens_q)] = (cu_seqlens_q, key, plan)
    return plan


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Chunks of equal (length, context) batched together: gather their keys from the cache, then torch's
    fused attention (causal when a chunk is its whole context, else an explicit end-aligned mask)."""
    T, nh, hd = q.shape
    nkv, bs = k_cache.shape[2], k_cache.shape[1]
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    out = None
    for g in _plan(cu_seqlens_q, context_lens, block_tables, bs, sliding_window):
        S = g.slots.shape[0]
        k, v = kf[g.slots], vf[g.slots]                                    # [S, ctx, nkv, hd]
        gqa = {}
        if nkv != nh and _SDPA_GQA and g.mask is None:   # GQA inside the flash kernel: no copies
            gqa = {"enable_gqa": True}
        elif nkv != nh:   # GQA: each KV head serves nh // nkv query heads (one copy, no repeat_interleave)
            k = k.unsqueeze(3).expand(S, g.ctx, nkv, nh // nkv, hd).reshape(S, g.ctx, nh, hd)
            v = v.unsqueeze(3).expand(S, g.ctx, nkv, nh // nkv, hd).reshape(S, g.ctx, nh, hd)
        qs = (q if g.rows is None else q[g.rows]).reshape(S, g.n, nh, hd).transpose(1, 2)  # [S, nh, n, hd]
        with sdpa_kernel(_SDPA_BACKENDS):
            o = F.scaled_dot_product_attention(qs, k.transpose(1, 2), v.transpose(1, 2), attn_mask=g.mask,
                                               is_causal=g.mask is None, scale=scale, **gqa)
        o = o.transpose(1, 2).reshape(S * g.n, nh, hd)
        if g.rows is None:
            return o
        if out is None:
            out = torch.empty(T, nh, hd, dtype=q.dtype, device=q.device)
        out[g.rows] = o
    return out if out is not None else torch.empty(T, nh, hd, dtype=q.dtype, device=q.device)
