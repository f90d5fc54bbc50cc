"""Loader of silu_mul.cu: silu(gate) * up."""
from __future__ import annotations

import torch

from workers.kernels._nvrtc import aligned, function, i32, i64, launch, ptr, spec

THREADS = 256


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x[T,2I] -> silu(x[:, :I]) * x[:, I:], [T,I]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, I2 = x.shape
    inter = I2 // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    if T == 0 or inter == 0:
        return out
    vec = inter % 8 == 0 and x.stride(0) % 8 == 0 and aligned(x, out)
    per_row = inter // 8 if vec else inter
    fn = function(spec("silu_mul", x.dtype), "silu_mul")
    launch(fn, ((per_row + THREADS - 1) // THREADS, T), (THREADS,),
           (ptr(x), ptr(out), i32(inter), i64(x.stride(0)), i32(vec)))
    return out
