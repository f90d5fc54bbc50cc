"""`orch bench --endpoint HOST:PORT`: load-test a serving endpoint and report throughput and latency."""
from __future__ import annotations

import argparse
import json
import math
import random
import sys

HELP = """\
Benchmark a serving endpoint with synthetic requests and report throughput and latency.

Protocols:
  orch    orch's own gRPC API (orch.v1.OrchService/GenerateStream). Prompts are random token ids of
          exactly --input-len tokens (drawn from the vocab that ModelInfo reports, EOS/BOS left out),
          sampled greedily with ignore_eos, so every answer has exactly --output-len tokens.
  kserve  any KServe v2 gRPC server (inference.GRPCInferenceService/ModelStreamInfer), with the
          Triton TensorRT-LLM tensor names: text_input BYTES, max_tokens INT32, stream BOOL
          (+ min_length INT32 = max_tokens, TensorRT-LLM's way to ignore EOS, or ignore_eos BOOL,
          when the model lists one) -> text_output BYTES. Prompts are random words, about one
          token each (exact with --tokenizer); each streamed response counts as one output
          token. --model defaults to "ensemble" (Triton's usual name).

Load:
  --concurrency N        keep N requests in flight (closed loop).
  --request-rate R       send requests as a Poisson process of R requests/s (open loop); with
                         --concurrency too, at most N are in flight (later ones wait, and their
                         latencies count from when they are sent).
  --num-requests N / --duration S
                         how many measured requests, or for how long to send them (requests in
                         flight at the end are awaited and counted). Default: max(64, 4 x concurrency).
  --warmup N             requests sent first and left out of the figures (default 4).
  --processes N          split the load over N client processes that start together. gRPC in
                         Python costs the client ~40 us of CPU per streamed message; at more
                         than ~5,000 tokens/s per process the client itself would skew timings.

Figures (client-side, monotonic clock, measured requests only):
  TTFT   time from sending to the first token.
  TPOT   per request, (last token - first token) / (output tokens - 1).
  ITL    gaps between consecutive streamed messages carrying tokens.
  E2E    time from sending to the end of the stream.
  Throughput is over the span from the first send to the last completion: output tok/s counts
  tokens of successful requests. Failed requests are counted by gRPC status (UNAVAILABLE,
  INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...), never dropped. With ignore_eos, successful requests
  whose token count differs from the one asked for are reported as output-length mismatches.

Sweeps:
  --sweep concurrency=1,8,64,256  (or request_rate=1,2,4) runs once per value, prints one table
  row each and writes a PNG of output throughput against TPOT and TTFT (--plot).
"""

