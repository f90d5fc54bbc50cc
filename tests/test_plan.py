"""Planner: placements and memory figures of real model shapes against numbers computed by hand."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.errors import PlanError
from orchestrator.plan import make_plan
from orchestrator.topology import parse_topology
from orchestrator.validation import validate_topology
from tests.fixtures.model_shapes import LLAMA31, llama31, write_shape_dir
from workers.models.config import parse_model_config
from workers.models.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
BUDGET_80 = 80 * GiB * 9 // 10  # kv_cache_fraction 0.9 of an 80 GiB GPU = 77_309_411_328 bytes
LOGITS_256 = 256 * 128256 * 4  # float32 logits of 256 sequences over the Llama-3 vocabulary


def topo(body: str, **serve):
    """A topology with the given nodes/parallelism body and serve settings."""
    s = {"max_num_seqs": 256, "max_seq_len": 8192, "max_num_batched_tokens": 2048, **serve}
    text = "name: t\nmodel: {path: /nonexistent}\n" + body + "serve:\n" + "".join(f"  {k}: {v}\n" for k, v in s.items())
    return parse_topology(text, "t.yaml")


NODES_2x8 = """\
nodes:
  - {name: gpu-a, address: 10.0.0.11, gpus: 8}
  - {name: gpu-b, address: 10.0.0.12, gpus: 8}
  - {name: bigmem, address: 10.0.0.20, memory_gb: 1024, roles: [convert]}
