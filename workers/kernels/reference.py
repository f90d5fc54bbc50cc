"""Torch references of the kernels: the CPU backend's ops (float32 math), which run on any device.

Kernel tests compare each loader in workers/kernels/ with the function of the same name here.
"""
from __future__ import annotations

from workers.backends.cpu import linear as gemv
from workers.backends.cpu import paged_decode_attention, rms_norm, rope_and_cache_write, silu_mul

__all__ = ["gemv", "paged_decode_attention", "rms_norm", "rope_and_cache_write", "silu_mul"]
