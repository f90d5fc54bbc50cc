"""Cross-field validation of a topology against its model checkpoint and node inventory."""
from __future__ import annotations

from pathlib import Path

from orchestrator.errors import CheckpointError, PlanError, TopologyError
from orchestrator.plan import Plan, make_plan
from orchestrator.topology import Topology, load_topology
from workers.models.config import ModelConfig, load_model_config


def check_model_dir(topo: Topology, *, shape_only: bool = False) -> ModelConfig:
    """The model directory exists and holds config.json (+ *.safetensors and tokenizer.json unless
    shape_only); returns its parsed config."""
    path = topo.model.path
    if not path.exists():
        raise topo.error("model.path", f"directory {str(path)!r} does not exist "
                         "(a tiny random model can be made with `orch tiny-model DIR`)")
    if not path.is_dir():
        raise topo.error("model.path", f"{str(path)!r} is not a directory")
    try:
        cfg = load_model_config(path)
    except CheckpointError as e:
        raise topo.error("model.path", str(e)) from None
    if not shape_only:
        if not any(path.glob("*.safetensors")):
            raise topo.error("model.path", f"no *.safetensors weights in {str(path)!r} "
                             "(use --shape-only to check the shape from config.json alone)")
        if not (path / "tokenizer.json").is_file():
            raise topo.error("model.path", f"no tokenizer.json in {str(path)!r}")
    return cfg


def validate_topology(topo: Topology, *, shape_only: bool = False,
                      local_gpus: int | None = None) -> tuple[ModelConfig, Plan]:
    """Every cross-field rule (model files, head/layer split, GPUs, convert node, memory fit);
    raises TopologyError `file:line: key: problem`. Returns the model config and its plan."""
    cfg = check_model_dir(topo, shape_only=shape_only)
    try:
        plan = make_plan(topo, cfg, local_gpus=local_gpus)
    except PlanError as e:
        key = getattr(e, "key", "parallelism")
        raise topo.error(key, getattr(e, "detail", str(e))) from None
    return cfg, plan


def load_and_validate(path: Path | str, *, shape_only: bool = False,
                      local_gpus: int | None = None) -> tuple[Topology, ModelConfig, Plan]:
    """load_topology + validate_topology in one call (what `orch validate/plan/apply` need)."""
    topo = load_topology(path)
    cfg, plan = validate_topology(topo, shape_only=shape_only, local_gpus=local_gpus)
    return topo, cfg, plan


__all__ = ["TopologyError", "check_model_dir", "validate_topology", "load_and_validate"]
