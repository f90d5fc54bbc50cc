"""Benchmark serving: throughput and latency of `orch serve` against the engine's own speed at the same batch.

For each ISL/OSL of --grid and each --concurrency, `orch bench` (the orch.v1 protocol, greedy,
ignore_eos) measures the served output tok/s and TTFT/TPOT/ITL/E2E; the engine alone (scheduler +
engine + sampling in one process: no gRPC, no detokenization, the same requests in the same closed
loop at the same concurrency, after the same warm-up) gives the baseline, and served / engine is the
overhead ratio (goal >= 0.95).

    # everything: (generate an 8B-shape random bf16 checkpoint,) convert, engine baseline, serve, bench
    python benchmarks/bench_serving.py run --generate-8b --name serving-8b-h100
    python benchmarks/bench_serving.py run --model ../models/llama-3.1-8b --name serving-8b-h100
    # the grid in parts (shorter commands), all into one results file
    python benchmarks/bench_serving.py run --generate-8b --name serving-8b-h100 --grid 2048/128 --merge
    # a server that is already up (e.g. `orch apply configs/single-gpu.yaml`), with an earlier baseline
    python benchmarks/bench_serving.py engine --shards DIR --name serving-8b-h100-engine
    python benchmarks/bench_serving.py client --endpoint localhost:50051 --name serving-8b-h100 \\
        --engine-results benchmarks/results/serving-8b-h100-engine.json

Writes benchmarks/results/<name>.json as {"name", "date", "device", "command", "metrics"} (metric names
carry their unit: isl128_osl128_c64_output_throughput_tok_per_s, ..._ttft_p99_ms,
..._served_over_engine_ratio) and one throughput-vs-latency PNG per ISL/OSL next to it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def parse_grid(spec: str) -> list[tuple[int, int]]:
    """'128/128,2048/128' -> [(128, 128), (2048, 128)]."""
    out = []
    for part in spec.split(","):
        isl, _, osl = part.partition("/")
        out.append((int(isl), int(osl)))
    return out


def point(isl: int, osl: int, c: int) -> str:
    """Metric-name prefix of one grid point."""
    return f"isl{isl}_osl{osl}_c{c}_"


def point_seed(seed: int, isl: int, osl: int, c: int) -> int:
    """A seed of its own per grid point: no point's prompts are in the server's prefix cache already."""
    return seed + 1_000_003 * isl + 1009 * osl + c


def requests_for(c: int, args: argparse.Namespace) -> int:
    """Measured requests at concurrency c (4 waves, at least --min-requests)."""
    return args.requests or max(args.min_requests, 4 * c)


def device_name(device: str) -> str:
    """A human name of the device the engine runs on."""
    import platform

    if device == "cuda":
        try:
            import torch

            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        except Exception:  # torch or CUDA missing here: the server still knows
            return "cuda"
    return f"CPU {platform.machine()} x{os.cpu_count()}"


# --- the engine alone ---------------------------------------------------------------------------------


def server_config(args: argparse.Namespace, shards: Path, port: int = 0):
    """The ServerConfig both the engine baseline and the server use."""
    from workers.server import ServerConfig

    return ServerConfig(shard_dir=shards, model_name=args.model_name, port=port, device=args.device,
                        max_num_seqs=args.max_num_seqs, max_seq_len=args.max_seq_len,
                        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                        kv_cache_fraction=args.kv_cache_fraction, num_kv_blocks=args.num_kv_blocks)


def engine_closed_loop(engine, info, prompts: list[list[int]], osl: int, concurrency: int) -> tuple[int, float]:
    """Run the prompts through scheduler + engine keeping `concurrency` in flight; (output tokens, seconds)."""
    from workers.sampling import SamplingParams
    from workers.sequence import Sequence
    from workers.serving import make_scheduler

    sched = make_scheduler(info, enable_prefix_caching=True)
    todo = list(enumerate(prompts))
    tokens = 0

    def admit() -> None:
        i, p = todo.pop(0)
        sched.add(Sequence(i + 1, list(p), SamplingParams(max_tokens=osl, ignore_eos=True)))

    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(todo))):
        admit()
    while sched.has_work():
        for o in sched.step(engine.step):
            tokens += len(o.token_ids)
            if o.finished and todo:
                admit()
    return tokens, time.perf_counter() - t0


def engine_baseline(args: argparse.Namespace, shards: Path) -> dict[str, float]:
    """Engine-alone output tok/s at every grid point, with the same prompts the client sends."""
    from orchestrator.bench import BenchConfig, Workload
    from workers.server import launch_engine

    engine, procs, info = launch_engine(server_config(args, shards))
    mc = info.model_config
    exclude = set(mc.eos_token_ids) | ({mc.bos_token_id} if mc.bos_token_id is not None else set())
    metrics: dict[str, float] = {}
    try:
        for isl, osl in parse_grid(args.grid):
            for c in args.concurrency:
                cfg = BenchConfig("engine:0", input_len=isl, output_len=osl, concurrency=c,
                                  seed=point_seed(args.seed, isl, osl, c))
                warm = Workload(cfg, mc.vocab_size, exclude, seed_offset=1_000_003).take(max(c, args.warmup))
                engine_closed_loop(engine, info, [r.prompt for r in warm], osl, c)
                reqs = Workload(cfg, mc.vocab_size, exclude).take(requests_for(c, args))
                tokens, secs = engine_closed_loop(engine, info, [r.prompt for r in reqs], osl, c)
                metrics[point(isl, osl, c) + "engine_output_throughput_tok_per_s"] = tokens / secs
                print(f"engine ISL {isl} OSL {osl} c {c}: {tokens / secs:.1f} tok/s", file=sys.stderr)
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown:
            shutdown()
        for p in procs:
            p.join(10)
    return metrics


# --- the served system ---------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, shards: Path) -> subprocess.Popen:
    """`orch serve` in its own process (so that the client never shares its interpreter)."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--shards", str(shards), "--port", str(args.port),
           "--device", args.device, "--model-name", args.model_name, "--max-num-seqs", str(args.max_num_seqs),
           "--max-seq-len", str(args.max_seq_len), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--block-size", str(args.block_size), "--kv-cache-fraction", str(args.kv_cache_fraction), "--no-metrics"]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    print("starting:", shlex.join(cmd), file=sys.stderr)
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True)


