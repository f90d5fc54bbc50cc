"""Llama-family decoder (Llama, Mistral, Qwen2): one rank's pipeline stage and tensor-parallel shard.

The families differ only by config: QKV bias (Qwen2), tied embeddings (lm_head is then a copy of the
embedding in the shard), llama3 rope scaling, Mistral's sliding window. Weights arrive under the
names of workers/layout.py; every op goes through a backend (workers/backends).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from workers.layout import local_heads, stage_layers, vocab_range
from workers.models.config import ModelConfig
from workers.rope import rope_tables


@dataclass
class ForwardBatch:
    """Token-level inputs of one forward pass; decode tokens (one per sequence) come first."""

    input_ids: torch.Tensor           # [T] int64
    positions: torch.Tensor           # [T] int64
    slot_mapping: torch.Tensor        # [T] int64 cache slot of each token
    num_decode: int                   # tokens [0, num_decode) are single-token decode chunks
    decode_block_tables: torch.Tensor  # [num_decode, maxb] int32
    decode_context_lens: torch.Tensor  # [num_decode] int32
    prefill_cu_seqlens: torch.Tensor   # [S+1] int32, offsets into tokens [num_decode, T)
    prefill_context_lens: torch.Tensor  # [S] int32
    prefill_block_tables: torch.Tensor  # [S, maxb] int32
    logit_rows: torch.Tensor          # [n_want] int64 token rows whose logits are wanted, in chunk order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class LlamaStage:
    """The layers [start, stop) of one pipeline stage, sharded for one tensor-parallel rank."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], *, backend: ModuleType,
                 tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0, tp_group: Any = None):
        self.cfg, self.w, self.ops, self.tp, self.tp_group = cfg, weights, backend, tp, tp_group
        q_heads, kv_heads = local_heads(cfg, tp, tp_rank)
        self.n_heads, self.n_kv = len(q_heads), len(kv_heads)
        self.layers = range(*stage_layers(cfg.num_layers, pp)[pp_rank])
        self.first, self.last = pp_rank == 0, pp_rank == pp - 1
        self.vocab_start = vocab_range(cfg, tp, tp_rank)[0]
        self.scale = cfg.head_dim ** -0.5
        device = next(iter(weights.values())).device
        self.cos, self.sin = (t.to(device) for t in rope_tables(cfg))

    def forward(self, batch: ForwardBatch, hidden: torch.Tensor | None,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run this stage's layers; `hidden` is the previous stage's residual stream (None on the
        first stage, which embeds input_ids). Returns this stage's residual stream [T, H]."""
        ops = self.ops
        if self.first:
            hidden = ops.all_reduce(ops.embedding(batch.input_ids, self.w["embed_tokens.weight"], self.vocab_start),
                                    self.tp_group)
        residual = None
        for i, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden, residual = self._layer(i, batch, hidden, residual, k_cache, v_cache)
        return hidden if residual is None else hidden + residual

    def _layer(self, i: int, b: ForwardBatch, x: torch.Tensor, residual: torch.Tensor | None,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ops, w, p, eps = self.ops, self.w, f"layers.{i}.", self.cfg.rms_norm_eps
        h, residual = ops.rms_norm(x, w[p + "input_layernorm.weight"], eps, residual)
        h = self._attention(p, b, h, k_cache, v_cache)
        h, residual = ops.rms_norm(h, w[p + "post_attention_layernorm.weight"], eps, residual)
        h = ops.linear_glu(h, w[p + "mlp.gate_up_proj.weight"])
        return ops.all_reduce(ops.linear(h, w[p + "mlp.down_proj.weight"]), self.tp_group), residual

    def _attention(self, p: str, b: ForwardBatch, x: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        ops, hd, nd, T = self.ops, self.cfg.head_dim, b.num_decode, b.num_tokens
        qkv = ops.linear(x, self.w[p + "self_attn.qkv_proj.weight"], self.w.get(p + "self_attn.qkv_proj.bias"))
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        # views into the qkv rows (token stride = qkv width): rope rotates them in place
        q, k, v = (t.view(T, -1, hd) for t in (q, k, v))
        ops.rope_and_cache_write(q, k, v, b.positions, self.cos, self.sin, k_cache, v_cache, b.slot_mapping)
        window = self.cfg.sliding_window
        if nd == T:    # all decode (or empty): the attention output is the step's, no copy
            out = ops.paged_decode_attention(q, k_cache, v_cache, b.decode_block_tables, b.decode_context_lens,
                                             self.scale, window)
        elif nd == 0:  # all prefill
            out = ops.prefill_attention(q, k_cache, v_cache, b.prefill_cu_seqlens, b.prefill_context_lens,
                                        b.prefill_block_tables, self.scale, window)
        else:
            out = torch.empty(T, self.n_heads, hd, dtype=q.dtype, device=q.device)
            out[:nd] = ops.paged_decode_attention(q[:nd], k_cache, v_cache, b.decode_block_tables,
                                                  b.decode_context_lens, self.scale, window)
            out[nd:] = ops.prefill_attention(q[nd:], k_cache, v_cache, b.prefill_cu_seqlens,
                                             b.prefill_context_lens, b.prefill_block_tables, self.scale, window)
        o = ops.linear(out.reshape(T, self.n_heads * hd), self.w[p + "self_attn.o_proj.weight"])
        return ops.all_reduce(o, self.tp_group)

    def logits(self, stream: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head of residual-stream rows [n, H] -> float32 [n, vocab_size] (last stage)."""
        h, _ = self.ops.rms_norm(stream, self.w["norm.weight"], self.cfg.rms_norm_eps)
        local = self.ops.linear(h, self.w["lm_head.weight"])
        full = self.ops.all_gather_last_dim(local, self.tp_group, self.tp)
        return full[:, : self.cfg.vocab_size].float().contiguous()
