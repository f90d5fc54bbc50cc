"""Reference backend: the ops of workers.backends.Backend in plain torch (any device, float32 math)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F


def embedding(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Rows of this rank's slice of the table; zero rows for ids held by other ranks."""
    local = ids - vocab_start
    mine = (local >= 0) & (local < weight.shape[0])
    out = weight[torch.where(mine, local, 0)]
    return out * mine.unsqueeze(-1).to(out.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * w, x + residual)."""
    res = x if residual is None else x + residual
    h = res.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype), res


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias)."""
    return F.linear(x, w, bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x[T,n,hd] in place; cos/sin are [T,1,hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].clone(), x[..., half:].clone()
    x[..., :half] = x1 * cos - x2 * sin
    x[..., half:] = x2 * cos + x1 * sin


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """Rotate q and k in place by their positions, then store k and v in their cache slots."""
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    _rotate(q, c, s)
    _rotate(k, c, s)
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def _slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position of one sequence (any shape of positions)."""
    return block_table[positions // block_size].long() * block_size + positions % block_size


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., Q, K] mask: key position j is visible to query position i iff i - window < j <= i."""
    ok = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if window is not None:
        ok &= k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - window
    return ok


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q[..., Q, nh, hd], k/v[..., K, nkv, hd], visible[..., Q, K] -> [..., Q, nh, hd] (float32 math)."""
    rep = q.shape[-2] // k.shape[-2]
    k = k.float().repeat_interleave(rep, dim=-2)
    v = v.float().repeat_interleave(rep, dim=-2)
    scores = torch.einsum("...qhd,...khd->...hqk", q.float(), k) * scale
    scores = scores.masked_fill(~visible.unsqueeze(-3), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("...hqk,...khd->...qhd", probs, v).to(q.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Each chunk's queries attend to its sequence's cached keys, causally (one sequence at a time)."""
    bs = k_cache.shape[1]
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for s, ctx in enumerate(context_lens.tolist()):
        lo, hi = cu[s], cu[s + 1]
        k_pos = torch.arange(ctx, device=q.device)
        q_pos = k_pos[ctx - (hi - lo):]
        slots = _slots(block_tables[s], k_pos, bs)
        out[lo:hi] = _attend(q[lo:hi], kf[slots], vf[slots], _visible(q_pos, k_pos, sliding_window), scale)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """One query per sequence at its last position, all sequences at once (padded to the longest)."""
    bs = k_cache.shape[1]
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    lens = context_lens.long()
    k_pos = torch.arange(int(lens.max()), device=q.device)                  # [L]
    slots = block_tables[:, k_pos // bs].long() * bs + k_pos % bs          # [B, L]
    q_pos = (lens - 1).unsqueeze(-1)                                        # [B, 1]
    visible = _visible(q_pos, k_pos.expand(len(lens), -1), sliding_window)  # [B, 1, L]
    return _attend(q.unsqueeze(1), kf[slots], vf[slots], visible, scale).squeeze(1)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up]."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def linear_glu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for w = [gate; up]."""
    return silu_mul(linear(x, w))


def all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum over the TP group, in place."""
    if group is not None:
        tdist.all_reduce(x, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """Concatenate the ranks' x along the last dim, in rank order."""
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    tdist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)
