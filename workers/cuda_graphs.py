"""Decode steps under CUDA graphs: one graph per batch-size bucket over static input buffers.

A step whose chunks are all single decode tokens (and fit the buffers) is padded to the next bucket:
padding rows get slot -1 (nothing written to the KV cache) and context length 1. Each bucket's graph is
captured on first use, after a warm-up pass; all graphs share one memory pool.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from workers.models.llama import ForwardBatch, LlamaStage

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    """Captured decode graphs of one single-rank model and its KV cache."""

    def __init__(self, model: LlamaStage, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], *,
                 block_size: int, max_batch: int, max_blocks_per_seq: int, device: torch.device):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_batch, self.width = max_batch, max_blocks_per_seq
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        B, W, dev = max_batch, max_blocks_per_seq, device
        i32, i64 = torch.int32, torch.int64
        self.d_long = torch.zeros(3, B, dtype=i64, device=dev)   # rows: token ids, positions, slots
        self.ids, self.pos, self.slots = self.d_long[0], self.d_long[1], self.d_long[2]
        self.ctx = torch.ones(B, dtype=i32, device=dev)
        self.bt = torch.zeros(B, W, dtype=i32, device=dev)
        # pinned staging of the same, filled by the host each step
        self.h_long = torch.zeros(3, B, dtype=i64, pin_memory=True)
        self.h_ctx = torch.ones(B, dtype=i32, pin_memory=True)
        self.h_bt = torch.zeros(B * W, dtype=i32, pin_memory=True)
        self.n_long, self.n_ctx, self.n_bt = self.h_long.numpy(), self.h_ctx.numpy(), self.h_bt.numpy()
        self.copied: torch.cuda.Event | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None

    def can_run(self, chunks: list[Any]) -> bool:
        """Whether this step is pure decode and fits the static buffers."""
        return 0 < len(chunks) <= self.max_batch and all(
            len(c.token_ids) == 1 and len(c.block_table) <= self.width for c in chunks)

    def run(self, chunks: list[Any], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the bucket's graph for these decode chunks (their tokens from `input_ids` on the device
        when given); float32 logits of the chunks that want them."""
        n = len(chunks)
        b = next(x for x in self.buckets if x >= n)
        self._stage(chunks, b)
        if input_ids is not None:
            self.ids[:n].copy_(input_ids)   # after the staged copy, in stream order
        entry = self.graphs.get(b) or self._capture(b)
        entry[0].replay()
        rows = [i for i, c in enumerate(chunks) if c.want_logits]
        if len(rows) == n:
            return entry[1][:n].clone()
        return entry[1][torch.tensor(rows, dtype=torch.int64, device=entry[1].device)]

    def _stage(self, chunks: list[Any], b: int) -> None:
        """Copy the step's metadata into the static buffers (rows n..b are padding)."""
        if self.copied is not None:
            self.copied.synchronize()       # the previous step's host->device copies have read the staging
        n = len(chunks)
        w = max(len(c.block_table) for c in chunks)
        lg, ctx = self.n_long, self.n_ctx
        bt = self.n_bt[: b * w].reshape(b, w)
        bt[n:] = 0
        lg[:2, n:b] = 0
        lg[2, n:b] = -1
        ctx[n:b] = 1
        bs = self.block_size
        for i, c in enumerate(chunks):
            p = c.start_pos
            lg[0, i] = c.token_ids[0]
            lg[1, i] = p
            lg[2, i] = c.block_table[p // bs] * bs + p % bs
            ctx[i] = p + 1
            row = c.block_table
            bt[i, : len(row)] = row
        self.d_long.copy_(self.h_long, non_blocking=True)     # whole buffers: contiguous, a few KB
        self.ctx.copy_(self.h_ctx, non_blocking=True)
        self.bt[:b, :w].copy_(self.h_bt[: b * w].view(b, w), non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def _forward(self, b: int) -> torch.Tensor:
        """Model forward + logits over the first b rows of the static buffers."""
        dev = self.ids.device
        batch = ForwardBatch(
            input_ids=self.ids[:b], positions=self.pos[:b], slot_mapping=self.slots[:b], num_decode=b,
            decode_block_tables=self.bt[:b], decode_context_lens=self.ctx[:b],
            prefill_cu_seqlens=torch.zeros(1, dtype=torch.int32, device=dev),
            prefill_context_lens=torch.zeros(0, dtype=torch.int32, device=dev),
            prefill_block_tables=torch.zeros(0, self.width, dtype=torch.int32, device=dev),
            logit_rows=torch.arange(b, device=dev))
        hidden = self.model.forward(batch, None, self.kv_caches)
        return self.model.logits(hidden)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (loads kernels, cuBLAS workspaces) and capture the graph of bucket b."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b)   # recomputes this very step: same K/V written to the same slots
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # tensor parallel: NCCL's watchdog thread polls events while this thread captures; "thread_local"
        # keeps its calls from invalidating the capture (the default, "global", forbids them process-wide).
        # (The TP test that hung did so for another reason, see Engine._release_graphs; "global" was not
        # tried again with that fixed.)
        mode = "thread_local" if getattr(self.model, "tp", 1) > 1 else "global"
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=mode):
            logits = self._forward(b)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[b] = (graph, logits)
        log.info("captured decode graph for batch bucket %d", b)
        return self.graphs[b]


def make_decode_graphs(model: LlamaStage, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                       device: torch.device, max_batch: int = 256) -> DecodeGraphs | None:
    """Decode graphs sized for the model's longest sequence (max_position_embeddings); None unless the
    model runs on the CUDA backend (the reference ops synchronize, which graph capture forbids)."""
    if getattr(model.ops, "__name__", "") != "workers.backends.cuda":
        return None
    width = -(-model.cos.shape[0] // block_size)
    return DecodeGraphs(model, kv_caches, block_size=block_size, max_batch=max_batch, max_blocks_per_seq=width,
                        device=device)
