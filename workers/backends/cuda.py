"""GPU backend: the ops of workers.backends.Backend on our CUDA kernels (NVRTC via CuPy), cuBLAS for
large GEMMs and torch's fused attention for prefill. Same signatures and semantics as backends/cpu.py."""
from __future__ import annotations

from typing import Any

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


_memo: dict[int, tuple[torch.Tensor, Any]] = {}


def _plan(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor) -> list[tuple]:
    """Chunks grouped by (chunk length, context length), each group with its device index tensors:
    [(n, ctx, seq_ids[S], token_rows[S*n])]. Remembered for the same tensor object: every layer of a
    step passes the same ones, so the host sync happens once per step."""
    hit = _memo.get(id(cu_seqlens_q))
    if hit is not None and hit[0] is cu_seqlens_q:
        return hit[1]
    cu, ctxs = cu_seqlens_q.tolist(), context_lens.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for s, ctx in enumerate(ctxs):
        groups.setdefault((cu[s + 1] - cu[s], ctx), []).append(s)
    dev = cu_seqlens_q.device
    plan = [(n, ctx, torch.tensor(ss, device=dev),
             torch.tensor([r for s in ss for r in range(cu[s], cu[s + 1])], device=dev))
            for (n, ctx), ss in groups.items()]
    if len(_memo) >= 8:
        _memo.clear()
    _memo[id(cu_seqlens_q)] = (cu_seqlens_q, plan)
    return plan


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Chunks of equal (length, context) batched together: gather their keys from the cache, then torch's
    fused attention (causal when a chunk is its whole context, else an explicit end-aligned mask)."""
    T, nh, hd = q.shape
    nkv, bs = k_cache.shape[2], k_cache.shape[1]
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    out = torch.empty_like(q)
    for n, ctx, seqs, rows in _plan(cu_seqlens_q, context_lens, block_tables):
        S = seqs.shape[0]
        k_pos = torch.arange(ctx, device=q.device)
        slots = block_tables[seqs][:, k_pos // bs].long() * bs + k_pos % bs           # [S, ctx]
        k = kf[slots].permute(0, 2, 1, 3).repeat_interleave(nh // nkv, dim=1)          # [S, nh, ctx, hd]
        v = vf[slots].permute(0, 2, 1, 3).repeat_interleave(nh // nkv, dim=1)
        qs = q[rows].view(S, n, nh, hd).transpose(1, 2)                                 # [S, nh, n, hd]
        if n == ctx and sliding_window is None:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
        else:
            q_pos = k_pos[ctx - n:]
            mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
            if sliding_window is not None:
                mask &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - sliding_window
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[rows] = o.transpose(1, 2).reshape(S * n, nh, hd)
    return out
