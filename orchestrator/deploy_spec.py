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
