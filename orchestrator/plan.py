"""The plan: rank placement, layer ranges and per-GPU memory computed from a topology and config.json.

Pure: no Ray, no torch. The same inputs always give the same plan and the same content hash.

Placement: global rank = pp_rank * tensor + tp_rank (rank 0 drives). A tensor-parallel group sits
on one node; pipeline stages fill the serving nodes in the order listed (a node with room for several
TP groups takes several successive stages). On CPU, stage s runs on serving node s mod n.

Memory per rank (bytes), with b = bytes of the model dtype:
  weights      the rank's shard tensors (layout.shard_tensors) at their stored precision
  activations  T * b * (4*H + q_local + 2*kv_local + 3*I_local) + [last stage] S * V_pad * 4
               (T = serve.max_num_batched_tokens, S = serve.max_num_seqs, V_pad = padded vocab:
                the float32 logits gathered over the TP group)
  KV / token   2 * layers_in_stage * n_kv_local * head_dim * b
  budget       kv_cache_fraction * GPU memory (gpu_memory_gb, default 80 GiB)
  KV blocks    (budget - weights - activations) // (block_size * KV / token), the minimum over ranks
               (every rank holds the same block ids). On CPU, the KV cache is sized to what
               serve.max_num_seqs sequences of serve.max_seq_len tokens need (capped by memory_gb
               when the node gives it).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.errors import PlanError
from orchestrator.topology import DTYPE_BYTES, Node, Topology
from workers.layout import (ShardTensor, check_parallelism, local_heads, padded_vocab, shard_tensors, source_shape,
                            stage_layers)
from workers.models.config import ModelConfig

GiB = 1 << 30
LOCAL_NODE = "local"


def plan_error(key: str, message: str) -> PlanError:
    """A PlanError `key: message` that remembers which topology key it is about."""
    err = PlanError(f"{key}: {message}")
    err.key = key  # type: ignore[attr-defined]
    err.detail = message  # type: ignore[attr-defined]
    return err


@dataclass(frozen=True)
class RankPlan:
    """Where one rank runs, what it holds and its memory figures (bytes)."""

    global_rank: int
    tp_rank: int
    pp_rank: int
    node: str
    address: str
    gpu: int | None
    layer_start: int
    layer_stop: int
    weights_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int
    kv_block_bytes: int
    kv_cache_bytes: int
    capacity_bytes: int | None
    budget_bytes: int | None
    max_kv_blocks: int | None


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: its node, GPUs and layer range."""

    pp_rank: int
    node: str
    gpus: list[int | None]
    layer_start: int
    layer_stop: int
    global_ranks: list[int]


@dataclass(frozen=True)
class NodePlan:
    """A node the plan uses, as the topology lists it (or the implicit local node)."""

    name: str
    address: str
    gpus: int
    memory_gb: float | None
    roles: list[str]
    resources: dict[str, float]


@dataclass(frozen=True)
class Plan:
    """Everything the controller needs to place and size the ranks."""

    name: str
    topology_hash: str
    model_path: str
    model_config: dict[str, Any]
    num_params: int
    dtype: str
    quantization: str
    device: str
    tensor: int
    pipeline: int
    world_size: int
    convert_node: str
    nodes: list[NodePlan]
    stages: list[StagePlan]
    ranks: list[RankPlan]
    block_size: int
    num_kv_blocks: int
    max_concurrent_tokens: int
    max_num_seqs: int
    max_seq_len: int
    max_num_batched_tokens: int
    kv_cache_fraction: float
    artifacts: str
    host: str
    port: int
    metrics_port: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-able data, with its content hash."""
        d = asdict(self)
        d["content_hash"] = _hash(d)
        return d

    @property
    def content_hash(self) -> str:
        """sha256 of the plan's canonical JSON."""
        return _hash(asdict(self))

    def rank(self, tp_rank: int, pp_rank: int) -> RankPlan:
        """The RankPlan of (tp_rank, pp_rank)."""
        return self.ranks[pp_rank * self.tensor + tp_rank]

    def render_table(self) -> Any:
        """A rich renderable: summary, per-rank placement and memory."""
        from orchestrator.plan_table import render_plan

        return render_plan(self)


