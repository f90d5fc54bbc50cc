"""Rotary position embedding tables (cos/sin per position), including llama3 frequency scaling."""
from __future__ import annotations

import math
from typing import Any

import torch

from workers.models.config import ModelConfig


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """float32 [head_dim/2] inverse frequencies theta^(-2i/d), llama3-scaled when `scaling` says so."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: llama3)")
    return _llama3_scale(inv, float(scaling["factor"]), float(scaling["low_freq_factor"]),
                         float(scaling["high_freq_factor"]), float(scaling["original_max_position_embeddings"]))


def _llama3_scale(inv: torch.Tensor, factor: float, low: float, high: float, orig_ctx: float) -> torch.Tensor:
    """Llama 3 scaling: long wavelengths divided by `factor`, short kept, a linear blend between."""
    wavelen = 2 * math.pi / inv
    long_wl, short_wl = orig_ctx / low, orig_ctx / high   # wavelength bounds of the blend band
    scaled = torch.where(wavelen > long_wl, inv / factor, inv)
    smooth = (orig_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= short_wl) & (wavelen <= long_wl)
    return torch.where(in_band, blended, scaled)


def rope_tables(cfg: ModelConfig, max_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin tables of shape [max_positions, head_dim/2]."""
    n = max_positions or cfg.max_position_embeddings
    inv = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    return freqs.cos(), freqs.sin()
