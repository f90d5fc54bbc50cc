"""Decode benchmark on the GPU: Llama-3.1-8B shape, random bf16 weights, through the real engine path
(shard on disk -> `build_engine` -> `Engine(engine_dir, device="cuda")` -> `engine.step`).

Measures, in one run: device copy bandwidth; engine build time (fresh and cached); batch-1 decode
tokens/s and its ratio to the HBM roofline (bytes read per step / copy bandwidth); output throughput
for ISL/OSL pairs at several batch sizes; Hugging Face transformers generate (eager, no compile) as
the baseline. Writes {"name","date","device","command","metrics":{...},"notes":[...]} to --out.

    python benchmarks/bench_decode.py --out results.json [--sections copy,build,bs1,throughput,hf]
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_decode")

LLAMA31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
WORKLOADS = [(128, 128), (128, 2048), (2048, 128), (2048, 2048)]
BATCHES = [1, 64, 256]
BLOCK_SIZE = 16


def config_dict() -> dict:
    """The HF config.json dict of the benchmark model."""
    from workers.models.tiny import tiny_config

    return tiny_config("llama", **LLAMA31_8B)


def copy_bandwidth_gbs(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (median)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / sorted(times)[len(times) // 2] / 1e9


def write_random_shard(out: Path, seed: int = 0, tp: int = 1, tp_rank: int = 0) -> Path:
    """Tensor-parallel rank tp_rank of tp (pp 1) of the benchmark model, random bf16 weights generated
    on the current GPU."""
    from workers.convert import FORMAT, FORMAT_VERSION, CONVERTER_VERSION, MANIFEST, WEIGHTS, content_hash
    from workers.convert import get_transform, plan_shard
    from workers.models.config import parse_model_config

    cfg = parse_model_config(config_dict())
    plan = plan_shard(cfg, tp, 1, tp_rank, 0, get_transform("none", torch.bfloat16))
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {}
    with open(out / WEIGHTS, "wb") as f:
        f.write(plan.header)
        for o in plan.outputs:
            if o.name.endswith("norm.weight"):
                t = 1 + 0.05 * torch.randn(o.shape, device="cuda", generator=gen)
            else:
                t = torch.randn(o.shape, device="cuda", generator=gen) * o.shape[-1] ** -0.5
            f.write(t.to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes())
            tensors[o.name] = {"shape": list(o.shape), "dtype": "bfloat16",
                               "sha256": hashlib.sha256(f"random seed {seed} {o.name}".encode()).hexdigest()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "converter_version": CONVERTER_VERSION,
                "model_config": cfg.to_dict(), "tp_size": tp, "pp_size": 1, "tp_rank": tp_rank, "pp_rank": 0,
                "layer_start": 0, "layer_stop": cfg.num_layers, "dtype": "bfloat16", "quantization": "none",
                "source_files": {"random-weights": f"seed {seed}"}, "tensors": tensors,
                "content_hash": content_hash(plan.header, tensors)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


# --- our engine ----------------------------------------------------------------------------------------

def load_engine(engine_dir: Path, kv_reserve_gb: float = 6.0):
    """Engine over the built directory with as many 16-token KV blocks as fit after the weights."""
    from workers.engine import Engine, kv_block_bytes_for
    from workers.models.config import parse_model_config

    cfg = parse_model_config(config_dict())
    free, _ = torch.cuda.mem_get_info()
    weights = cfg.num_params() * 2
    block = kv_block_bytes_for(cfg, 1, 1, BLOCK_SIZE, "bfloat16")
    blocks = int((free - weights - kv_reserve_gb * 1e9) // block)
    return Engine(engine_dir, device="cuda", num_kv_blocks=blocks, block_size=BLOCK_SIZE)


def synchronizer(device: str | torch.device):
    """A call that waits for `device`'s queued work: torch.cuda.synchronize on a GPU, nothing on the CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def run_workload(engine, batch: int, isl: int, osl: int, budget_s: float, prefill_tokens: int = 8192,
                 seed: int = 0, ahead: bool = True, warm: bool = True) -> dict:
    """Prefill `batch` prompts of isl tokens (chunked), then greedy-decode; stops decoding when the
    time budget is spent. The first decode step is left out of the timing and of the token count
    (it may capture a CUDA graph). `warm`: one untimed prefill step of the timed run's first step's
    shape runs before it (the first prefill of a shape in a process is slower: the transformers
    baseline is timed warm too). `ahead`: each decode step is launched before the previous one's
    tokens are read back (its inputs are that step's argmax on the device, as the scheduler runs
    ahead; needs a GPU); else lockstep. Either way every step's tokens are read back. Returns timings,
    the tokens counted and each sequence's last token."""
    from workers.engine import SeqChunk, StepInput

    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    per_seq = -(-(isl + osl) // BLOCK_SIZE)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    prompts = torch.randint(0, vocab, (batch, isl), generator=g).tolist()
    sync = synchronizer(engine.device)
    if warm:   # its K/V go to the blocks the timed prefill then overwrites
        n, size = min(batch, max(1, prefill_tokens // isl)), min(isl, prefill_tokens)
        engine.step(StepInput([SeqChunk(i, prompts[i][:size], 0, tables[i], size == isl) for i in range(n)]))
    sync()
    t0 = time.perf_counter()
    last = [0] * batch
    done = [0] * batch
    while min(done) < isl:     # prefill in steps of <= prefill_tokens tokens
        chunks, room = [], prefill_tokens
        for i in range(batch):
            if done[i] < isl and room > 0:
                n = min(isl - done[i], room)
                chunks.append(SeqChunk(i, prompts[i][done[i]:done[i] + n], done[i], tables[i], done[i] + n == isl))
                room -= n
        out = engine.step(StepInput(chunks)).argmax(-1).tolist()
        rows = iter(out)
        for c in chunks:
            done[c.seq_id] += len(c.token_ids)
            if c.want_logits:
                last[c.seq_id] = next(rows)
    t_prefill = time.perf_counter() - t0
    ids = None
    if osl > 1:   # first decode step untimed: it may capture the bucket's CUDA graph (one-off, ~0.1-1 s)
        chunks = [SeqChunk(i, [last[i]], isl, tables[i]) for i in range(batch)]
        ids = engine.step(StepInput(chunks)).argmax(-1)
        last = ids.tolist()
    steps = 1 if osl > 1 else 0
    t1 = time.perf_counter()
    host = torch.empty(batch, dtype=torch.int64, pin_memory=True) if ahead else None
    for step in range(1, osl - 1):
        if ahead:   # copy step-1's tokens back in stream order, launch this step on them, then read them
            host.copy_(ids, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            chunks = [SeqChunk(i, [0], isl + step, tables[i]) for i in range(batch)]
            ids = engine.step(StepInput(chunks, input_ids=ids)).argmax(-1)
            copied.synchronize()
            last = host.tolist()
        else:
            chunks = [SeqChunk(i, [last[i]], isl + step, tables[i]) for i in range(batch)]
            last = engine.step(StepInput(chunks)).argmax(-1).tolist()
        steps += 1
        if time.perf_counter() - t1 > budget_s:
            break
    t_decode = time.perf_counter() - t1
    timed = max(0, steps - 1)
    return {"prefill_s": t_prefill, "decode_s": t_decode, "decode_steps": timed, "osl_run": steps + 1,
            "output_tokens": batch * (timed + 1), "last_tokens": last}


def max_batch_for(engine, isl: int, osl: int, want: int) -> int:
    """The largest batch <= want whose KV cache fits the engine's blocks."""
    per_seq = -(-(isl + osl) // BLOCK_SIZE)
    return max(1, min(want, engine.num_kv_blocks // per_seq))


def decode_step_bytes(engine, ctx: int) -> int:
    """Bytes a batch-1 decode step must read: every weight once (one embedding row) plus the KV cache."""
    cfg = engine.model_config
    w = sum(t.numel() * t.element_size() for t in engine.model.w.values())
    emb = engine.model.w["embed_tokens.weight"]
    w -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    kv = ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * emb.element_size()
    return w + kv


def replay_ms(engine, batch: int, reps: int = 20) -> float | None:
    """Median device time of one replay of the decode graph that served `batch` (last step's inputs)."""
    graphs = engine.decode_graphs
    if graphs is None:
        return None
    bucket = next((x for x in graphs.buckets if x >= batch), None)
    if bucket not in graphs.graphs:
        return None
    g = graphs.graphs[bucket][0]
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def _profile(run, path: Path, what: str) -> None:
    """Per-kernel device times of run() (run once before, PDL off: a kernel launched early would count its
    wait as its own time), written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    from workers.kernels import _nvrtc

    os.environ["ORCH_PDL"] = "0"
    _nvrtc._pdl_enabled.cache_clear()
    try:
        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
    finally:
        del os.environ["ORCH_PDL"]
        _nvrtc._pdl_enabled.cache_clear()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    path.write_text(table)
    log.info("profile of %s:\n%s", what, table)


def profile_step(engine, batch: int, path: Path) -> None:
    """Per-kernel device times of one eager decode step (the last step's inputs), written to `path`."""
    graphs = engine.decode_graphs
    bucket = next((x for x in graphs.buckets if x >= batch), None)
    _profile(lambda: graphs._forward(bucket), path, f"a batch-{batch} decode step")


def profile_prefill(engine, batch: int, isl: int, path: Path) -> None:
    """Per-kernel device times of one prefill step of `batch` prompts of `isl` random tokens."""
    from workers.engine import SeqChunk, StepInput

    per_seq = -(-isl // BLOCK_SIZE)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, engine.model_config.vocab_size, (batch, isl), generator=g).tolist()
    step = StepInput([SeqChunk(i, prompts[i], 0, list(range(i * per_seq, (i + 1) * per_seq)), True)
                      for i in range(batch)])
    _profile(lambda: engine.step(step), path, f"a {batch} x {isl} prefill step")


def bench_mixed(engine, out_dir: Path, batches=(64, 240), ctx: int = 192, reps: int = 8) -> dict:
    """Wall ms of one engine step: B decodes alone (CUDA graph), B decodes + prefill chunks of 128 tokens
    (1 or 14 chunks: what a serving step admits; these run eagerly), and the prefill chunks alone.
    Writes a per-kernel profile of the largest mixed step to out_dir/profile_mixed.txt."""
    from torch.profiler import ProfilerActivity, profile

    from workers.engine import SeqChunk, StepInput

    g = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    per_seq = -(-(ctx + 256) // BLOCK_SIZE)
    out: dict = {}
    for b in batches:
        n_pre = 14
        if (b + n_pre) * per_seq > engine.num_kv_blocks:
            continue
        table = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b + n_pre)]
        tok = torch.randint(0, vocab, (b + n_pre, ctx), generator=g).tolist()
        for i in range(0, b, 16):   # fill the decodes' context
            engine.step(StepInput([SeqChunk(j, tok[j], 0, table[j], True) for j in range(i, min(b, i + 16))]))
        decodes = [SeqChunk(j, [tok[j][-1]], ctx, table[j]) for j in range(b)]
        prefills = [SeqChunk(b + k, tok[b + k][:128], 0, table[b + k]) for k in range(n_pre)]

        def wall(chunks) -> float:
            engine.step(StepInput(chunks)).argmax(-1).tolist()   # warm (captures a graph if it is one)
            torch.cuda.synchronize()
            t = []
            for _ in range(reps):
                t0 = time.perf_counter()
                engine.step(StepInput(chunks)).argmax(-1).tolist()
                t.append(time.perf_counter() - t0)
            return round(1e3 * sorted(t)[len(t) // 2], 3)

        out[f"mixed_bs{b}_decode_only_ms"] = wall(decodes)
        out[f"mixed_bs{b}_decode_plus_1x128_ms"] = wall(decodes + prefills[:1])
        out[f"mixed_bs{b}_decode_plus_14x128_ms"] = wall(decodes + prefills)
        out["mixed_prefill_1x128_ms"] = wall(prefills[:1])
        out["mixed_prefill_14x128_ms"] = wall(prefills)
        log.info("mixed steps, batch %d: %s", b, {k: v for k, v in out.items() if f"bs{b}_" in k or "prefill_" in k})
        if b == max(batches):
            engine.step(StepInput(decodes + prefills[:1]))
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step(StepInput(decodes + prefills[:1])).argmax(-1).tolist()
                torch.cuda.synchronize()
            table_txt = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            (out_dir / "profile_mixed.txt").write_text(table_txt)
            log.info("profile of a mixed step (batch %d + 1 x 128):\n%s", b, table_txt)
    return out


def bench_bs1(engine, copy_gbs: float, isl: int = 128, steps: int = 512) -> dict:
    """Batch-1 decode tokens/s (wall clock through engine.step, each step launched ahead of reading the
    last one's token) and the roofline ratio; the same in lockstep alongside."""
    lock = run_workload(engine, 1, isl, steps + 1, budget_s=120, ahead=False)
    r = run_workload(engine, 1, isl, steps + 1, budget_s=120)
    tok_s = r["decode_steps"] / r["decode_s"]
    bytes_step = decode_step_bytes(engine, isl + r["decode_steps"] // 2)
    roof = copy_gbs * 1e9 / bytes_step
    graph_ms = replay_ms(engine, 1, reps=50)
    return {"decode_bs1_tok_s": round(tok_s, 2), "decode_bs1_roofline_tok_s": round(roof, 2),
            "decode_bs1_lockstep_tok_s": round(lock["decode_steps"] / lock["decode_s"], 2),
            "decode_bs1_roofline_ratio": round(tok_s / roof, 4), "decode_bs1_step_bytes": bytes_step,
            "decode_bs1_graph_replay_ms": None if graph_ms is None else round(graph_ms, 4),
            "decode_bs1_graph_only_roofline_ratio": None if graph_ms is None else
            round(bytes_step / (graph_ms / 1e3) / (copy_gbs * 1e9), 4)}


def bench_throughput(engine, workloads, batches, budget_s: float,
                     lockstep_too: bool = False) -> tuple[dict, list[str]]:
    """Output tokens/s (prefill included) per ISL/OSL and batch size (decode steps run ahead); with
    `lockstep_too`, each point also in lockstep, run first."""
    metrics, notes = {}, []
    for isl, osl in workloads:
        for want in batches:
            b = max_batch_for(engine, isl, osl, want)
            if lockstep_too:
                r = run_workload(engine, b, isl, osl, budget_s, ahead=False)
                metrics[f"throughput_isl{isl}_osl{osl}_bs{b}_lockstep_tok_s"] = round(
                    r["output_tokens"] / (r["prefill_s"] + r["decode_s"]), 1)
            r = run_workload(engine, b, isl, osl, budget_s)
            tput = r["output_tokens"] / (r["prefill_s"] + r["decode_s"])
            key = f"throughput_isl{isl}_osl{osl}_bs{b}"
            metrics[key + "_tok_s"] = round(tput, 1)
            metrics[key + "_decode_tok_s"] = round(b * r["decode_steps"] / r["decode_s"], 1)
            metrics[key + "_prefill_s"] = round(r["prefill_s"], 3)
            metrics[key + "_decode_step_wall_ms"] = round(1e3 * r["decode_s"] / max(1, r["decode_steps"]), 3)
            graph_ms = replay_ms(engine, b)
            if graph_ms is not None:
                metrics[key + "_decode_step_graph_ms"] = round(graph_ms, 3)
            if b != want:
                notes.append(f"{key}: batch {want} does not fit the KV cache ({engine.num_kv_blocks} blocks of "
                             f"{BLOCK_SIZE}); ran batch {b}")
            if r["osl_run"] < osl:
                metrics[key + "_osl_run"] = r["osl_run"]
                notes.append(f"{key}: decode stopped after {r['osl_run']} of {osl} output tokens "
                             f"({budget_s:.0f} s budget per run); throughput is over the tokens produced")
            log.info("%s: %.1f tok/s (%s)", key, tput, {k: v for k, v in r.items() if k != "last_tokens"})
    return metrics, notes


# --- transformers baseline ------------------------------------------------------------------------------

def hf_metric(attention: str, batch: int) -> str:
    """Metric name of transformers' tokens/s at `batch` with attention implementation `attention` (sdpa,
    transformers' default, keeps the name the earlier results use)."""
    return f"hf_eager_bs{batch}_tok_s" if attention == "sdpa" else f"hf_eager_{attention}attn_bs{batch}_tok_s"


def bench_hf(batches=(1, 64), isl: int = 128, new_tokens: int = 128, reps: int = 3, attention: str = "sdpa",
             config: dict | None = None, device: str = "cuda") -> dict:
    """transformers generate, eager (no torch.compile), bf16, random weights: output tokens/s, the median
    of `reps` timed runs (it is bound by the host's kernel launches, and varies from run to run).
    `attention`: transformers' attention implementation (sdpa, its default, or eager: plain torch ops);
    `config` (default: the benchmark's 8B shape) and `device` let a test run it small on the CPU."""
    import transformers

    conf = config or config_dict()
    cfg = transformers.LlamaConfig(**{k: v for k, v in conf.items() if k != "architectures"},
                                   attn_implementation=attention)
    on_gpu = torch.device(device).type == "cuda"
    sync = synchronizer(device)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    out = {}
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, isl), device=device)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
        runs = []
        with torch.no_grad():
            model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})   # warm-up
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                sync()
                runs.append(b * new_tokens / (time.perf_counter() - t0))
        runs.sort()
        key = hf_metric(attention, b)
        out[key] = round(runs[len(runs) // 2], 2)
        out[f"{key}_min"], out[f"{key}_max"] = round(runs[0], 2), round(runs[-1], 2)
        log.info("transformers (%s attention) batch %d: %s tok/s (runs %s)", attention, b, out[key],
                 [round(r) for r in runs])
    del model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--name", default="decode_8b")
    p.add_argument("--work", default="/tmp/bench_decode", help="scratch dir for the random shard and engines")
    p.add_argument("--sections", default="copy,build,bs1,throughput,hf")
    p.add_argument("--workloads", default=",".join(f"{i}/{o}" for i, o in WORKLOADS))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--lockstep-too", action="store_true", help="throughput also in lockstep (A/B of running ahead)")
    p.add_argument("--budget-s", type=float, default=30.0, help="decode seconds per throughput run at most")
    p.add_argument("--hf-new-tokens", type=int, default=128, help="transformers' output length (ISL 128)")
    p.add_argument("--hf-attention", default="sdpa",
                   help="transformers' attention implementations to time, comma-separated: sdpa (its default; "
                        "the speedup metric's baseline) and/or eager (plain torch ops)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sections = set(args.sections.split(","))
    metrics: dict = {}
    notes: list[str] = []
    t_all = time.perf_counter()
    metrics["copy_bandwidth_gb_s"] = round(copy_bandwidth_gbs(), 1)
    if "hf" in sections:
        for attention in args.hf_attention.split(","):
            metrics.update(bench_hf(new_tokens=args.hf_new_tokens, attention=attention))
            notes.append(f"transformers ({hf_metric(attention, 64)}): generate() with {attention} attention, no "
                         f"torch.compile, ISL 128, {args.hf_new_tokens} new tokens, prefill included, median of 3 "
                         f"timed runs (min/max alongside)")
    work = Path(args.work)
    shard = work / "shard"
    if not (shard / "manifest.json").is_file():
        t0 = time.perf_counter()
        write_random_shard(shard)
        metrics["write_random_shard_s"] = round(time.perf_counter() - t0, 2)
    from workers.build import build_engine

    if "build" in sections:
        shutil.rmtree(work / "engines", ignore_errors=True)
    t0 = time.perf_counter()
    engine_dir = build_engine(shard, work / "engines")
    # a fresh build only with the "build" section (else an engine left by an earlier run may be reused)
    metrics["build_8b_s" if "build" in sections else "build_8b_maybe_cached_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    build_engine(shard, work / "engines")
    metrics["build_8b_cached_s"] = round(time.perf_counter() - t0, 3)
    metrics["tuning"] = json.loads((engine_dir / "tuning.json").read_text())
    t0 = time.perf_counter()
    engine = load_engine(engine_dir)
    metrics["engine_load_s"] = round(time.perf_counter() - t0, 2)
    metrics["kv_blocks"] = engine.num_kv_blocks
    if "bs1" in sections:
        metrics.update(bench_bs1(engine, metrics["copy_bandwidth_gb_s"]))
        log.info("batch 1: %s", {k: v for k, v in metrics.items() if k.startswith("decode_bs1")})
    if "profile" in sections:
        for b in (1, 64):
            run_workload(engine, b, 128, 4, budget_s=10)
            profile_step(engine, b, Path(args.out).parent / f"profile_bs{b}.txt")
        profile_prefill(engine, 64, 128, Path(args.out).parent / "profile_prefill_64x128.txt")
    if "mixed" in sections:
        metrics.update(bench_mixed(engine, Path(args.out).parent))
    if "throughput" in sections:
        wl = [tuple(int(v) for v in s.split("/")) for s in args.workloads.split(",") if s]
        m, n = bench_throughput(engine, wl, [int(b) for b in args.batches.split(",")], args.budget_s,
                                args.lockstep_too)
        metrics.update(m)
        notes += n
    hf64 = metrics.get("hf_eager_bs64_tok_s")
    ours64 = metrics.get("throughput_isl128_osl128_bs64_tok_s")
    if hf64 and ours64:
        metrics["speedup_bs64_isl128_osl128_vs_hf_x"] = round(ours64 / hf64, 2)
    hf64_eager = metrics.get(hf_metric("eager", 64))
    if hf64_eager and ours64:
        metrics["speedup_bs64_isl128_osl128_vs_hf_eagerattn_x"] = round(ours64 / hf64_eager, 2)
    metrics["total_s"] = round(time.perf_counter() - t_all, 1)
    result = {"name": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(), "command": " ".join(["python", *sys.argv]),
              "metrics": metrics, "notes": notes}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
