"""Engine: one rank's model over a paged KV cache, driven step by step by the scheduler.

The driver (global rank 0: first stage, tp rank 0) gets `step(StepInput)` calls, broadcasts each
step to every rank, runs its own share and returns the logits; every other rank loops in
`serve_forever()`. With pipeline parallelism the step's chunks are cut into micro-batches: stage s
sends micro-batch m to stage s+1 without waiting (isend) and goes on with m+1, and the last stage's
tp rank 0 sends each micro-batch's logits to the driver.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Any

import torch

from orchestrator.errors import CheckpointError
from workers.backends import get_backend
from workers.convert import TORCH_DTYPES, read_shard_manifest
from workers.dist import DistContext
from workers.layout import local_heads, stage_layers
from workers.models.config import ModelConfig
from workers.models.llama import ForwardBatch, LlamaStage

log = logging.getLogger(__name__)



@dataclass
class SeqChunk:
    """Tokens of one sequence to run in this step."""

    seq_id: int
    token_ids: list[int]      # tokens to run now: a prompt chunk, or one decode token
    start_pos: int            # tokens of this sequence already in the KV cache (= position of token_ids[0])
    block_table: list[int]    # physical KV block ids covering positions [0, start_pos + len(token_ids))
    want_logits: bool = True  # return logits of the chunk's last token (False for a non-final prefill chunk)


@dataclass
class StepInput:
    """Everything that runs in one engine step."""

    chunks: list[SeqChunk]
    # The input tokens already on the device, int64 [len(chunks)], every chunk one decode token: the
    # previous step's sampled tokens before the host has read them (a step launched ahead). The
    # chunks' token_ids are then placeholders.
    input_ids: torch.Tensor | None = None


# --- shards and memory ----------------------------------------------------------------------------

def resolve_rank_dir(shard_dir: Path | str, tp: int, pp: int, tp_rank: int, pp_rank: int) -> Path:
    """The rank's own shard directory, given it, its `tp{T}-pp{P}` parent, or the model's shard root."""
    d = Path(shard_dir)
    for cand in (d, d / f"rank-{tp_rank}-{pp_rank}", d / f"tp{tp}-pp{pp}" / f"rank-{tp_rank}-{pp_rank}"):
        if (cand / "manifest.json").is_file():
            return cand
    raise CheckpointError(f"{d}: no shard manifest.json for tp={tp} pp={pp} rank ({tp_rank}, {pp_rank}) "
                          "(expected a directory written by `orch convert`)")


def kv_block_bytes_for(cfg: ModelConfig, tp: int, pp: int, block_size: int, dtype: str = "float32") -> int:
    """Bytes of one KV block (K and V, all layers) on the rank holding the most layers."""
    layers = max(stop - start for start, stop in stage_layers(cfg.num_layers, pp))
    n_kv = len(local_heads(cfg, tp, 0)[1])
    return 2 * layers * block_size * n_kv * cfg.head_dim * TORCH_DTYPES[dtype].itemsize


def memory_budget_bytes(device: str | torch.device, kv_cache_fraction: float, weights_bytes: int = 0) -> int:
    """Bytes the KV cache may take. GPU: kv_cache_fraction of the card's total, less what is in use
    now, the weights still to load and 1 GiB for activations. CPU: the fraction of available RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return int(total * kv_cache_fraction) - (total - free) - weights_bytes - (1 << 30)
    import psutil

    return int(psutil.virtual_memory().available * kv_cache_fraction)


