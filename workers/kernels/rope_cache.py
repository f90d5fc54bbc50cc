"""Loader of rope_cache.cu: rotary embedding fused with the paged K/V cache write."""
from __future__ import annotations

import torch

from workers.kernels._nvrtc import function, i32, i64, launch, ptr, spec


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """t[T,n,hd] with contiguous heads (a view of a fused qkv row is fine), else a contiguous copy."""
    n, hd = t.shape[1], t.shape[2]
    return t if t.stride(2) == 1 and (t.stride(1) == hd or n == 1) else t.contiguous()


def _vectorized(hd: int, *ts: torch.Tensor) -> bool:
    """Whether rope_cache_write8 takes these: 16-bit, hd / 2 a multiple of 8, 16-byte aligned rows."""
    return (ts[0].dtype in (torch.float16, torch.bfloat16) and hd % 16 == 0
            and all(t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 for t in ts))


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, vectorized: bool = True) -> None:
    """Rotate q[T,nh,hd] and k[T,nkv,hd] in place by positions[T] (int64), then store k and v in the cache
    slots slot_mapping[T] (int64; a negative slot stores nothing). cos/sin: float32 [max_pos, hd/2].
    16-bit shapes that allow it run 8 elements a thread (`vectorized`, the same bits)."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    if T == 0:
        return
    qq, kk, vv = _token_major(q), _token_major(k), _token_major(v)
    threads = 128
    vec = vectorized and _vectorized(hd, qq, kk, vv, k_cache, v_cache)
    if vec:
        work = max((nh + nkv) * hd // 16, nkv * hd // 8)
        per_token = -(-work // threads)
    else:
        work = max((nh + nkv) * hd // 2, nkv * hd)
        per_token = min(16, -(-work // threads))   # blocks per token: small steps spread over more SMs
    fn = function(spec("rope_cache", q.dtype), "rope_cache_write8" if vec else "rope_cache_write")
    launch(fn, (T, per_token), (threads,),
           (ptr(qq), ptr(kk), ptr(vv), ptr(positions.long().contiguous()), ptr(cos.float().contiguous()),
            ptr(sin.float().contiguous()), ptr(k_cache), ptr(v_cache), ptr(slot_mapping.long().contiguous()),
            i32(nh), i32(nkv), i32(hd), i64(qq.stride(0)), i64(kk.stride(0)), i64(vv.stride(0))))
    if qq is not q:
        q.copy_(qq)
    if kk is not k:
        k.copy_(kk)
