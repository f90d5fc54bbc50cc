"""Loader of rms_norm.cu: RMSNorm with a fused residual add."""
from __future__ import annotations

import torch

from workers.kernels._nvrtc import aligned, f32, function, i32, launch, ptr, spec


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T,H], w[H] -> (rmsnorm(x + residual) * w, x + residual); residual_out is x when residual is None."""
    x = x.contiguous()
    T, H = x.shape
    out = torch.empty_like(x)
    res_out = x if residual is None else torch.empty_like(x)
    if residual is not None:
        residual = residual.contiguous()
    if T == 0:
        return out, res_out
    vec = H % 8 == 0 and aligned(*(t for t in (x, w, out, res_out, residual) if t is not None))
    per_row = H // 8 if vec else H
    threads = min(1024, max(32, (per_row + 31) // 32 * 32))
    fn = function(spec("rms_norm", x.dtype), "rms_norm")
    launch(fn, (T,), (threads,), (ptr(x), ptr(residual), ptr(w.contiguous()), ptr(out), ptr(res_out), i32(H),
                                  f32(eps), i32(residual is not None), i32(vec)))
    return out, res_out