"""


def test_llama31_8b_on_one_gpu() -> None:
    plan = make_plan(topo("device: cuda\n"), llama31("8b"))
    params = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096) + 2 * 128256 * 4096 + 4096
    assert params == 8_030_261_248 == plan.num_params
    (r,) = plan.ranks
    assert (r.node, r.gpu, r.layer_start, r.layer_stop, r.global_rank) == ("local", 0, 0, 32, 0)
    assert r.weights_bytes == 2 * params == 16_060_522_496
    assert r.activation_bytes == 2048 * 2 * (4 * 4096 + 4096 + 2 * 1024 + 3 * 14336) + LOGITS_256 == 399_769_600
    assert r.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert r.budget_bytes == BUDGET_80
    blocks = (BUDGET_80 - 16_060_522_496 - 399_769_600) // (16 * 131_072)
    assert blocks == 29_015 == plan.num_kv_blocks
    assert plan.max_concurrent_tokens == 29_015 * 16 == 464_240
    assert r.kv_cache_bytes == 29_015 * 16 * 131_072
    assert plan.convert_node == "local" and plan.device == "cuda" and plan.world_size == 1


def test_llama31_70b_tp8_pp2_over_two_nodes() -> None:
    t = topo("parallelism: {tensor: 8, pipeline: 2}\n" + NODES_2x8 + "device: cuda\n", max_num_batched_tokens=4096)
    plan = make_plan(t, llama31("70b"))
    assert plan.convert_node == "bigmem" and plan.world_size == 16
    assert [(r.global_rank, r.node, r.gpu, r.tp_rank, r.pp_rank) for r in plan.ranks] == \
        [(i, "gpu-a", i, i, 0) for i in range(8)] + [(8 + i, "gpu-b", i, i, 1) for i in range(8)]
    assert [(s.node, s.layer_start, s.layer_stop, s.global_ranks) for s in plan.stages] == \
        [("gpu-a", 0, 40, list(range(8))), ("gpu-b", 40, 80, list(range(8, 16)))]
    # per rank: 8 of 64 query heads (1024 rows), 1 of 8 KV heads (128 rows), 28672 / 8 = 3584 MLP columns
    layer = 8192 * (1024 + 2 * 128) + 1024 * 8192 + 3 * 8192 * 3584 + 2 * 8192
    vocab_rows = 128256 // 8 * 8192
    w0, w1 = 2 * (40 * layer + vocab_rows), 2 * (40 * layer + 8192 + vocab_rows)
    assert (w0, w1) == (8_820_359_168, 8_820_375_552)
    a0 = 4096 * 2 * (4 * 8192 + 1024 + 2 * 128 + 3 * 3584)
    a1 = a0 + LOGITS_256
    assert {(r.weights_bytes, r.activation_bytes) for r in plan.ranks[:8]} == {(w0, a0)}
    assert {(r.weights_bytes, r.activation_bytes) for r in plan.ranks[8:]} == {(w1, a1)}
    per_token = 2 * 40 * 1 * 128 * 2
    assert {r.kv_bytes_per_token for r in plan.ranks} == {per_token}
    blocks = min((BUDGET_80 - w0 - a0) // (16 * per_token), (BUDGET_80 - w1 - a1) // (16 * per_token))
    assert plan.num_kv_blocks == blocks == 207_491
    assert plan.max_concurrent_tokens == blocks * 16
    assert plan.rank(3, 1).global_rank == 11 and plan.rank(3, 1).node == "gpu-b"


def _layer_405b_tp8() -> int:
    # 16 of 128 query heads (2048 rows), 1 of 8 KV heads, 53248 / 8 = 6656 MLP columns
    return 16384 * (2048 + 2 * 128) + 2048 * 16384 + 3 * 16384 * 6656 + 2 * 16384


def test_llama31_405b_tp8_pp2() -> None:
    plan = make_plan(topo("parallelism: {tensor: 8, pipeline: 2}\n" + NODES_2x8), llama31("405b"))
    assert plan.device == "cuda"  # auto: the nodes list GPUs
    layer = _layer_405b_tp8()
    assert layer == 398_491_648
    vocab_rows = 16032 * 16384
    w0, w1 = 2 * (63 * layer + vocab_rows), 2 * (63 * layer + 16384 + vocab_rows)
    a0 = 2048 * 2 * (4 * 16384 + 2048 + 2 * 128 + 3 * 6656)
    a1 = a0 + LOGITS_256
    assert (plan.ranks[0].weights_bytes, plan.ranks[15].weights_bytes) == (w0, w1)
    assert (plan.ranks[0].activation_bytes, plan.ranks[15].activation_bytes) == (a0, a1)
    per_token = 2 * 63 * 128 * 2
    assert plan.ranks[0].kv_bytes_per_token == per_token == 32_256
    blocks = min((BUDGET_80 - w0 - a0), (BUDGET_80 - w1 - a1)) // (16 * per_token)
    assert plan.num_kv_blocks == blocks
    assert [(s.layer_start, s.layer_stop) for s in plan.stages] == [(0, 63), (63, 126)]


def test_llama31_405b_on_one_node_is_refused_with_the_numbers() -> None:
    t = topo("parallelism: {tensor: 8, pipeline: 1}\n" + NODES_2x8)
    with pytest.raises(PlanError) as ei:
        make_plan(t, llama31("405b"))
    weights = 2 * (126 * _layer_405b_tp8() + 2 * 16032 * 16384 + 16384)
    msg = str(ei.value)
    assert msg.startswith("parallelism: the model does not fit: rank 0 (stage 0, gpu-a GPU 0)")
    assert f"{weights / GiB:.2f} GiB of weights" in msg and "72.00 GiB" in msg and "80.00 GiB GPU" in msg
    assert ei.value.key == "parallelism"


def test_stages_share_a_node_when_it_has_room() -> None:
    body = "parallelism: {tensor: 2, pipeline: 4}\nnodes:\n  - {name: a, address: x1, gpus: 4}\n" \
           "  - {name: b, address: x2, gpus: 4}\n"
    plan = make_plan(topo(body), llama31("8b"))
    assert [(s.node, s.gpus, s.layer_start, s.layer_stop) for s in plan.stages] == [
        ("a", [0, 1], 0, 8), ("a", [2, 3], 8, 16), ("b", [0, 1], 16, 24), ("b", [2, 3], 24, 32)]
    assert plan.convert_node == "a"  # no roles, equal memory: first listed
    big = make_plan(topo("parallelism: {tensor: 8, pipeline: 2}\nnodes:\n  - {name: n, address: x, gpus: 16}\n"),
                    llama31("70b"))
    assert [s.gpus for s in big.stages] == [list(range(8)), list(range(8, 16))]


def test_uneven_layers_and_kv_head_replication() -> None:
    body = "parallelism: {tensor: 16, pipeline: 3}\nnodes:\n" + "".join(
        f"  - {{name: n{i}, address: x{i}, gpus: 16, memory_gb: {100 * (i + 1)}}}\n" for i in range(3))
    plan = make_plan(topo(body), llama31("70b"))
    assert [(s.layer_start, s.layer_stop) for s in plan.stages] == [(0, 27), (27, 54), (54, 80)]
    assert plan.convert_node == "n2"  # the most host memory
    # 8 KV heads over 16 ranks: one (replicated) KV head per rank
    assert [r.kv_bytes_per_token for r in plan.ranks[::16]] == [2 * n * 1 * 128 * 2 for n in (27, 27, 26)]
    assert any("replicated on 2 ranks" in n for n in plan.notes)


def test_fp8_weights_estimate() -> None:
    plan = make_plan(topo("device: cuda\nbuild: {quantization: fp8}\n"), llama31("8b"))
    linear = 4096 * 6144 + 4096 * 4096 + 2 * 14336 * 4096 + 4096 * 14336
    rows = 6144 + 4096 + 2 * 14336 + 4096
    expect = 32 * (linear + 4 * rows + 2 * 2 * 4096) + 2 * 2 * 128256 * 4096 + 2 * 4096
    assert plan.ranks[0].weights_bytes == expect


def test_kv_cache_too_small_for_max_seq_len() -> None:
    t = topo("nodes:\n  - {name: small, address: x, gpus: 1, gpu_memory_gb: 18}\n")
    with pytest.raises(PlanError) as ei:
        make_plan(t, llama31("8b"))
    blocks = (round(0.9 * 18 * GiB) - 16_060_522_496 - 399_769_600) // (16 * 131_072)
    assert ei.value.key == "serve.max_seq_len"
    assert f"holds only {blocks * 16} tokens" in str(ei.value) and "max_seq_len 8192" in str(ei.value)


def test_cpu_plan_sizes_kv_to_demand_and_spreads_stages(tmp_path: Path) -> None:
    seqs, seq_len = random.randrange(2, 9), random.choice([128, 256, 512])
    cfg = parse_model_config(tiny_config("llama"))
    t = topo("device: cpu\nparallelism: {tensor: 2, pipeline: 2}\nnodes:\n  - {name: a, address: x1}\n"
             "  - {name: b, address: x2, memory_gb: 4}\n", max_num_seqs=seqs, max_seq_len=seq_len,
             max_num_batched_tokens=64)
    plan = make_plan(t, cfg)
    assert plan.device == "cpu" and [r.gpu for r in plan.ranks] == [None] * 4
    assert [s.node for s in plan.stages] == ["a", "b"]
    assert plan.num_kv_blocks == -(-seqs * seq_len // 16)
    assert plan.ranks[0].capacity_bytes is None and plan.ranks[2].capacity_bytes == 4 * GiB // 2
    # tiny llama: 4 layers, 2 KV heads of head_dim 16; tensor 2 -> 1 head per rank; 2 layers per stage; bfloat16
    assert plan.ranks[0].kv_bytes_per_token == 2 * 2 * 1 * 16 * 2


def test_plan_is_deterministic_and_hashed() -> None:
    body = "parallelism: {tensor: 8, pipeline: 2}\n" + NODES_2x8
    p1, p2 = make_plan(topo(body), llama31("70b")), make_plan(topo(body), llama31("70b"))
    d = p1.to_dict()
    assert d == p2.to_dict() and d["content_hash"] == p1.content_hash and len(p1.content_hash) == 64
    assert json.loads(json.dumps(d)) == d
    p3 = make_plan(topo(body, max_num_seqs=random.randrange(2, 200)), llama31("70b"))
    assert p3.content_hash != p1.content_hash


def test_render_table_shows_the_placement() -> None:
    plan = make_plan(topo("parallelism: {tensor: 8, pipeline: 2}\n" + NODES_2x8), llama31("70b"))
    console = Console(record=True, width=140)
    console.print(plan.render_table())
    text = console.export_text()
    for s in ("gpu-a", "gpu-b", "0-39", "40-79", "8-15", "bigmem", plan.content_hash[:12], "70.55B"):
        assert s in text, s


def test_planner_is_pure() -> None:
    code = ("import sys, orchestrator.plan, orchestrator.validation, orchestrator.commands.plan; "
            "bad = [m for m in ('torch', 'ray', 'grpc') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("name,size", [("single-gpu", "8b"), ("multi-node", "70b")])
def test_example_configs_validate_and_plan(tmp_path: Path, name: str, size: str) -> None:
    model = write_shape_dir(tmp_path / size, LLAMA31[size])
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert f"../models/llama-3.1-{size}" in text
    t = parse_topology(text.replace(f"../models/llama-3.1-{size}", str(model)), f"{name}.yaml")
    cfg, plan = validate_topology(t, shape_only=True)
    assert cfg.num_layers == {"8b": 32, "70b": 80}[size]
    if name == "multi-node":
        assert (plan.tensor, plan.pipeline, plan.convert_node) == (8, 2, "bigmem")
        assert [s.node for s in plan.stages] == ["gpu-a", "gpu-b"]
    else:
        assert (plan.world_size, plan.device, plan.num_kv_blocks) == (1, "cuda", 29_015)