def _hash(d: dict[str, Any]) -> str:
    d = {k: v for k, v in d.items() if k != "content_hash"}
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------------- placement
def resolve_device(topo: Topology, local_gpus: int | None = None) -> str:
    """cuda or cpu: `auto` means cuda when a listed node (or, with no nodes, this machine) has GPUs."""
    if topo.device != "auto":
        return topo.device
    if topo.nodes:
        return "cuda" if any(n.gpus for n in topo.nodes) else "cpu"
    return "cuda" if local_gpus else "cpu"


def plan_nodes(topo: Topology, device: str, local_gpus: int | None = None) -> list[Node]:
    """The listed nodes, or one implicit local node: on cuda it has local_gpus GPUs when that is known
    and non-zero, else it is assumed to have tensor x pipeline GPUs (planning for another machine)."""
    if topo.nodes:
        return list(topo.nodes)
    need = topo.parallelism.tensor * topo.parallelism.pipeline
    gpus = (local_gpus or need) if device == "cuda" else 0
    return [Node(name=LOCAL_NODE, address="127.0.0.1", gpus=gpus)]


def choose_convert_node(nodes: list[Node]) -> Node:
    """The node that converts weights: the first with role convert, else the role-less node with the
    most host memory (ties: first listed)."""
    marked = [n for n in nodes if "convert" in n.roles]
    if marked:
        return marked[0]
    free = [n for n in nodes if not n.roles]
    if not free:
        raise plan_error("nodes", "no node can convert weights: give one node `roles: [convert]` "
                         "(a node with roles takes only those roles)")
    return max(free, key=lambda n: (n.memory_gb or 0.0, -nodes.index(n)))


