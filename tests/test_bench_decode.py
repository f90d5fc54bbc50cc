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
