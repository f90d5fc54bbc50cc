"""Loader of paged_attention.cu: decode attention over the paged KV cache (GQA, split over the context)."""
from __future__ import annotations

import math
from typing import Any

import torch

from workers.kernels import tuning
from workers.kernels._nvrtc import f32, function, i32, i64, launch, ptr, set_shared_limit, spec

THREADS = 128
SMEM_LIMIT = 48 * 1024
STAGE_CHOICES = (0, 2, 3, 4)   # 0: paged_decode (K/V in registers); n: paged_decode_staged with n stages


def module_spec(dtype: torch.dtype, hd: int, group: int, stages: int) -> Any:
    """The compiled variant holding both kernels (the staged one with `stages` stages; 3 for stages 0)."""
    return spec("paged_attention", dtype, HD=hd, GROUP=group, KV_STAGES=stages or 3)


def shared_bytes(hd: int, group: int, elem: int, stages: int) -> int:
    """Dynamic shared memory of a launch: the merge buffer, or the staged kernel's K/V stages if larger."""
    nsub = THREADS // (hd // 8)
    unroll = 2 if group >= 8 else 4
    return max(stages * 2 * nsub * unroll * hd * elem, nsub * group * hd * 4)


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel handles this head dim / grouping (else use the reference)."""
    nh, hd = q.shape[1], q.shape[2]
    nkv = k_cache.shape[2]
    tpt = hd // 8
    if hd % 8 or tpt > 32 or tpt & (tpt - 1) or nh % nkv or not k_cache.is_contiguous():
        return False
    nsub = THREADS // tpt
    return nsub * (nh // nkv) * (hd + 2) * 4 <= SMEM_LIMIT


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, num_splits: int | None = None,
                           stages: int | None = None) -> torch.Tensor:
    """q[B,nh,hd] (one query per sequence at position context_lens[b]-1) -> [B,nh,hd]; block_tables[B,maxb]
    and context_lens[B] int32; keys in the last `sliding_window` positions only when given. `num_splits`
    and `stages` (one of STAGE_CHOICES) default to the tuning table's for this batch size."""
    B, nh, hd = q.shape
    nkv, block_size = k_cache.shape[2], k_cache.shape[1]
    if q.stride(2) != 1 or q.stride(1) != hd:
        q = q.contiguous()
    out = torch.empty(B, nh, hd, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    t = tuning.CURRENT
    ns = num_splits or t.splits_for(B, nkv)
    bt = block_tables.to(torch.int32).contiguous()
    cl = context_lens.to(torch.int32).contiguous()
    if ns > 1:
        part_acc = torch.empty(B, nh, ns, hd, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B, nh, ns, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = None
    st = t.stages_for(B) if stages is None else stages
    s = module_spec(q.dtype, hd, nh // nkv, st)
    window = int(sliding_window or 0)
    fn = function(s, "paged_decode_staged" if st else "paged_decode")
    smem = shared_bytes(hd, nh // nkv, q.element_size(), st)
    set_shared_limit(fn, smem)
    launch(fn, (nkv, B, ns), (THREADS,),
           (ptr(q), i64(q.stride(0)), ptr(k_cache), ptr(v_cache), ptr(bt), i32(bt.shape[1]), ptr(cl), ptr(out),
            ptr(part_acc), ptr(part_ml), i32(nkv), i32(block_size), f32(scale * math.log2(math.e)), i32(window),
            i32(t.attention_min_split)), shared_mem=smem)
    if ns > 1:
        launch(function(s, "paged_decode_combine"), (nh, B), (hd,),
               (ptr(part_acc), ptr(part_ml), ptr(cl), ptr(out), i32(nh), i32(ns), i32(window),
                i32(t.attention_min_split)))
    return out