def place_stages(topo: Topology, device: str, nodes: list[Node]) -> list[tuple[Node, list[int | None]]]:
    """(node, GPU indices) of each pipeline stage; raises a keyed PlanError when they do not fit."""
    tp, pp = topo.parallelism.tensor, topo.parallelism.pipeline
    serving = [n for n in nodes if n.can("serve")]
    if not serving:
        raise plan_error("nodes", "no node can serve: give a node `roles: [serve]` or no roles")
    if device == "cpu":
        return [(serving[s % len(serving)], [None] * tp) for s in range(pp)]
    gpu_nodes = [n for n in serving if n.gpus > 0]
    total = sum(n.gpus for n in gpu_nodes)
    listing = ", ".join(f"{n.name}: {n.gpus}" for n in serving)
    if total < tp * pp:
        raise plan_error("parallelism", f"tensor x pipeline = {tp} x {pp} needs {tp * pp} GPUs but the "
                         f"serving nodes have {total} ({listing})")
    biggest = max(gpu_nodes, key=lambda n: n.gpus)
    if biggest.gpus < tp:
        raise plan_error("parallelism.tensor", f"a tensor-parallel group of {tp} GPUs must fit in one node, "
                         f"but the largest serving node ({biggest.name}) has {biggest.gpus}")
    out: list[tuple[Node, list[int | None]]] = []
    for node in gpu_nodes:
        for g in range(node.gpus // tp):
            if len(out) < pp:
                out.append((node, list(range(g * tp, (g + 1) * tp))))
    if len(out) < pp:
        groups = ", ".join(f"{n.name}: {n.gpus // tp}" for n in gpu_nodes)
        raise plan_error("parallelism.pipeline", f"{pp} stages need {pp} whole tensor-parallel groups of {tp} "
                         f"GPUs, but the nodes hold only {len(out)} ({groups})")
    return out


# -------------------------------------------------------------------------------------- memory
def shard_weight_bytes(cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int,
                       dtype: str, quantization: str = "none") -> int:
    """Bytes of one rank's shard; quantized formats are estimated (1 or 0.5 byte per linear weight
    plus scales), the build phase decides the exact layout."""
    return sum(_tensor_bytes(cfg, t, DTYPE_BYTES[dtype], quantization)
               for t in shard_tensors(cfg, tp, pp, tp_rank, pp_rank))


def _tensor_bytes(cfg: ModelConfig, t: ShardTensor, b: int, quantization: str) -> int:
    shapes = [source_shape(cfg, p.source) for p in t.pieces]
    if t.pad_to is not None:  # vocab-parallel rows, padded
        numel = t.pad_to * cfg.hidden_size
    else:
        numel = sum(math.prod(shape) // shape[p.dim] * (p.stop - p.start) for p, shape in zip(t.pieces, shapes))
    if quantization == "none" or not t.name.endswith("_proj.weight"):
        return numel * b
    out_rows = sum(p.stop - p.start for p in t.pieces) if t.concat_dim == 0 else shapes[0][0]
    if quantization in ("fp8", "int8_wo"):
        return numel + 4 * out_rows  # one byte per weight + a float32 scale per output row
    return numel // 2 + 2 * (numel // 128)  # int4_wo: packed nibbles + a 16-bit scale per 128 weights


def activation_bytes(cfg: ModelConfig, tp: int, tp_rank: int, last_stage: bool,
                     max_num_batched_tokens: int, max_num_seqs: int, dtype: str) -> int:
    """Peak activation estimate of one engine step on one rank (see the module docstring)."""
    b = DTYPE_BYTES[dtype]
    q, kv = local_heads(cfg, tp, tp_rank)
    q_local, kv_local = len(q) * cfg.head_dim, len(kv) * cfg.head_dim
    i_local = cfg.intermediate_size // tp
    h = cfg.hidden_size
    act = max_num_batched_tokens * b * (4 * h + q_local + 2 * kv_local + 3 * i_local)
    if last_stage:
        act += max_num_seqs * padded_vocab(cfg, tp) * 4
    return act


def kv_bytes_per_token(cfg: ModelConfig, tp: int, tp_rank: int, num_layers: int, dtype: str) -> int:
    """KV-cache bytes one token takes on one rank: 2 * layers * n_kv_local * head_dim * dtype bytes."""
    _, kv = local_heads(cfg, tp, tp_rank)
    return 2 * num_layers * len(kv) * cfg.head_dim * DTYPE_BYTES[dtype]


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------------------------------- plan
def _size_rank(topo: Topology, cfg: ModelConfig, device: str, s: int, r: int, node: Node, gpu: int | None,
               layers: tuple[int, int], ranks_on_node: int) -> dict[str, Any]:
    """Memory figures of rank (tp r, stage s) as RankPlan fields (all but kv_cache_bytes)."""
    tp, pp, serve, dtype = topo.parallelism.tensor, topo.parallelism.pipeline, topo.serve, topo.model.dtype
    start, stop = layers
    weights = shard_weight_bytes(cfg, tp, pp, r, s, dtype, topo.build.quantization)
    act = activation_bytes(cfg, tp, r, s == pp - 1, serve.max_num_batched_tokens, serve.max_num_seqs, dtype)
    per_tok = kv_bytes_per_token(cfg, tp, r, stop - start, dtype)
    if device == "cuda":
        capacity: int | None = int(node.gpu_memory_gb * GiB)
    else:  # CPU ranks share the node's RAM when it is given
        capacity = int(node.memory_gb * GiB / ranks_on_node) if node.memory_gb else None
    budget = round(serve.kv_cache_fraction * capacity) if capacity is not None else None
    if budget is not None and weights + act > budget:
        where = f"rank {s * tp + r} (stage {s}, {node.name}" + (f" GPU {gpu})" if gpu is not None else ")")
        unit = "GPU" if device == "cuda" else "memory share"
        raise plan_error("parallelism", f"the model does not fit: {where} needs {_gib(weights)} of weights "
                         f"+ {_gib(act)} of activations = {_gib(weights + act)}, but kv_cache_fraction "
                         f"{serve.kv_cache_fraction} of its {_gib(capacity)} {unit} is {_gib(budget)}; "
                         f"use more GPUs (tensor/pipeline), a smaller dtype or quantization")
    block = serve.block_size * per_tok
    return dict(
        global_rank=s * tp + r, tp_rank=r, pp_rank=s, node=node.name, address=node.address, gpu=gpu,
        layer_start=start, layer_stop=stop, weights_bytes=weights, activation_bytes=act,
        kv_bytes_per_token=per_tok, kv_block_bytes=block, capacity_bytes=capacity, budget_bytes=budget,
        max_kv_blocks=(budget - weights - act) // block if budget is not None else None,
    )


def make_plan(topo: Topology, cfg: ModelConfig, *, local_gpus: int | None = None) -> Plan:
    """Place every rank and size its memory; PlanError (with the numbers) when it does not fit."""
    tp, pp = topo.parallelism.tensor, topo.parallelism.pipeline
    try:
        check_parallelism(cfg, tp, pp)
    except PlanError as e:  # "parallelism.tensor=3 must divide ..." -> key parallelism.tensor, "3 must divide ..."
        head, _, rest = str(e).partition("=")
        if head.startswith("parallelism.") and " " not in head:
            raise plan_error(head, rest) from None
        raise plan_error("parallelism", str(e)) from None
    serve = topo.serve
    if serve.max_seq_len > cfg.max_position_embeddings:
        raise plan_error("serve.max_seq_len", f"{serve.max_seq_len} exceeds the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    device = resolve_device(topo, local_gpus)
    nodes = plan_nodes(topo, device, local_gpus)
    convert = choose_convert_node(nodes)
    placed = place_stages(topo, device, nodes)
    layers = stage_layers(cfg.num_layers, pp)
    per_node = {n.name: 0 for n in nodes}
    for node, _ in placed:
        per_node[node.name] += tp

    drafts = [_size_rank(topo, cfg, device, s, r, node, gpus[r], layers[s], per_node[node.name])
              for s, (node, gpus) in enumerate(placed) for r in range(tp)]
    demand = -(-serve.max_num_seqs * serve.max_seq_len // serve.block_size)
    limits = [d["max_kv_blocks"] for d in drafts if d["max_kv_blocks"] is not None]
    if device == "cpu":
        limits.append(demand)
    num_blocks = min(limits) if limits else demand
    max_tokens = num_blocks * serve.block_size
    if max_tokens < serve.max_seq_len:
        tight = min((d for d in drafts if d["max_kv_blocks"] is not None), key=lambda d: d["max_kv_blocks"])
        raise plan_error("serve.max_seq_len", f"the KV cache holds only {max_tokens} tokens ({num_blocks} blocks "
                         f"of {serve.block_size}; rank {tight['global_rank']} has {_gib(tight['budget_bytes'])} "
                         f"budget, {_gib(tight['weights_bytes'])} weights, {_gib(tight['activation_bytes'])} "
                         f"activations), fewer than max_seq_len {serve.max_seq_len}; lower it or add GPUs")
    ranks = [RankPlan(kv_cache_bytes=num_blocks * d["kv_block_bytes"], **d) for d in drafts]
    stages = [StagePlan(pp_rank=s, node=node.name, gpus=list(gpus), layer_start=layers[s][0],
                        layer_stop=layers[s][1], global_ranks=[s * tp + r for r in range(tp)])
              for s, (node, gpus) in enumerate(placed)]
    used = {convert.name} | {node.name for node, _ in placed}
    return Plan(
        name=topo.name, topology_hash=topo.topology_hash(), model_path=str(topo.model.path),
        model_config=cfg.to_dict(), num_params=cfg.num_params(), dtype=topo.model.dtype, quantization=topo.build.quantization,
        device=device,
        tensor=tp, pipeline=pp, world_size=tp * pp, convert_node=convert.name,
        nodes=[NodePlan(n.name, n.address, n.gpus, n.memory_gb, list(n.roles), dict(n.resources))
               for n in nodes if n.name in used],
        stages=stages, ranks=ranks, block_size=serve.block_size, num_kv_blocks=num_blocks,
        max_concurrent_tokens=max_tokens, max_num_seqs=serve.max_num_seqs, max_seq_len=serve.max_seq_len,
        max_num_batched_tokens=serve.max_num_batched_tokens, kv_cache_fraction=serve.kv_cache_fraction,
        artifacts=topo.build.artifacts, host=serve.host, port=serve.port, metrics_port=serve.metrics_port or 0,
        notes=_notes(topo, device, cfg),
    )


def _notes(topo: Topology, device: str, cfg: ModelConfig) -> list[str]:
    notes = []
    if not topo.nodes and device == "cuda":
        notes.append("no nodes listed: the ranks run on this machine's GPUs, assumed to have 80 GiB each")
    if cfg.num_kv_heads < topo.parallelism.tensor:
        rep = topo.parallelism.tensor // cfg.num_kv_heads
        notes.append(f"{cfg.num_kv_heads} KV heads over tensor={topo.parallelism.tensor}: each KV head is "
                     f"replicated on {rep} ranks")
    if topo.build.quantization != "none":
        notes.append(f"weights sized for {topo.build.quantization} as an estimate")
    return notes