def num_kv_blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    """How many KV blocks fit in budget_bytes (at least 1 needed to serve anything)."""
    return max(0, budget_bytes // block_bytes)


# --- the engine -----------------------------------------------------------------------------------

def encode_step(step: StepInput) -> list[int]:
    """A step as a flat list of ints (for the driver's broadcast)."""
    out = [len(step.chunks)]
    for c in step.chunks:
        out += [c.seq_id, c.start_pos, int(c.want_logits), len(c.token_ids), len(c.block_table)]
        out += c.token_ids
        out += c.block_table
    return out


def decode_step(words: list[int]) -> StepInput:
    """Inverse of encode_step."""
    chunks, i = [], 1
    for _ in range(words[0]):
        seq_id, start, want, n, nb = words[i: i + 5]
        i += 5
        chunks.append(SeqChunk(seq_id, words[i: i + n], start, words[i + n: i + n + nb], bool(want)))
        i += n + nb
    return StepInput(chunks)


class Engine:
    """One rank's stage of the model, its KV cache, and the step protocol between ranks."""

    def __init__(self, shard_dir: Path | str, *, device: str | torch.device = "cpu", num_kv_blocks: int,
                 block_size: int, dist: DistContext | None = None, num_microbatches: int | None = None,
                 cuda_graphs: bool = True, ops: str | None = None):
        """ops: backend module under workers.backends ("cpu": the torch reference, which runs on any
        device; "cuda": the kernels); default: the device's own. num_microbatches: default pp."""
        self.dist = dist
        tp, pp = (dist.tp, dist.pp) if dist else (1, 1)
        tp_rank, pp_rank = (dist.tp_rank, dist.pp_rank) if dist else (0, 0)
        self.rank_dir = resolve_rank_dir(shard_dir, tp, pp, tp_rank, pp_rank)
        manifest = read_shard_manifest(self.rank_dir)
        got = (manifest["tp_size"], manifest["pp_size"], manifest["tp_rank"], manifest["pp_rank"])
        if got != (tp, pp, tp_rank, pp_rank):
            raise CheckpointError(f"{self.rank_dir}/manifest.json: shard is tp_size/pp_size/tp_rank/pp_rank="
                                  f"{got}, this rank needs {(tp, pp, tp_rank, pp_rank)}")
        self.model_config = ModelConfig.from_dict(manifest["model_config"])
        self.dtype = TORCH_DTYPES[manifest["dtype"]]
        self.device = torch.device(device)
        self.block_size, self.num_kv_blocks = block_size, num_kv_blocks
        self.tp, self.pp = tp, pp
        self.num_microbatches = num_microbatches or pp
        kernels = self.device.type == "cuda" and ops != "cpu"
        if kernels:   # an engine dir's GPU/stack pins, its cubins and tuning table
            from workers.build import load_engine

            load_engine(self.rank_dir, dist)
        from safetensors.torch import load_file

        weights = load_file(str(self.rank_dir / "model.safetensors"), device=str(self.device))
        self.model = LlamaStage(self.model_config, weights, backend=get_backend(self.device, ops), tp=tp,
                                tp_rank=tp_rank, pp=pp, pp_rank=pp_rank, tp_group=dist.tp_group if dist else None)
        shape = (num_kv_blocks, block_size, self.model.n_kv, self.model_config.head_dim)
        # zeros, not empty: masked-out slots must hold finite values
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in self.model.layers]
        self._stopped = False
        self.decode_graphs = None   # GPU: engine-dir pins checked, tuned kernels loaded, decode under CUDA graphs
        if kernels and cuda_graphs and pp == 1:   # tensor-parallel ranks capture their NCCL collectives too
            from workers.cuda_graphs import make_decode_graphs

            self.decode_graphs = make_decode_graphs(self.model, self.kv_caches, block_size, self.device)
        log.info("engine rank (tp %d/%d, pp %d/%d): layers %d-%d, %d KV blocks of %d", tp_rank, tp, pp_rank, pp,
                 self.model.layers.start, self.model.layers.stop - 1, num_kv_blocks, block_size)

    # --- public API ---
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block on this rank (K and V of all its layers)."""
        k, _ = self.kv_caches[0]
        return 2 * len(self.kv_caches) * k[0].numel() * k.element_size()

    def step(self, step: StepInput) -> torch.Tensor:
        """Run one step (driver only): float32 logits [chunks with want_logits, vocab_size], in chunk order."""
        if self.dist is not None and not self.dist.is_driver:
            raise RuntimeError("step() is for the driver (rank 0); other ranks run serve_forever()")
        if self._stopped:
            raise RuntimeError("engine is shut down")
        self._validate(step)
        if not step.chunks:
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        if step.input_ids is not None and (self.dist is not None or self.num_microbatches > 1):
            # other ranks and micro-batches take host tokens: read them (no overlap in this case)
            ids = step.input_ids.tolist()
            step = StepInput([replace(c, token_ids=[t]) for c, t in zip(step.chunks, ids)])
        if self.dist is not None and self.dist.world_size > 1:
            self.dist.broadcast_ints(encode_step(step))
        return self._execute(step)

    def serve_forever(self) -> None:
        """Follow the driver's steps until it shuts down (non-driver ranks)."""
        assert self.dist is not None and not self.dist.is_driver
        while (words := self.dist.broadcast_ints(None)) is not None:
            self._execute(decode_step(words))
        log.info("rank %d: driver shut down", self.dist.rank)
        self._release_graphs()

    def _release_graphs(self) -> None:
        """Destroy the decode CUDA graphs. Graphs that captured NCCL collectives hold the communicator's
        resources until destroyed: leaving the process group first blocks in ncclCommFinalize."""
        if self.decode_graphs is not None:
            torch.cuda.synchronize(self.device)
            self.decode_graphs = None
            gc.collect()

    def shutdown(self, close_dist: bool = True) -> None:
        """Driver: stop the other ranks' serve_forever() and (unless close_dist=False, to load
        another engine over the same group) leave the process group."""
        if self._stopped:
            return
        self._stopped = True
        if self.dist is not None and self.dist.is_driver:
            if self.dist.world_size > 1:
                self.dist.broadcast_ints(None)
            self._release_graphs()
            if close_dist:
                self.dist.close()

    # --- one step ---
    def _validate(self, step: StepInput) -> None:
        cfg, bs, seen = self.model_config, self.block_size, set()
        for c in step.chunks:
            n, end = len(c.token_ids), c.start_pos + len(c.token_ids)
            if n == 0 or c.start_pos < 0 or c.seq_id in seen:
                raise ValueError(f"seq {c.seq_id}: empty chunk, negative start_pos or repeated seq_id")
            if end > self.model.cos.shape[0]:
                raise ValueError(f"seq {c.seq_id}: position {end - 1} beyond max_position_embeddings")
            if len(c.block_table) * bs < end:
                raise ValueError(f"seq {c.seq_id}: {len(c.block_table)} blocks of {bs} cannot hold {end} tokens")
            if min(c.block_table) < 0 or max(c.block_table) >= self.num_kv_blocks:
                raise ValueError(f"seq {c.seq_id}: block id outside [0, {self.num_kv_blocks})")
            if min(c.token_ids) < 0 or max(c.token_ids) >= cfg.vocab_size:
                raise ValueError(f"seq {c.seq_id}: token id outside [0, {cfg.vocab_size})")
            seen.add(c.seq_id)
        ids = step.input_ids
        if ids is not None and (ids.shape != (len(step.chunks),) or ids.dtype != torch.int64
                                or any(len(c.token_ids) != 1 for c in step.chunks)):
            raise ValueError(f"input_ids must be int64 [{len(step.chunks)}], one per single-token chunk; "
                             f"got {ids.dtype} {tuple(ids.shape)}")

    def _microbatches(self, chunks: list[SeqChunk]) -> list[list[SeqChunk]]:
        """Cut the chunks, in order, into up to num_microbatches runs of similar token counts."""
        m = min(self.num_microbatches, len(chunks))
        total = sum(len(c.token_ids) for c in chunks)
        out: list[list[SeqChunk]] = [[]]
        done = 0
        for i, c in enumerate(chunks):
            left = len(chunks) - i  # chunks not yet placed, this one included
            if out[-1] and len(out) < m and (done >= total * len(out) / m or left <= m - len(out)):
                out.append([])
            out[-1].append(c)
            done += len(c.token_ids)
        return out

    def _prepare(self, chunks: list[SeqChunk]) -> ForwardBatch:
        """Token-level tensors for one micro-batch: decode chunks first, then prefill chunks."""
        bs = self.block_size
        decode = [c for c in chunks if len(c.token_ids) == 1]
        prefill = [c for c in chunks if len(c.token_ids) > 1]
        ids, pos, slots, row_of = [], [], [], {}
        for c in decode + prefill:
            for p in range(c.start_pos, c.start_pos + len(c.token_ids)):
                slots.append(c.block_table[p // bs] * bs + p % bs)
            pos.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
            ids.extend(c.token_ids)
            row_of[c.seq_id] = len(ids) - 1
        cu = [0]
        for c in prefill:
            cu.append(cu[-1] + len(c.token_ids))
        dev, i32, i64 = self.device, torch.int32, torch.int64
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=i64, device=dev),
            positions=torch.tensor(pos, dtype=i64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=i64, device=dev),
            num_decode=len(decode),
            decode_block_tables=_block_tables(decode, dev),
            decode_context_lens=torch.tensor([c.start_pos + 1 for c in decode], dtype=i32, device=dev),
            prefill_cu_seqlens=torch.tensor(cu, dtype=i32, device=dev),
            prefill_context_lens=torch.tensor([c.start_pos + len(c.token_ids) for c in prefill], dtype=i32,
                                              device=dev),
            prefill_block_tables=_block_tables(prefill, dev),
            logit_rows=torch.tensor([row_of[c.seq_id] for c in chunks if c.want_logits], dtype=i64, device=dev),
        )

    def _execute(self, step: StepInput) -> torch.Tensor | None:
        """This rank's share of a step; the driver gets the logits, other ranks None."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(step.chunks):
            return self.decode_graphs.run(step.chunks, step.input_ids)
        d, H = self.dist, self.model_config.hidden_size
        first, last = self.model.first, self.model.last
        pending: list[Any] = []   # (work, tensor) pairs of isends still in flight
        logits: list[torch.Tensor] = []
        batches = [self._prepare(mb) for mb in self._microbatches(step.chunks)]
        if step.input_ids is not None:   # one micro-batch (see step), all decode rows, in chunk order
            batches[0].input_ids.copy_(step.input_ids)
        for b in batches:
            hidden = None
            if not first:
                hidden = d.recv(torch.empty(b.num_tokens, H, dtype=self.dtype, device=self.device), d.prev_rank)
            stream = self.model.forward(b, hidden, self.kv_caches)
            if not last:
                pending.append((d.isend(stream, d.next_rank), stream))
            elif len(b.logit_rows):
                out = self.model.logits(stream[b.logit_rows])
                if d is None or d.is_driver:
                    logits.append(out)
                elif d.rank == d.logits_rank:
                    pending.append((d.isend(out, 0), out))
        if d is not None and d.is_driver and not last:
            for b in batches:
                if len(b.logit_rows):
                    logits.append(d.recv(torch.empty(len(b.logit_rows), self.model_config.vocab_size,
                                                     device=self.device), d.logits_rank))
        for work, _ in pending:
            work.wait()
        if d is None or d.is_driver:
            return torch.cat(logits) if logits else torch.empty(0, self.model_config.vocab_size, device=self.device)
        return None


def _block_tables(chunks: list[SeqChunk], device: torch.device) -> torch.Tensor:
    """[len(chunks), max blocks] int32, short rows padded with block 0."""
    width = max((len(c.block_table) for c in chunks), default=0)
    rows = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(chunks), width)


# --- ranks ----------------------------------------------------------------------------------------

def run_rank(shard_dir: Path | str, rank: int, world_size: int, tp: int, pp: int, init_method: str,
             device: str = "cpu", num_kv_blocks: int = 256, block_size: int = 16,
             backend: str | None = None, on_ready: Callable[[Engine], None] | None = None,
             ops: str | None = None) -> Engine | None:
    """Start one rank: join the group, load its shard; the driver gets its Engine back (to embed in a
    server; call engine.shutdown() at the end), other ranks serve until the driver shuts down.
    on_ready(engine) is called once the shard is loaded, before serving."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext.init(rank, world_size, tp, pp, init_method, backend or ("nccl" if dev.type == "cuda" else "gloo"))
    try:
        engine = Engine(shard_dir, device=dev, num_kv_blocks=num_kv_blocks, block_size=block_size, dist=ctx,
                        ops=ops)
    except BaseException:
        ctx.close()
        raise
    if on_ready is not None:
        on_ready(engine)
    if ctx.is_driver:
        return engine
    try:
        engine.serve_forever()
    finally:
        ctx.close()
    return None
