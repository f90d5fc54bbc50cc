"""GPU backend: the ops of workers.backends.Backend on our CUDA kernels (NVRTC via CuPy), cuBLAS for
large GEMMs and torch's fused attention for prefill. Same signatures and semantics as backends/cpu.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.backends import cpu as _ref
from workers.kernels import gemv as _gemv
from workers.kernels import paged_attention as _attn
from workers.kernels import tuning
from workers.kernels.rms_norm import rms_norm
from workers.kernels.rope_cache import rope_and_cache_write
from workers.kernels.silu_mul import silu_mul

__all__ = ["embedding", "rms_norm", "linear", "rope_and_cache_write", "prefill_attention",
           "paged_decode_attention", "silu_mul", "all_reduce", "all_gather_last_dim"]

embedding = _ref.embedding
all_reduce = _ref.all_reduce
all_gather_last_dim = _ref.all_gather_last_dim


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias): our gemv for the few-row shapes where it beats cuBLAS (per the tuning table)."""
    if x.shape[0] <= tuning.CURRENT.gemv_limit(w.shape[0], w.shape[1]) and _gemv.supported(x, w):
        return _gemv.gemv(x, w, bias)
    return F.linear(x, w, bias)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """Decode attention through the split-context kernel (reference for shapes it does not cover)."""
    if not _attn.supported(q, k_cache):
        return _ref.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
    return _attn.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)


_memo: dict[int, tuple[torch.Tensor, list[int]]] = {}


def _host(t: torch.Tensor) -> list[int]:
    """t.tolist(), remembered for the same tensor object (every layer of a step passes the same ones)."""
    hit = _memo.get(id(t))
    if hit is not None and hit[0] is t:
        return hit[1]
    if len(_memo) >= 8:
        _memo.clear()
    vals = t.tolist()
    _memo[id(t)] = (t, vals)
    return vals


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Per chunk: gather its sequence's keys from the cache, then torch's fused attention (causal,
    aligned to the end of the context; an explicit mask for chunks that follow cached tokens or a window)."""
    T, nh, hd = q.shape
    nkv, bs = k_cache.shape[2], k_cache.shape[1]
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    out = torch.empty_like(q)
    cu, ctxs = _host(cu_seqlens_q), _host(context_lens)
    for s, ctx in enumerate(ctxs):
        lo, hi = cu[s], cu[s + 1]
        n = hi - lo
        k_pos = torch.arange(ctx, device=q.device)
        slots = block_tables[s, k_pos // bs].long() * bs + k_pos % bs
        k = kf[slots].transpose(0, 1).repeat_interleave(nh // nkv, dim=0)  # [nh, ctx, hd]
        v = vf[slots].transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
        qs = q[lo:hi].transpose(0, 1)                                       # [nh, n, hd]
        if n == ctx and sliding_window is None:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
        else:
            q_pos = k_pos[ctx - n:]
            mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
            if sliding_window is not None:
                mask &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - sliding_window
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1)
    return out
