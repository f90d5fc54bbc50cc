"""Shard layout: which slices of which checkpoint tensors each (tp_rank, pp_rank) holds.

The single source of truth shared by the converter (writes shards), the engine (loads them)
and the tests (reassemble them). Pure: no torch, no I/O.

Per rank the shard holds, with global layer indices in the names:
  embed_tokens.weight                      first stage; vocab-parallel rows (padded to tp multiple)
  layers.{i}.input_layernorm.weight        replicated
  layers.{i}.self_attn.qkv_proj.weight     [q_rank; k_rank; v_rank] rows (column parallel)
  layers.{i}.self_attn.qkv_proj.bias       same, when the model has QKV bias (Qwen2)
  layers.{i}.self_attn.o_proj.weight       columns of this rank's heads (row parallel)
  layers.{i}.post_attention_layernorm.weight
  layers.{i}.mlp.gate_up_proj.weight       [gate_rank; up_rank] rows
  layers.{i}.mlp.down_proj.weight          columns of this rank's slice
  norm.weight                              last stage
  lm_head.weight                           last stage; vocab-parallel rows (a copy of the
                                           embedding when tie_word_embeddings)
When num_kv_heads < tp, each KV head is replicated on tp // num_kv_heads consecutive ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import PlanError
from workers.models.config import ModelConfig


@dataclass(frozen=True)
class Piece:
    """Rows/cols [start, stop) along `dim` of checkpoint tensor `source` (HF name)."""

    source: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardTensor:
    """One tensor of a shard: its pieces concatenated along `concat_dim`, then zero rows
    appended along dim 0 up to `pad_to` (vocab padding) when pad_to is set."""

    name: str
    pieces: tuple[Piece, ...]
    concat_dim: int = 0
    pad_to: int | None = None


def check_parallelism(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Raise PlanError unless the model splits cleanly over tp x pp."""
    if cfg.num_heads % tp:
        raise PlanError(f"parallelism.tensor={tp} must divide the {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise PlanError(
            f"parallelism.tensor={tp} must divide the {cfg.num_kv_heads} KV heads or be a multiple of them"
        )
    if cfg.intermediate_size % tp:
        raise PlanError(f"parallelism.tensor={tp} must divide intermediate_size={cfg.intermediate_size}")
    if pp > cfg.num_layers:
        raise PlanError(f"parallelism.pipeline={pp} exceeds the model's {cfg.num_layers} layers")


def stage_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Layer range [start, stop) of each pipeline stage; earlier stages take the remainder."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    return -(-cfg.vocab_size // tp) * tp


def vocab_range(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[int, int]:
    """Vocabulary rows [start, stop) held by tp_rank (stop may exceed vocab_size: padding)."""
    per = padded_vocab(cfg, tp) // tp
    return tp_rank * per, (tp_rank + 1) * per


def local_heads(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[range, range]:
    """Query heads and KV heads (global indices) that tp_rank computes."""
    nq = cfg.num_heads // tp
    q = range(tp_rank * nq, (tp_rank + 1) * nq)
    if cfg.num_kv_heads >= tp:
        nkv = cfg.num_kv_heads // tp
        kv = range(tp_rank * nkv, (tp_rank + 1) * nkv)
    else:
        rep = tp // cfg.num_kv_heads
        kv = range(tp_rank // rep, tp_rank // rep + 1)
    return q, kv


def _vocab_tensor(name: str, source: str, cfg: ModelConfig, tp: int, tp_rank: int) -> ShardTensor:
    start, stop = vocab_range(cfg, tp, tp_rank)
    real_stop = min(stop, cfg.vocab_size)
    pieces = (Piece(source, 0, start, real_stop),) if real_stop > start else ()
    return ShardTensor(name, pieces, 0, pad_to=stop - start)


def shard_tensors(cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int) -> list[ShardTensor]:
    """Every tensor of the shard for (tp_rank, pp_rank), in a deterministic order."""
    check_parallelism(cfg, tp, pp)
    hd, h, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    q_heads, kv_heads = local_heads(cfg, tp, tp_rank)
    i_per = inter // tp
    first, last = pp_rank == 0, pp_rank == pp - 1
    start, stop = stage_layers(cfg.num_layers, pp)[pp_rank]
    out: list[ShardTensor] = []
    if first:
        out.append(_vocab_tensor("embed_tokens.weight", "model.embed_tokens.weight", cfg, tp, tp_rank))
    for i in range(start, stop):
        p = f"model.layers.{i}."
        n = f"layers.{i}."
        qs = (q_heads.start * hd, q_heads.stop * hd)
        ks = (kv_heads.start * hd, kv_heads.stop * hd)
        out.append(ShardTensor(n + "input_layernorm.weight", (Piece(p + "input_layernorm.weight", 0, 0, h),)))
        for kind in (("weight",) + (("bias",) if cfg.attention_bias else ())):
            out.append(ShardTensor(n + f"self_attn.qkv_proj.{kind}", (
                Piece(p + f"self_attn.q_proj.{kind}", 0, *qs),
                Piece(p + f"self_attn.k_proj.{kind}", 0, *ks),
                Piece(p + f"self_attn.v_proj.{kind}", 0, *ks),
            )))
        out.append(ShardTensor(n + "self_attn.o_proj.weight", (Piece(p + "self_attn.o_proj.weight", 1, *qs),), 1))
        out.append(ShardTensor(n + "post_attention_layernorm.weight",
                               (Piece(p + "post_attention_layernorm.weight", 0, 0, h),)))
        r = (tp_rank * i_per, (tp_rank + 1) * i_per)
        out.append(ShardTensor(n + "mlp.gate_up_proj.weight", (
            Piece(p + "mlp.gate_proj.weight", 0, *r),
            Piece(p + "mlp.up_proj.weight", 0, *r),
        )))
        out.append(ShardTensor(n + "mlp.down_proj.weight", (Piece(p + "mlp.down_proj.weight", 1, *r),), 1))
    if last:
        out.append(ShardTensor("norm.weight", (Piece("model.norm.weight", 0, 0, h),)))
        src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        out.append(_vocab_tensor("lm_head.weight", src, cfg, tp, tp_rank))
    return out


def required_sources(cfg: ModelConfig) -> list[str]:
    """Checkpoint tensor names the model needs (for a missing-tensor check)."""
    names = {p.source for t in shard_tensors(cfg, 1, 1, 0, 0) for p in t.pieces}
    return sorted(names)


def source_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape a checkpoint tensor must have according to config.json."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    leaf = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    table = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "lm_head.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_heads * hd, h),
        "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, h),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, h),
        "self_attn.q_proj.bias": (cfg.num_heads * hd,),
        "self_attn.k_proj.bias": (cfg.num_kv_heads * hd,),
        "self_attn.v_proj.bias": (cfg.num_kv_heads * hd,),
        "self_attn.o_proj.weight": (h, cfg.num_heads * hd),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    return table[leaf]
