"""Render a Plan as rich tables for `orch plan`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from orchestrator.plan import Plan

GiB = 1 << 30


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _span(xs: list) -> str:
    if not xs or xs[0] is None:
        return "-"
    return str(xs[0]) if len(xs) == 1 else f"{xs[0]}-{xs[-1]}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render_plan(plan: Plan) -> Group:
    """Summary lines, then one row per pipeline stage with placement and per-GPU memory (GiB)."""
    cfg = plan.model_config
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("plan", f"{plan.name}  (hash {plan.content_hash[:12]})")
    summary.add_row("model", f"{cfg['architecture']}, {_params(plan.num_params)} params, {cfg['num_layers']} layers, "
                    f"{cfg['num_heads']} heads / {cfg['num_kv_heads']} KV heads")
    summary.add_row("checkpoint", plan.model_path)
    summary.add_row("numerics", f"{plan.dtype}, quantization {plan.quantization}, device {plan.device}")
    summary.add_row("parallelism", f"tensor {plan.tensor} x pipeline {plan.pipeline} = {plan.world_size} ranks")
    summary.add_row("convert on", plan.convert_node)
    summary.add_row("KV cache", f"{plan.num_kv_blocks} blocks x {plan.block_size} tokens = "
                    f"{plan.max_concurrent_tokens} concurrent tokens")
    summary.add_row("limits", f"max_num_seqs {plan.max_num_seqs}, max_seq_len {plan.max_seq_len}, "
                    f"max_num_batched_tokens {plan.max_num_batched_tokens}, kv_cache_fraction {plan.kv_cache_fraction}")
    summary.add_row("serve", f"{plan.host}:{plan.port}, metrics :{plan.metrics_port}")
    summary.add_row("artifacts", plan.artifacts)

    table = Table(title="stages (memory per rank, GiB)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("stage", "node", "gpus", "ranks", "layers", "weights", "act", "KV", "budget", "free"):
        table.add_column(col, justify="left" if col in ("node", "layers") else "right", min_width=len(col))
    for st in plan.stages:
        worst = max((plan.ranks[g] for g in st.global_ranks), key=lambda r: r.weights_bytes + r.activation_bytes)
        free = (None if worst.budget_bytes is None else
                worst.budget_bytes - worst.weights_bytes - worst.activation_bytes - worst.kv_cache_bytes)
        table.add_row(str(st.pp_rank), st.node, _span(st.gpus), _span(st.global_ranks),
                      f"{st.layer_start}-{st.layer_stop - 1}", _gib(worst.weights_bytes), _gib(worst.activation_bytes),
                      _gib(worst.kv_cache_bytes), _gib(worst.budget_bytes), _gib(free))
    parts = [summary, table]
    parts += [Text(f"note: {n}", style="dim") for n in plan.notes]
    return Group(*parts)
