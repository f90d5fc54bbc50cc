"""Loader of rope_cache.cu: rotary embedding fused with the paged K/V cache write."""
from __future__ import annotations

import torch

from workers.kernels._nvrtc import function, i32, i64, launch, ptr, spec


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """t[T,n,hd] with contiguous heads (a view of a fused qkv row is fine), else a contiguous copy."""
    n, hd = t.shape[1], t.shape[2]
    return t if t.stride(2) == 1 and (t.stride(1) == hd or n == 1) else t.contiguous()


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """Rotate q[T,nh,hd] and k[T,nkv,hd] in place by positions[T] (int64), then store k and v in the cache
    slots slot_mapping[T] (int64; a negative slot stores nothing). cos/sin: float32 [max_pos, hd/2]."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    if T == 0:
        return
    qq, kk, vv = _token_major(q), _token_major(k), _token_major(v)
    work = max((nh + nkv) * hd // 2, nkv * hd)
    threads = 128
    per_token = min(16, -(-work // threads))   # blocks per token: small steps spread over more SMs
    fn = function(spec("rope_cache", q.dtype), "rope_cache_write")
    launch(fn, (T, per_token), (threads,),
           (ptr(qq), ptr(kk), ptr(vv), ptr(positions.long().contiguous()), ptr(cos.float().contiguous()),
            ptr(sin.float().contiguous()), ptr(k_cache), ptr(v_cache), ptr(slot_mapping.long().contiguous()),
            i32(nh), i32(nkv), i32(hd), i64(qq.stride(0)), i64(kk.stride(0)), i64(vv.stride(0))))
    if qq is not q:
        q.copy_(qq)
    if kk is not k:
        k.copy_(kk)
