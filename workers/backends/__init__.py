"""The ops the model calls, behind one small interface: CPU reference (torch ops) or GPU (CuPy kernels).

A backend is a module exposing the functions of `Backend` below with exactly these signatures.
Shapes: T tokens in the step, H hidden size, nh / nkv local query / KV heads, hd head dim,
S sequences, B decode sequences, maxb the width of a block-table matrix (rows padded with any
valid block id, e.g. 0). KV caches are `[num_blocks, block_size, nkv, hd]`; the token at position
p of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.
Integer metadata tensors live on the compute device. Ops return new tensors unless stated.

`workers.backends.cpu` is the reference: exact, float32 accumulation, easy to read. Every GPU
kernel is checked against it.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol

import torch


class Backend(Protocol):
    """The op set (documentation of the module interface; backends are plain modules)."""

    def embedding(self, ids: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> torch.Tensor:
        """ids[T] int64, weight[Vl,H] rows [vocab_start, vocab_start+Vl) of the table -> [T,H];
        ids outside this rank's rows give zero rows (the TP all-reduce fills them in)."""

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x[T,H], w[H] -> (out, residual_out): residual_out = x + residual (x when None),
        out = residual_out * rsqrt(mean(residual_out^2) + eps) * w, computed in float32."""

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x[T,K], w[N,K], bias[N]|None -> x @ w.T + bias, [T,N]."""

    def rope_and_cache_write(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
        """In place: rotate q[T,nh,hd] and k[T,nkv,hd] by positions[T] int64 (cos/sin [maxpos, hd/2],
        "rotate_half" convention: halves x1, x2 -> (x1 c - x2 s, x2 c + x1 s)); then write k and
        v[T,nkv,hd] into k_cache/v_cache at slot_mapping[T] int64."""

    def prefill_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                          scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """Chunked-prefill attention over the paged cache (the chunk's own K/V already written).
        q[T,nh,hd] holds S chunks back to back: chunk s is rows cu_seqlens_q[s]:cu_seqlens_q[s+1]
        (int32 [S+1]), its sequence has context_lens[s] (int32) tokens cached including the chunk,
        so its queries sit at positions context_lens[s] - chunk_len ... context_lens[s] - 1 and
        attend causally to every cached key of the sequence (block_tables[S,maxb] int32), or only the
        last `sliding_window` positions (key j visible to query i iff i - window < j <= i). GQA:
        query head h reads KV head h // (nh // nkv). Softmax in float32. -> [T,nh,hd]."""

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None) -> torch.Tensor:
        """One query per sequence, q[B,nh,hd], at position context_lens[b] - 1; same masking and
        GQA rules as prefill_attention. block_tables[B,maxb] int32, context_lens[B] int32 -> [B,nh,hd]."""

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x[T,2I] -> silu(x[:, :I]) * x[:, I:], [T,I]."""

    def linear_glu(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x[T,K], w[2I,K] = [gate; up] -> silu_mul(linear(x, w)), [T,I] (the MLP's up projection)."""

    def all_reduce(self, x: torch.Tensor, group: Any) -> torch.Tensor:
        """Sum x over the TP group in place and return it (no-op when group is None)."""

    def all_gather_last_dim(self, x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
        """x[T,N] on each of `world` TP ranks -> [T, world*N] in rank order (x itself when world == 1)."""


def get_backend(device: str | torch.device, name: str | None = None) -> ModuleType:
    """The backend module `name` (default: the device's own): workers.backends.cpu or .cuda.
    The cpu reference is plain torch and also runs on a GPU (to check kernels against it)."""
    kind = name or torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"no backend {kind!r} (cpu | cuda)")
    return importlib.import_module(f"workers.backends.{kind}")
