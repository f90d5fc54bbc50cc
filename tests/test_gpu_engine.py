"""The GPU engine (CUDA kernels, CUDA-graph decode, built engine directories) against the CPU reference
engine on small random models; engine build caching and mismatch errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
pytest.importorskip("cupy")

from orchestrator.errors import EngineMismatchError  # noqa: E402
from tests.engine_harness import MODELS, make_hf_model, run_scenario  # noqa: E402
from workers.engine import Engine, SeqChunk, StepInput  # noqa: E402

BLOCKS, BS = 64, 4


def _shards(tmp_path_factory, name: str, dtype: str):
    from workers.convert import convert_checkpoint

    d = tmp_path_factory.mktemp(f"{name}-{dtype}")
    make_hf_model(d / "hf", name)
    return convert_checkpoint(d / "hf", d / "shards", 1, 1, dtype, progress=False)[0]


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    return {(name, dt): _shards(tmp_path_factory, name, dt) for name in MODELS for dt in ("float32", "bfloat16")}


def _vocab(shard) -> int:
    return json.loads((shard / "manifest.json").read_text())["model_config"]["vocab_size"]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("graphs", [True, False])
def test_fp32_greedy_tokens_equal_cpu_reference(shard_dirs, name, graphs):
    shard = shard_dirs[(name, "float32")]
    cpu = run_scenario(Engine(shard, device="cpu", num_kv_blocks=BLOCKS, block_size=BS), _vocab(shard))
    eng = Engine(shard, device="cuda", num_kv_blocks=BLOCKS, block_size=BS, cuda_graphs=graphs)
    gpu = run_scenario(eng, _vocab(shard))
    assert gpu["generated"] == cpu["generated"]
    for a, b in zip(gpu["logits"], cpu["logits"]):
        assert ((a.cpu() - b).norm() / b.norm()).item() < 1e-4
    if graphs:
        assert eng.decode_graphs.graphs, "decode steps did not run under CUDA graphs"


def _compare_until_divergence(gpu: dict, cpu: dict) -> tuple[float, int]:
    """Worst relative logits error over rows fed the same tokens (up to each sequence's first differing token)."""
    worst, rows = 0.0, 0
    for ga, ca, la, lb in zip(gpu["generated"], cpu["generated"], gpu["logits"], cpu["logits"]):
        for i in range(len(ca)):
            a, b = la[i].cpu().float(), lb[i].float()
            worst = max(worst, ((a - b).norm() / b.norm()).item())
            rows += 1
            if ga[i] != ca[i]:
                break
    return worst, rows


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_logits_close_to_cpu_reference(shard_dirs, name):
    shard = shard_dirs[(name, "bfloat16")]
    cpu = run_scenario(Engine(shard, device="cpu", num_kv_blocks=BLOCKS, block_size=BS), _vocab(shard))
    gpu = run_scenario(Engine(shard, device="cuda", num_kv_blocks=BLOCKS, block_size=BS), _vocab(shard))
    worst, rows = _compare_until_divergence(gpu, cpu)
    assert rows >= 20 and worst < 3e-2, (worst, rows)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_engine_on_stream_gemv_close_to_cpu_reference(shard_dirs, tmp_path, monkeypatch, name):
    """An engine whose tuning table sends every weight shape at 1-4 rows to stream_gemv (decode steps under
    CUDA graphs and eager ones) against the CPU reference, as the bf16 test above."""
    from workers.build import build_engine
    from workers.kernels import stream_gemv as sg
    from workers.kernels import tuning
    from workers.kernels.autotune import linear_shapes

    if not sg.available():
        pytest.skip("stream_gemv runs on sm_90+ GPUs only")
    shard = shard_dirs[(name, "bfloat16")]
    eng_dir = build_engine(shard, tmp_path / "engines", tune=False)
    shapes = linear_shapes(json.loads((shard / "manifest.json").read_text())["model_config"], 1)
    table = tuning.Tuning(stream={f"{n}x{k}": {m: [4, 128, 1] for m in range(1, 5)} for n, k in shapes.values()})
    (eng_dir / "tuning.json").write_text(json.dumps(table.to_dict()))
    calls = []
    real = sg.stream_gemv
    monkeypatch.setattr(sg, "stream_gemv", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    try:
        cpu = run_scenario(Engine(shard, device="cpu", num_kv_blocks=BLOCKS, block_size=BS), _vocab(shard))
        eng = Engine(eng_dir, device="cuda", num_kv_blocks=BLOCKS, block_size=BS)
        assert tuning.CURRENT.stream == table.stream
        gpu = run_scenario(eng, _vocab(shard))
    finally:
        tuning.set_current(tuning.Tuning())
    assert set(calls) >= {1, 2} and eng.decode_graphs.graphs
    worst, rows = _compare_until_divergence(gpu, cpu)
    assert rows >= 20 and worst < 3e-2, (worst, rows)


def test_graph_decode_pads_batches_without_touching_other_slots(shard_dirs):
    """A decode batch of 3 runs in the bucket of 4: the padding row must not write the KV cache."""
    shard = shard_dirs[("llama_gqa_rope3", "float32")]
    eng = Engine(shard, device="cuda", num_kv_blocks=BLOCKS, block_size=BS)
    chunks = [SeqChunk(i, [5 + i, 6, 7], 0, [3 * i, 3 * i + 1]) for i in range(3)]
    eng.step(StepInput(chunks))
    before = [k.clone() for k, _ in eng.kv_caches]
    out = eng.step(StepInput([SeqChunk(i, [9], 3, [3 * i, 3 * i + 1]) for i in range(3)]))
    assert out.shape[0] == 3 and 4 in eng.decode_graphs.graphs
    for (k, _), k0 in zip(eng.kv_caches, before):
        changed = (k != k0).flatten(2).any(-1)        # [blocks, block_size] slots that changed
        assert changed.nonzero().tolist() == [[0, 3], [3, 3], [6, 3]]


def test_engine_build_cache_and_mismatch(shard_dirs, tmp_path):
    from workers.build import ENGINE_MANIFEST, build_engine

    shard = shard_dirs[("llama_gqa_rope3", "bfloat16")]
    eng_dir = build_engine(shard, tmp_path / "engines")
    assert (eng_dir / "tuning.json").is_file() and list((eng_dir / "kernels").glob("*.cubin"))
    t0 = time.perf_counter()
    assert build_engine(shard, tmp_path / "engines") == eng_dir
    assert time.perf_counter() - t0 < 5
    gpu = run_scenario(Engine(eng_dir, device="cuda", num_kv_blocks=BLOCKS, block_size=BS), _vocab(shard))
    plain = run_scenario(Engine(shard, device="cuda", num_kv_blocks=BLOCKS, block_size=BS), _vocab(shard))
    assert gpu["generated"] == plain["generated"]
    m = json.loads((eng_dir / ENGINE_MANIFEST).read_text())
    m["gpu_name"], m["cupy"] = "NVIDIA B200", "0.0.1"
    (eng_dir / ENGINE_MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError) as e:
        Engine(eng_dir, device="cuda", num_kv_blocks=BLOCKS, block_size=BS)
    msg = str(e.value)
    assert "gpu_name: built for 'NVIDIA B200'" in msg and "cupy: built for '0.0.1'" in msg and "orch build" in msg
    assert "arch" not in msg.split("(")[1].split(")")[0]   # only what differs is named
    assert build_engine(shard, tmp_path / "engines", force=True) == eng_dir  # a rebuild fixes it
    Engine(eng_dir, device="cuda", num_kv_blocks=BLOCKS, block_size=BS)


def test_orch_build_command(tmp_path, capsys):
    from orchestrator.cli import main
    from workers.models.tiny import write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=2, seed=5)
    topo = tmp_path / "t.yaml"
    topo.write_text(f"name: b\nmodel: {{path: {model}, dtype: bfloat16}}\nparallelism: {{tensor: 2}}\n"
                    f"build: {{artifacts: {tmp_path / 'art'}}}\n")
    assert main(["convert", str(topo), "--json"]) == 0
    capsys.readouterr()
    assert main(["build", str(topo), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["engines"]) == 2
    for e in first["engines"]:
        assert (Path(e["engine"]) / "engine.json").is_file()
    assert main(["build", str(topo)]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("graphs", [True, False])
def test_scheduler_running_ahead_on_the_gpu_gives_the_lockstep_tokens(shard_dirs, graphs):
    """Decode steps launched ahead (their input tokens the previous step's argmax, still on the GPU)
    generate exactly what lockstep steps generate, through CUDA graphs and eagerly."""
    from workers.block_manager import BlockManager
    from workers.sampling import SamplingParams
    from workers.scheduler import Scheduler, SchedulerConfig
    from workers.sequence import Sequence

    shard = shard_dirs[("qwen2_bias", "float32")]
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, _vocab(shard), (n,), generator=gen).tolist() for n in (3, 11, 6)]
    eng = Engine(shard, device="cuda", num_kv_blocks=BLOCKS, block_size=BS, cuda_graphs=graphs)
    results = []
    for ahead in (False, True):
        sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_seq_len=64, run_ahead=ahead),
                          BlockManager(BLOCKS, BS))
        for i, p in enumerate(prompts):
            sched.add(Sequence(i, list(p), SamplingParams(max_tokens=8 + 4 * i, ignore_eos=True)))
        launched, got = [], {}

        def run(step):
            launched.append(step.input_ids is not None)
            return eng.step(step)

        while sched.has_work():
            for o in sched.step(run):
                got.setdefault(o.seq_id, []).extend(o.token_ids)
        results.append(got)
        assert sum(launched) >= 10 if ahead else not any(launched)
    assert results[0] == results[1] and [len(results[1][i]) for i in range(3)] == [8, 12, 16]
