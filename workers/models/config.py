"""ModelConfig: the model facts every stage needs, read from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import CheckpointError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-family model."""

    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    # --- derived sizes -------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Total parameter count (embedding and lm_head counted once if tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


def _int(cfg: dict, key: str, path: Path) -> int:
    if key not in cfg:
        raise CheckpointError(f"{path}: missing key '{key}' in config.json")
    val = cfg[key]
    if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise CheckpointError(f"{path}: '{key}' must be a positive integer, got {val!r}")
    return val


def parse_model_config(cfg: dict[str, Any], path: Path | str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the parsed JSON of a Hugging Face config.json."""
    path = Path(path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported architecture {arch!r}; supported: "
            + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        )
    hidden = _int(cfg, "hidden_size", path)
    heads = _int(cfg, "num_attention_heads", path)
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    model_type = SUPPORTED_ARCHITECTURES[arch]
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    rope_params = cfg.get("rope_parameters")  # newer transformers nest rope settings here
    if isinstance(rope_params, dict):
        rope_theta = rope_theta or rope_params.get("rope_theta")
        rtype = rope_params.get("rope_type") or rope_params.get("type")
        if rope_scaling is None and rtype not in (None, "default"):
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling is not None:
        rtype = rope_scaling.get("rope_type") or rope_scaling.get("type")
        if rtype in (None, "default"):
            rope_scaling = None
        elif rtype != "llama3":
            raise CheckpointError(f"{path}: rope_scaling type {rtype!r} is not supported (supported: llama3)")
    sliding = cfg.get("sliding_window") if model_type == "mistral" else None
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", path),
        num_layers=_int(cfg, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=_int(cfg, "vocab_size", path),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        sliding_window=int(sliding) if sliding else None,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def load_model_config(model_dir: Path | str) -> ModelConfig:
    """Read <model_dir>/config.json into a ModelConfig."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a Hugging Face checkpoint directory needs config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    return parse_model_config(raw, path)