EPILOG = """\
examples:
  orch bench --endpoint localhost:50051 --input-len 128 --output-len 128 --concurrency 8
  orch bench --endpoint localhost:50051 --request-rate 4 --duration 60 --input-len-dist normal
  orch bench --endpoint localhost:50051 --sweep concurrency=1,8,64,256 --plot sweep.png --json
  orch bench --endpoint triton:8001 --protocol kserve --model ensemble --tokenizer ./tokenizer.json

exit codes: 0 every measured request succeeded, 1 some failed (the report still prints),
2 invalid options.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `orch bench`."""
    p = sub.add_parser("bench", help="benchmark a serving endpoint (TTFT, TPOT, throughput, sweeps)",
                       description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, metavar="HOST:PORT", help="gRPC address of the server")
    p.add_argument("--protocol", choices=["orch", "kserve"], default="orch", help="API to speak (default orch)")
    p.add_argument("--model", default="", help="model name (orch: default the served one; kserve: default ensemble)")
    g = p.add_argument_group("request shape")
    g.add_argument("--input-len", "--isl", type=int, default=128, metavar="N", help="prompt tokens (mean; default 128)")
    g.add_argument("--output-len", "--osl", type=int, default=128, metavar="N",
                   help="output tokens per request (mean; default 128)")
    g.add_argument("--input-len-dist", choices=["fixed", "uniform", "normal"], default="fixed",
                   help="prompt length distribution around --input-len (default fixed)")
    g.add_argument("--output-len-dist", choices=["fixed", "uniform", "normal"], default="fixed",
                   help="output length distribution around --output-len (default fixed)")
    g.add_argument("--len-spread", type=float, default=0.25, metavar="F",
                   help="uniform: lengths in mean*(1+-F); normal: sd = mean*F (default 0.25)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop at EOS (output lengths then vary)")
    g.add_argument("--no-stream", dest="stream", action="store_false",
                   help="orch only: use unary Generate (TTFT = E2E, no TPOT/ITL)")
    g.add_argument("--tokenizer", metavar="PATH", help="kserve: tokenizer.json (or its directory) to make text "
                   "prompts of exactly --input-len tokens")
    g.add_argument("--seed", type=int, default=None, help="seed of lengths, prompts and arrivals (default: a fresh "
                   "one each run, shown in the report, so that prompts never hit the server's prefix cache)")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", "-c", type=int, default=None, metavar="N",
                   help="requests in flight (default 1; with --request-rate: a cap, default none)")
    g.add_argument("--request-rate", type=float, default=None, metavar="R", help="Poisson arrivals, requests/s")
    g.add_argument("--num-requests", "-n", type=int, default=None, metavar="N",
                   help="measured requests (default max(64, 4 x concurrency))")
    g.add_argument("--duration", type=float, default=None, metavar="S", help="send requests for S seconds instead")
    g.add_argument("--warmup", type=int, default=4, metavar="N", help="unmeasured warm-up requests (default 4)")
    g.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request deadline (default 600)")
    g.add_argument("--wait-ready", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the server to come up before starting")
    g.add_argument("--channels", type=int, default=None, metavar="N",
                   help="gRPC connections to spread streams over (default 1 per 64 in flight)")
    g.add_argument("--processes", type=int, default=1, metavar="N",
                   help="client processes sharing the load (default 1; gRPC costs the client ~40 us of CPU per "
                   "streamed message, so use about one per 5,000 tokens/s)")
    g.add_argument("--sweep", metavar="KEY=V1,V2,...", help="run once per value of concurrency or request_rate")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the results as JSON on stdout (progress on stderr)")
    g.add_argument("--plot", metavar="PNG", default="bench_sweep.png", help="sweep plot file (default bench_sweep.png)")
    g.add_argument("--request-log", metavar="JSONL", help="write one JSON line per measured request")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, **override):
    """BenchConfig of parsed arguments, with `override` fields (a sweep's first value), validated."""
    from dataclasses import replace

    from orchestrator.bench import BenchConfig

    rate = override.get("request_rate", args.request_rate)
    conc = args.concurrency if args.concurrency is not None else (None if rate else 1)
    return replace(BenchConfig(
        endpoint=args.endpoint, protocol=args.protocol, model=args.model, input_len=args.input_len,
        output_len=args.output_len, input_len_dist=args.input_len_dist, output_len_dist=args.output_len_dist,
        len_spread=args.len_spread, concurrency=conc, request_rate=args.request_rate,
        num_requests=args.num_requests, duration_s=args.duration, warmup_requests=args.warmup,
        ignore_eos=args.ignore_eos, stream=args.stream,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31), timeout_s=args.timeout,
        channels=args.channels, tokenizer=args.tokenizer, wait_ready_s=args.wait_ready, processes=args.processes,
    ), **override).validate()


class _Progress:
    """A rich progress bar fed by the benchmark's hooks."""

    def __init__(self, console, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.label = label
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                            transient=True)
        self.task = None
        self.errors = 0

    def hooks(self):
        from orchestrator.bench import Hooks

        return Hooks(on_phase=self.on_phase, on_done=self.on_done)

    def on_phase(self, phase: str, total: int | None, duration: float | None) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.errors = 0
        self.task = self.bar.add_task(f"{self.label} {phase}", total=total, info="")

    def on_done(self, ok: bool) -> None:
        if not ok:
            self.errors += 1
        self.bar.update(self.task, advance=1, info=f"errors {self.errors}" if self.errors else "")


def _run_one(cfg, console, show_progress: bool, label: str):
    from orchestrator.bench import run_bench

    if not show_progress:
        return run_bench(cfg)
    prog = _Progress(console, label)
    with prog.bar:
        return run_bench(cfg, prog.hooks())


