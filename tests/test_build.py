"""CPU-side logic of the engine build: pins and mismatch messages, build keys, manifests, tuning tables."""
from __future__ import annotations

import json

import pytest
import torch

from orchestrator.errors import EngineMismatchError
from workers.build import (PINNED, build_engine, build_key, kernel_specs, mismatch_message, mismatches,
                           read_engine_manifest, sources_hash)
from workers.kernels.tuning import Tuning
from workers.models.config import parse_model_config
from workers.models.tiny import tiny_config

ENV = {"gpu_name": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "cuda_runtime": "13.0", "cuda_driver": "13.0",
       "nvrtc": "13.0", "cupy": "14.2.0", "torch": "2.11.0+cu130", "orch": "0.1.0"}


def test_mismatch_names_exactly_what_differs_and_how_to_rebuild():
    other = dict(ENV, gpu_name="NVIDIA H200", torch="2.12.0")
    assert mismatches(ENV, ENV) == []
    diffs = mismatches(dict(ENV, shard_dir="/a/rank-0-0"), other)
    assert diffs == ["gpu_name: built for 'NVIDIA H100 80GB HBM3', this worker has 'NVIDIA H200'",
                     "torch: built for '2.11.0+cu130', this worker has '2.12.0'"]
    msg = mismatch_message("/e/x", dict(ENV, shard_dir="/a/rank-0-0"), other)
    assert msg.startswith("/e/x/engine.json: engine does not match this worker (")
    assert "orch build" in msg and "/a/rank-0-0" in msg and "orch apply" in msg and "cupy" not in msg


def test_build_key_follows_shard_stack_and_sources():
    m = {"content_hash": "abc"}
    k = build_key(m, ENV, "src1")
    assert build_key(m, dict(ENV), "src1") == k                        # deterministic
    assert build_key({"content_hash": "abd"}, ENV, "src1") != k         # another shard
    assert build_key(m, ENV, "src2") != k                               # kernel sources changed
    for key in PINNED:
        assert build_key(m, dict(ENV, **{key: "x"}), "src1") != k       # any pinned part of the stack
    assert build_key(m, dict(ENV, unrelated="y"), "src1") == k          # runtime settings take no part


def test_kernel_specs_take_tma_gemm_on_sm90_only():
    """sm_90 builds compile tma_gemm (one variant per row bucket) in skinny_gemm's place; others skinny_gemm."""
    cfg = parse_model_config(tiny_config("llama", num_attention_heads=8, num_key_value_heads=2)).to_dict()
    on90 = [s.family for s in kernel_specs(cfg, 1, "bfloat16", "sm_90")]
    on80 = [s.family for s in kernel_specs(cfg, 1, "bfloat16", "sm_80")]
    assert on90.count("tma_gemm") == 5 and "skinny_gemm" not in on90
    assert on80.count("skinny_gemm") == 8 and "tma_gemm" not in on80
    assert "tma_gemm" not in [s.family for s in kernel_specs(cfg, 1, "float32", "sm_90")]


def test_kernel_specs_follow_model_shape():
    cfg = parse_model_config(tiny_config("llama", num_attention_heads=8, num_key_value_heads=2)).to_dict()
    specs = kernel_specs(cfg, 1, "bfloat16")
    fams = [s.family for s in specs]
    assert fams == ["rms_norm", "silu_mul", "rope_cache", *["gemv"] * 3, *["skinny_gemm"] * 8,
                    *["paged_attention"] * 3]
    assert "skinny_gemm" not in [s.family for s in kernel_specs(cfg, 1, "float32")]   # 16-bit types only
    attn = dict(specs[-1].defines)
    assert attn == {"DTYPE": 2, "GROUP": 4, "HD": 16, "KV_STAGES": 4}
    assert dict(kernel_specs(cfg, 2, "float32")[-1].defines) == {"DTYPE": 0, "GROUP": 4, "HD": 16, "KV_STAGES": 4}
    assert sources_hash(specs) != sources_hash(kernel_specs(cfg, 1, "float16"))
    assert "#define HD 16" in specs[-1].source() and "paged_decode_combine" in specs[-1].source()


def test_engine_manifest_reading(tmp_path):
    assert read_engine_manifest(tmp_path) is None                      # a plain shard directory
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="unreadable engine manifest"):
        read_engine_manifest(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"format": "orch-engine", "format_version": 99}))
    with pytest.raises(EngineMismatchError, match="not an orch-engine v1 manifest"):
        read_engine_manifest(tmp_path)