def wait_for_server(proc: subprocess.Popen, endpoint: str, timeout_s: float) -> None:
    """Block until the server accepts connections; exit if it dies or takes longer than timeout_s."""
    import grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(endpoint) as ch:
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server exited with status {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                stop_server(proc)
                sys.exit(f"the server was not ready after {timeout_s:.0f} s")
            try:
                grpc.channel_ready_future(ch).result(timeout=2.0)
                return
            except grpc.FutureTimeoutError:
                continue


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_endpoint(args: argparse.Namespace, endpoint: str, out_dir: Path) -> tuple[dict[str, float], list[str]]:
    """Served figures at every grid point, plus one sweep PNG per ISL/OSL."""
    from orchestrator.bench import BenchConfig, run_bench
    from orchestrator.bench_stats import plot_sweep, sweep_table

    metrics: dict[str, float] = {}
    pngs = []
    for isl, osl in parse_grid(args.grid):
        summaries = []
        for c in args.concurrency:
            cfg = BenchConfig(endpoint, input_len=isl, output_len=osl, concurrency=c,
                              num_requests=requests_for(c, args), warmup_requests=max(c, args.warmup),
                              seed=point_seed(args.seed, isl, osl, c), wait_ready_s=args.wait_ready,
                              processes=args.processes or max(1, math.ceil(c / 64)))
            s = run_bench(cfg).summary
            summaries.append(s)
            metrics.update(s.flat_metrics(point(isl, osl, c)))
            print(f"served ISL {isl} OSL {osl} c {c}: {s.output_throughput_tok_per_s:.1f} tok/s, "
                  f"TTFT p50 {s.ttft_ms.p50:.1f} ms, TPOT p50 {s.tpot_ms.p50:.2f} ms, errors {s.errors or 0}, "
                  f"length mismatches {s.output_len_mismatches}", file=sys.stderr)
        headers, rows = sweep_table("concurrency", summaries)
        print(f"\nISL {isl} / OSL {osl}\n" + "\n".join("  ".join(f"{v:>11}" for v in r) for r in [headers, *rows]),
              file=sys.stderr)
        try:
            pngs.append(str(plot_sweep("concurrency", summaries, out_dir / f"{args.name}-isl{isl}-osl{osl}.png",
                                       title=f"{args.name}: ISL {isl} / OSL {osl}")))
        except ImportError:
            print("matplotlib missing: no plot", file=sys.stderr)
    return metrics, pngs


def engine_metrics(path: Path) -> dict[str, float]:
    """The engine-alone throughputs of a results file written by the `engine` mode."""
    return {k: v for k, v in json.loads(path.read_text())["metrics"].items()
            if k.endswith("engine_output_throughput_tok_per_s")}


def add_ratios(metrics: dict[str, float]) -> None:
    """served / engine output throughput wherever both were measured."""
    for k in list(metrics):
        if k.endswith("_engine_output_throughput_tok_per_s"):
            base = k[: -len("engine_output_throughput_tok_per_s")]
            served = metrics.get(base + "output_throughput_tok_per_s")
            if served is not None and metrics[k]:
                metrics[base + "served_over_engine_ratio"] = served / metrics[k]


def write_results(args: argparse.Namespace, device: str, metrics: dict[str, float]) -> Path:
    """Write <results-dir>/<name>.json (with --merge, on top of the metrics already there)."""
    out = Path(args.results_dir) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.is_file():
        metrics = {**json.loads(out.read_text())["metrics"], **metrics}
    metrics = dict(sorted(metrics.items()))
    doc = {"name": args.name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "command": shlex.join([sys.executable, *sys.argv]), "metrics": metrics}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return out


# --- inputs ----------------------------------------------------------------------------------------------


def resolve_shards(args: argparse.Namespace) -> Path:
    """Converted tp1-pp1 shards: given, converted from --model, or from a generated 8B-shape checkpoint."""
    if args.shards:
        return Path(args.shards)
    from workers.convert import convert_checkpoint

    model = Path(args.model) if args.model else None
    if model is None:
        from bench_convert import write_checkpoint

        model = Path(args.workdir) / f"llama8b-shape-{args.layers}l"
        if not (model / "config.json").is_file():
            t = time.perf_counter()
            write_checkpoint(model, args.layers)
            print(f"generated {model} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    root = Path(args.workdir) / f"shards-{model.name}"
    convert_checkpoint(model, root, 1, 1, args.dtype)
    return root / "tp1-pp1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    modes = {"run": "baseline, then serve and bench", "engine": "engine baseline only",
             "client": "bench a running --endpoint"}
    r = sub.add_parser("ratios", help="merge --engine-results into <name>.json and recompute served/engine ratios")
    r.add_argument("--name", required=True)
    r.add_argument("--engine-results", required=True)
    r.add_argument("--results-dir", default=str(RESULTS))
    for mode, help_ in modes.items():
        p = sub.add_parser(mode, help=help_)
        p.add_argument("--name", required=True, help="results file name (benchmarks/results/<name>.json)")
        p.add_argument("--grid", default="128/128,2048/128", help="ISL/OSL pairs (default 128/128,2048/128)")
        p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 64, 256],
                       help="concurrency levels (default 1,8,64,256)")
        p.add_argument("--requests", type=int, help="measured requests per point (default max(--min-requests, 4c))")
        p.add_argument("--min-requests", type=int, default=32)
        p.add_argument("--warmup", type=int, default=16, help="warm-up requests per point (at least c; default 16)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--results-dir", default=str(RESULTS))
        p.add_argument("--merge", action="store_true", help="keep the metrics already in the results file "
                       "(run the grid in parts, e.g. one ISL/OSL per command)")
        if mode == "client":
            p.add_argument("--endpoint", required=True, help="HOST:PORT of a running orch server")
            p.add_argument("--engine-results", help="JSON written by the `engine` mode, for the ratios")
            p.add_argument("--device-name", default="", help="what the server runs on (for the results file)")
        else:
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--shards", help="converted shards (a tp1-pp1 directory)")
            src.add_argument("--model", help="a Hugging Face checkpoint directory to convert")
            src.add_argument("--generate-8b", action="store_true", help="generate a random Llama-3.1-8B-shape "
                             "checkpoint (with bench_convert.py's writer)")
            p.add_argument("--layers", type=int, default=32, help="layers of the generated checkpoint")
            p.add_argument("--dtype", default="bfloat16")
            p.add_argument("--workdir", default="/tmp/orch-bench-serving")
            p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
            p.add_argument("--model-name", default="bench")
            p.add_argument("--port", type=int, default=50051)
            p.add_argument("--max-num-seqs", type=int, default=256)
            p.add_argument("--max-seq-len", type=int, default=4096)
            p.add_argument("--max-num-batched-tokens", type=int, default=2048)
            p.add_argument("--block-size", type=int, default=16)
            p.add_argument("--kv-cache-fraction", type=float, default=0.9)
            p.add_argument("--num-kv-blocks", type=int, default=None)
        p.add_argument("--processes", type=int, default=0, help="client processes (default ceil(c / 64))")
        p.add_argument("--wait-ready", type=float, default=900.0, help="seconds to wait for the server")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))

    if args.mode == "ratios":
        out = Path(args.results_dir) / f"{args.name}.json"
        doc = json.loads(out.read_text())
        add_ratios(merged := {**doc["metrics"], **engine_metrics(Path(args.engine_results))})
        doc["metrics"] = dict(sorted(merged.items()))
        doc["engine_results"] = Path(args.engine_results).name
        out.write_text(json.dumps(doc, indent=1) + "\n")
        for k, v in sorted(merged.items()):
            if k.endswith("served_over_engine_ratio"):
                print(f"{k}: {v:.3f}", file=sys.stderr)
        return
    if args.mode == "client":
        metrics, _ = bench_endpoint(args, args.endpoint, Path(args.results_dir))
        if args.engine_results and Path(args.engine_results).is_file():
            metrics.update(engine_metrics(Path(args.engine_results)))
        add_ratios(metrics)
        write_results(args, args.device_name or "unknown (see the server)", metrics)
        return
    shards = resolve_shards(args)
    if args.mode == "engine":
        write_results(args, device_name(args.device), engine_baseline(args, shards))
        return
    # run: the baseline in a child process (frees the device), then the server in another
    engine_json = Path(args.workdir) / f"{args.name}-engine.json"
    base = [a for a in sys.argv[1:] if a != "run"]
    child = [sys.executable, __file__, "engine", *_without_source(base), "--shards", str(shards),
             "--results-dir", str(engine_json.parent), "--name", engine_json.stem]
    subprocess.run(child, check=True, cwd=REPO)
    engine = json.loads(engine_json.read_text())
    proc = start_server(args, shards)
    try:
        wait_for_server(proc, f"127.0.0.1:{args.port}", args.wait_ready)
        metrics, _ = bench_endpoint(args, f"127.0.0.1:{args.port}", Path(args.results_dir))
    finally:
        stop_server(proc)
    metrics.update(engine["metrics"])
    add_ratios(metrics)
    write_results(args, engine["device"], metrics)


def _without_source(argv: list[str]) -> list[str]:
    """argv less the checkpoint source and name options (the child gets --shards and its own --name)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--model", "--shards", "--name", "--results-dir"):
            skip = True
            continue
        if a == "--generate-8b" or a.split("=")[0] in ("--model", "--shards", "--name", "--results-dir"):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