def _fmt(v: float | None, spec: str = "{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def _summary_table(s):
    from rich.table import Table

    t = Table(title=f"orch bench: {s.protocol} {s.endpoint}"
              + (f" concurrency {s.concurrency}" if s.concurrency else "")
              + (f" rate {s.request_rate}/s" if s.request_rate else ""), show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests ok / failed", f"{s.completed} / {s.failed}")
    for code, n in s.errors.items():
        t.add_row(f"  errors {code}", str(n))
    t.add_row("duration (s)", _fmt(s.duration_s))
    t.add_row("request throughput (req/s)", _fmt(s.request_throughput_req_per_s))
    t.add_row("output throughput (tok/s)", _fmt(s.output_throughput_tok_per_s, "{:.1f}"))
    t.add_row("input throughput (tok/s)", _fmt(s.input_throughput_tok_per_s, "{:.1f}"))
    t.add_row("input / output tokens", f"{s.total_input_tokens} / {s.total_output_tokens}")
    t.add_row("output-length mismatches", str(s.output_len_mismatches))
    if s.server_count_mismatches:
        t.add_row("token counts unlike server's usage", str(s.server_count_mismatches))
    t.add_row("max in flight", str(s.max_in_flight))
    if s.cached_prompt_tokens:
        t.add_row("prompt tokens from the prefix cache", str(s.cached_prompt_tokens))
    t.add_row("seed", str(s.seed))
    t.add_row("client CPU busy (busiest process)", _fmt(s.client_cpu_busy * 100, "{:.0f}%"))
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = getattr(s, f"{name}_ms")
        t.add_row(f"{name.upper()} ms mean / p50 / p90 / p99",
                  " / ".join(_fmt(getattr(d, k)) for k in ("mean", "p50", "p90", "p99")))
    return t


def run(args: argparse.Namespace) -> int:
    """Run one benchmark or a sweep and print the report."""
    from rich.console import Console
    from rich.table import Table

    from orchestrator.bench import parse_sweep, sweep_configs
    from orchestrator.bench_stats import plot_sweep, sweep_table

    sweep = parse_sweep(args.sweep) if args.sweep else None
    cfg = config_from_args(args, **({sweep[0]: sweep[1][0]} if sweep else {}))
    err = Console(stderr=True)
    out = Console() if sys.stdout.isatty() else Console(width=200)  # piped: keep tables unwrapped
    if sweep:
        key, values = sweep
        results = []
        for c in sweep_configs(cfg, key, values):
            results.append(_run_one(c, err, args.progress, f"{key}={getattr(c, key)}"))
            s = results[-1].summary
            err.print(f"{key}={getattr(c, key)}: {_fmt(s.output_throughput_tok_per_s, '{:.1f}')} tok/s, "
                      f"{s.failed} errors", highlight=False)
        summaries = [r.summary for r in results]
        png = plot_sweep(key, summaries, args.plot,
                         title=f"orch bench {cfg.protocol} {cfg.endpoint}: ISL {cfg.input_len} / OSL {cfg.output_len}")
        if args.request_log:
            with open(args.request_log, "w") as f:
                for r in results:
                    for rec in r.records:
                        f.write(json.dumps({key: getattr(r.config, key), **rec.to_dict(r.t0_ns)}) + "\n")
        if args.json:
            print(json.dumps({"sweep": key, "values": values, "plot": str(png),
                              "results": [s.to_dict() for s in summaries]}, indent=2))
        else:
            headers, rows = sweep_table(key, summaries)
            t = Table(title=f"orch bench sweep: ISL {cfg.input_len} / OSL {cfg.output_len}, {cfg.protocol} "
                      f"{cfg.endpoint}")
            for i, h in enumerate(headers):
                t.add_column(h, justify="right" if i else "left")
            for row in rows:
                t.add_row(*row)
            out.print(t)
            for note in dict.fromkeys(n for s in summaries for n in s.notes):
                out.print(f"note: {note}", highlight=False)
            out.print(f"plot: {png}", highlight=False)
        failed = sum(s.failed for s in summaries)
    else:
        result = _run_one(cfg, err, args.progress, "bench")
        s = result.summary
        if args.request_log:
            result.write_request_log(args.request_log)
        if args.json:
            print(json.dumps(s.to_dict(), indent=2))
        else:
            out.print(_summary_table(s))
            for note in s.notes:
                out.print(f"note: {note}", highlight=False)
        failed = s.failed
    if failed:
        print(f"{failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0
