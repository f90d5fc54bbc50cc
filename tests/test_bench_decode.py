"""The decode benchmark's transformers baseline, run small on the CPU (the benchmark itself needs a GPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from workers.models.tiny import tiny_config


def _bench_decode():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("attention,key", [("sdpa", "hf_eager_bs2_tok_s"), ("eager", "hf_eager_eagerattn_bs2_tok_s")])
def test_transformers_baseline_times_the_asked_attention(attention, key):
    bd = _bench_decode()
    cfg = tiny_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    out = bd.bench_hf(batches=(2,), isl=8, new_tokens=4, reps=2, attention=attention, config=cfg, device="cpu")
    assert set(out) == {key, f"{key}_min", f"{key}_max"}
    assert 0 < out[f"{key}_min"] <= out[key] <= out[f"{key}_max"]


def test_workload_warm_up_leaves_the_timed_run_unchanged(tmp_path):
    """run_workload's untimed warm-up prefill writes the blocks the timed prefill then overwrites: the
    greedy tokens and the counts come out as without it (CPU engine, lockstep)."""
    from tests.engine_harness import make_hf_model
    from workers.convert import convert_checkpoint
    from workers.engine import Engine

    bd = _bench_decode()
    make_hf_model(tmp_path / "hf", "llama_gqa_rope3")
    shard = convert_checkpoint(tmp_path / "hf", tmp_path / "shards", 1, 1, "float32", progress=False)[0]
    batch, isl, osl = 3, 20, 6
    per_seq = -(-(isl + osl) // bd.BLOCK_SIZE)
    runs = []
    for warm in (False, True):
        engine = Engine(shard, device="cpu", num_kv_blocks=batch * per_seq, block_size=bd.BLOCK_SIZE)
        # prefill_tokens=32: the warm-up step holds one prompt, the timed prefill takes two steps
        runs.append(bd.run_workload(engine, batch, isl, osl, budget_s=60, prefill_tokens=32, ahead=False, warm=warm))
    cold, warm = runs
    assert warm["last_tokens"] == cold["last_tokens"]
    # the first decode step is untimed: osl - 2 timed steps; tokens counted: the timed steps' plus one each
    assert warm["decode_steps"] == cold["decode_steps"] == osl - 2 and warm["osl_run"] == osl
    assert warm["output_tokens"] == batch * (osl - 1)
    assert len(warm["last_tokens"]) == batch and all(0 <= t < 512 for t in warm["last_tokens"])
