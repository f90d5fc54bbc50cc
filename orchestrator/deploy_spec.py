"""DeploymentSpec: everything the controller needs, as plain data, resolved on the CLI side."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass
class RankSpec:
    global_rank: int
    tp_rank: int
    pp_rank: int
    node: str          # topology node name ("local" without nodes)
    node_id: str       # Ray node id
    node_ip: str
    resources: dict[str, float] = field(default_factory=dict)  # extra per-rank Ray resources
    pin: str = ""      # a Ray resource only this rank's node has (orch-node-<name>, else node:<ip>)


@dataclass
class DeploymentSpec:
    name: str
    model_dir: str
    dtype: str
    tp: int
    pp: int
    device: str                      # cpu | cuda (resolved from auto)
    quantization: str
    artifacts: str                   # artifact store root (absolute path)
    serve: dict                      # host, port, max_num_seqs, max_seq_len, kv_cache_fraction, ...
    convert_node: str
    convert_node_id: str
    ranks: list[RankSpec]
    plan_hash: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeploymentSpec":
        d = dict(d)
        d["ranks"] = [RankSpec(**r) for r in d["ranks"]]
        return cls(**d)

    def _hash(self, *keys: str) -> str:
        d = self.to_dict()
        sub = {k: d[k] for k in keys}
        return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def convert_key(self) -> str:
        """Changes when the shards must change."""
        return self._hash("model_dir", "dtype", "tp", "pp", "quantization", "artifacts")

    @property
    def build_key(self) -> str:
        """Changes when engines must be rebuilt or placed differently."""
        return self._hash("model_dir", "dtype", "tp", "pp", "quantization", "artifacts", "device", "ranks",
                          "convert_node_id")

    @property
    def serve_key(self) -> str:
        """Changes when the serving mesh must restart."""
        return self._hash("model_dir", "dtype", "tp", "pp", "quantization", "artifacts", "device", "ranks",
                          "convert_node_id", "serve")


def spec_from_topology(topo, plan, nodes: list[dict]) -> DeploymentSpec:
    """Resolve a validated topology and its plan against the live Ray nodes."""
    from orchestrator.ray_cluster import match_nodes

    device = topo.device
    mapping = match_nodes(topo, nodes, device)
    if device == "auto":
        device = "cuda" if any(n["resources"].get("GPU", 0) > 0 for n in mapping.values()) else "cpu"
        mapping = match_nodes(topo, nodes, device)
    ranks = []
    for r in plan.ranks:
        node = mapping.get(r.node) or next(iter(mapping.values()))
        spec_node = next((n for n in topo.nodes if n.name == r.node), None)
        per_rank = {}
        if spec_node is not None and spec_node.resources and spec_node.gpus:
            per_rank = {k: v / spec_node.gpus for k, v in spec_node.resources.items()}
        pin = f"orch-node-{r.node}" if f"orch-node-{r.node}" in node["resources"] else f"node:{node['ip']}"
        ranks.append(RankSpec(r.global_rank, r.tp_rank, r.pp_rank, r.node, node["node_id"], node["ip"], per_rank,
                              pin))
    conv = mapping.get(plan.convert_node) or next(iter(mapping.values()))
    serve = topo.serve.model_dump(mode="json")
    # the plan's KV capacity, but no more blocks than max_num_seqs full-length sequences can use
    # (as `orch serve` sizes it): a tiny model on a big GPU must not allocate millions of blocks
    from workers.block_manager import blocks_for_sequences

    useful = blocks_for_sequences(topo.serve.max_num_seqs, topo.serve.max_seq_len, plan.block_size)
    serve.update(num_kv_blocks=min(plan.num_kv_blocks, useful), block_size=plan.block_size,
                 metrics_port=plan.metrics_port,
                 max_num_batched_tokens=plan.max_num_batched_tokens)
    return DeploymentSpec(
        name=topo.name, model_dir=str(topo.model.path), dtype=topo.model.dtype,
        tp=topo.parallelism.tensor, pp=topo.parallelism.pipeline, device=device,
        quantization=topo.build.quantization, artifacts=str(topo.build.artifacts), serve=serve,
        convert_node=plan.convert_node, convert_node_id=conv["node_id"], ranks=ranks,
        plan_hash=plan.content_hash)


def diff_specs(running: DeploymentSpec | None, new: DeploymentSpec) -> dict:
    """What applying `new` over `running` changes: differing keys and the phases that would run."""
    if running is None:
        phases = ["convert"] + (["build"] if new.device == "cuda" else []) + ["serve"]
        return {"running": False, "changed": ["(new deployment)"], "phases": phases}
    old_d, new_d = running.to_dict(), new.to_dict()
    changed = []
    for key in new_d:
        if key == "serve":
            changed += [f"serve.{k}" for k in sorted(set(old_d[key]) | set(new_d[key]))
                        if old_d[key].get(k) != new_d[key].get(k)]
        elif old_d.get(key) != new_d[key] and key != "plan_hash":
            changed.append(key)
    phases = []
    if running.build_key != new.build_key:
        phases = ["convert"] + (["build"] if new.device == "cuda" else []) + ["serve"]
    elif running.serve_key != new.serve_key:
        phases = ["serve"]
    return {"running": True, "changed": changed, "phases": phases}