def test_tuning_table_round_trip_and_lookup():
    t = Tuning(attention_splits={1: 32, 8: 4, 64: 1}, attention_stages={1: 0, 8: 3, 64: 2}, gemv_max_m={"4096x4096": 3}, default_gemv_max_m=2,
               gemv_rows={"4096x4096": 4, "6144x4096": 1}, gemv_unroll={"6144x4096": 4},
               gemv_gpu_grid={"6144x4096": False}, skinny={"4096x4096": {16: [64, 4, 64, 4], 64: [128, 2, 128, 3]}},
               lt={"4096x14336": {64: [7, 1, 2, 3, 4, 5, 6, 2 ** 63 + 9], 256: list(range(8))}},
               tma={"28672x4096": {8: [2, 4, 6], 64: [1, 1, 6]}}, stream={"6144x4096": {1: [8, 192, 1], 3: [16, 128, 1]}})
    back = Tuning.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    assert [t.splits_for(b, 8) for b in (1, 2, 8, 9, 64, 300)] == [32, 4, 4, 1, 1, 1]
    assert [t.stages_for(b) for b in (1, 2, 8, 9, 64, 300)] == [0, 3, 3, 2, 2, 2]
    assert Tuning().stages_for(5) == 0
    assert t.gemv_limit(4096, 4096) == 3 and t.gemv_limit(14336, 4096) == 2
    assert t.gemv_choice(4096, 4096) == (4, 2, True) and t.gemv_choice(1, 8) == (2, 4, True)
    assert t.gemv_choice(6144, 4096) == (1, 4, False)
    assert [t.skinny_choice(4096, 4096, m) for m in (2, 16, 17, 33, 64, 65, 129)] == \
        [(64, 4, 64, 4), (64, 4, 64, 4), None, (128, 2, 128, 3), (128, 2, 128, 3), None, None]            # row buckets 16 / 32 / 64 / 128
    assert [t.lt_algo(4096, 14336, m) is not None for m in (1, 32, 33, 64, 65, 129, 256, 257, 8192, 8193)] == \
        [False, False, True, True, False, True, True, False, False, False]   # row buckets 16 / 32 / ... / 8192
    assert t.lt_algo(4096, 14336, 200) == list(range(8)) and t.lt_algo(4096, 4096, 64) is None
    assert [t.stream_choice(6144, 4096, m) for m in (1, 2, 3, 4, 5)] == [(8, 192, 1), None, (16, 128, 1), None, None]
    assert t.stream_choice(4096, 4096, 1) is None
    assert [t.tma_choice(28672, 4096, m) for m in (1, 8, 9, 33, 64, 65, 129)] == \
        [(2, 4, 6), (2, 4, 6), None, (1, 1, 6), (1, 1, 6), None, None]   # row buckets 8 / 16 / 32 / 64 / 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_build_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(EngineMismatchError, match="needs a CUDA GPU"):
        build_engine(tmp_path / "shard", tmp_path / "engines")


def _mesh_rank(rank: int, init: str, envs: list[dict], out: str) -> None:
    from workers.build import check_mesh
    from workers.dist import DistContext

    ctx = DistContext.init(rank, 2, 2, 1, init, "gloo", timeout_s=60)
    try:
        check_mesh(envs[rank], ctx)
        msg = "ok"
    except EngineMismatchError as e:
        msg = str(e)
    finally:
        ctx.close()
    with open(f"{out}.{rank}", "w") as f:
        f.write(msg)


@pytest.mark.parametrize("differ", [False, True])
def test_ranks_refuse_a_mixed_mesh(tmp_path, differ):
    """Two gloo ranks exchange their stacks at start-up; a differing GPU makes every rank refuse."""
    import torch.multiprocessing as mp

    from workers.dist import free_port

    envs = [ENV, dict(ENV, gpu_name="NVIDIA A100-SXM4-80GB") if differ else ENV]
    out = str(tmp_path / "mesh")
    mp.spawn(_mesh_rank, args=(f"tcp://127.0.0.1:{free_port()}", envs, out), nprocs=2, join=True)
    msgs = [open(f"{out}.{r}").read() for r in range(2)]
    if differ:
        for m in msgs:
            assert m.startswith("mixed mesh refused: gpu_name: rank 0 has 'NVIDIA H100 80GB HBM3', "
                                "rank 1 has 'NVIDIA A100-SXM4-80GB'")
    else:
        assert msgs == ["ok", "ok"]


def _topology(tmp_path, tp: int = 1) -> str:
    from workers.models.tiny import write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=2, seed=3)
    topo = tmp_path / "t.yaml"
    topo.write_text(f"name: b\nmodel: {{path: {model}, dtype: bfloat16}}\nparallelism: {{tensor: {tp}}}\n"
                    f"build: {{artifacts: {tmp_path / 'art'}}}\n")
    return str(topo)


def test_orch_build_needs_converted_shards(tmp_path, capsys):
    from orchestrator.cli import main

    topo = _topology(tmp_path, tp=2)
    assert main(["build", topo]) == 2
    err = capsys.readouterr().err
    assert "0 of 2 converted shards found" in err and f"run `orch convert {topo}` first" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_orch_build_without_gpu_says_so(tmp_path, capsys):
    from orchestrator.cli import main

    topo = _topology(tmp_path)
    assert main(["convert", topo, "--json"]) == 0
    capsys.readouterr()
    assert main(["build", topo]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
