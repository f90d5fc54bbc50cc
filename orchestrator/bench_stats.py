"""Benchmark statistics: per-request records, percentiles, the run summary, sweep tables and plots."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.bench import BenchConfig

PERCENTILES = (50, 90, 99)



@dataclass
class RequestRecord:
    """What the client saw of one request; times are perf_counter_ns values."""

    index: int
    input_len: int
    requested_output_len: int
    scheduled_ns: int = 0  # when the request was due (Poisson) or taken (concurrency)
    start_ns: int = 0
    end_ns: int = 0
    chunk_ns: list[int] = field(default_factory=list)  # arrival of each streamed message carrying tokens
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each such message
    server_output_tokens: int | None = None  # the server's own count (usage), when it sends one
    server_prompt_tokens: int | None = None
    server_cached_tokens: int | None = None  # prompt tokens the server took from its prefix cache
    finish_reason: str = ""
    status: str = "OK"
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.status == "OK"

    @property
    def output_tokens(self) -> int:
        """Tokens the client received."""
        return sum(self.chunk_tokens)

    def ttft_ms(self) -> float | None:
        """Time to first token (ms)."""
        return (self.chunk_ns[0] - self.start_ns) / 1e6 if self.chunk_ns else None

    def e2e_ms(self) -> float:
        """Send to last byte (ms)."""
        return (self.end_ns - self.start_ns) / 1e6

    def tpot_ms(self) -> float | None:
        """Time per output token after the first: (last token - first token) / (tokens - 1) (ms); None
        when all tokens came in one message (unary Generate)."""
        n = self.output_tokens
        if n < 2 or len(self.chunk_ns) < 2:
            return None
        return (self.chunk_ns[-1] - self.chunk_ns[0]) / 1e6 / (n - 1)

    def itls_ms(self) -> list[float]:
        """Gaps between consecutive token-carrying messages (ms)."""
        t = self.chunk_ns
        return [(t[i] - t[i - 1]) / 1e6 for i in range(1, len(t))]

    def to_dict(self, t0_ns: int = 0) -> dict:
        """JSON-ready form with times in ms relative to t0_ns."""
        d = asdict(self)
        for k in ("scheduled_ns", "start_ns", "end_ns"):
            d[k.replace("_ns", "_ms")] = round((d.pop(k) - t0_ns) / 1e6, 3)
        d["chunk_ms"] = [round((t - t0_ns) / 1e6, 3) for t in d.pop("chunk_ns")]
        d["output_tokens"] = self.output_tokens
        return d


def percentile(sorted_values: list[float], q: float) -> float:
    """q-th percentile (0..100) of ascending values, linear interpolation between closest ranks."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Dist:
    """Summary of a latency sample (ms)."""

    n: int
    mean: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> "Dist":
        """Summarize values (NaNs when empty)."""
        v = sorted(values)
        if not v:
            return cls(0, *([math.nan] * 6))
        return cls(len(v), sum(v) / len(v), v[0], v[-1], *(percentile(v, q) for q in PERCENTILES))


@dataclass
class BenchSummary:
    """The figures of one benchmark run (measured requests only, warm-up excluded)."""

    protocol: str
    endpoint: str
    model: str
    concurrency: int | None
    request_rate: float | None
    input_len: int
    output_len: int
    input_len_dist: str
    output_len_dist: str
    num_requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    request_throughput_req_per_s: float
    output_throughput_tok_per_s: float
    input_throughput_tok_per_s: float
    total_input_tokens: int
    total_output_tokens: int  # tokens received by successful requests (the throughput's numerator)
    streamed_output_tokens: int  # tokens received by all requests, failed ones included
    requested_output_tokens: int
    output_len_mismatches: int  # successful requests whose token count differs from the one asked for
    server_count_mismatches: int  # requests whose received count differs from the server's usage count
    max_in_flight: int
    seed: int
    cached_prompt_tokens: int  # prompt tokens of successful requests the server found in its prefix cache
    client_cpu_busy: float  # CPU time / wall time of the busiest client process in the measured phase
    ttft_ms: Dist
    tpot_ms: Dist
    itl_ms: Dist
    e2e_ms: Dist
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form (NaN -> None)."""
        def clean(x):
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x
        return clean(asdict(self))

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat unit-carrying metric names (output_throughput_tok_per_s, ttft_p99_ms, ...)."""
        m: dict[str, float] = {
            "request_throughput_req_per_s": self.request_throughput_req_per_s,
            "output_throughput_tok_per_s": self.output_throughput_tok_per_s,
            "input_throughput_tok_per_s": self.input_throughput_tok_per_s,
            "duration_s": self.duration_s,
            "completed_requests": self.completed,
            "failed_requests": self.failed,
            "output_len_mismatches": self.output_len_mismatches,
            "client_cpu_busy_fraction": self.client_cpu_busy,
        }
        for name in ("ttft", "tpot", "itl", "e2e"):
            d: Dist = getattr(self, f"{name}_ms")
            m[f"{name}_mean_ms"] = d.mean
            for q in PERCENTILES:
                m[f"{name}_p{q}_ms"] = getattr(d, f"p{q}")
        return {prefix + k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    """Largest number of [start, end) intervals open at one time."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def summarize(cfg: "BenchConfig", records: list[RequestRecord], notes: list[str] | None = None,
              client_cpu_busy: float = math.nan) -> BenchSummary:
    """Figures of a run from its request records (the run spans first send to last completion)."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    if records:
        duration = (max(r.end_ns for r in records) - min(r.start_ns for r in records)) / 1e9
    else:
        duration = 0.0
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.server_prompt_tokens if r.server_prompt_tokens is not None else r.input_len for r in ok)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    itls = [x for r in ok for x in r.itls_ms()]
    return BenchSummary(
        protocol=cfg.protocol, endpoint=cfg.endpoint, model=cfg.model,
        concurrency=cfg.concurrency, request_rate=cfg.request_rate,
        input_len=cfg.input_len, output_len=cfg.output_len,
        input_len_dist=cfg.input_len_dist, output_len_dist=cfg.output_len_dist,
        num_requests=len(records), completed=len(ok), failed=len(records) - len(ok),
        errors=dict(sorted(errors.items())), duration_s=duration,
        request_throughput_req_per_s=rate(len(ok)),
        output_throughput_tok_per_s=rate(out_tok), input_throughput_tok_per_s=rate(in_tok),
        total_input_tokens=in_tok, total_output_tokens=out_tok,
        streamed_output_tokens=sum(r.output_tokens for r in records),
        requested_output_tokens=sum(r.requested_output_len for r in ok),
        output_len_mismatches=sum(1 for r in ok if r.output_tokens != r.requested_output_len),
        server_count_mismatches=sum(1 for r in records if r.server_output_tokens is not None
                                    and r.server_output_tokens != r.output_tokens),
        max_in_flight=max_overlap([(r.start_ns, r.end_ns) for r in records]),
        seed=cfg.seed,
        cached_prompt_tokens=sum(r.server_cached_tokens or 0 for r in ok),
        client_cpu_busy=client_cpu_busy,
        ttft_ms=Dist.of([x for r in ok if (x := r.ttft_ms()) is not None]),
        tpot_ms=Dist.of([x for r in ok if (x := r.tpot_ms()) is not None]),
        itl_ms=Dist.of(itls),
        e2e_ms=Dist.of([r.e2e_ms() for r in ok]),
        notes=list(notes or []),
    )


SWEEP_COLUMNS = [  # (header, summary -> value, format)
    ("req/s", lambda s: s.request_throughput_req_per_s, "{:.2f}"),
    ("out tok/s", lambda s: s.output_throughput_tok_per_s, "{:.1f}"),
    ("TTFT p50 ms", lambda s: s.ttft_ms.p50, "{:.1f}"),
    ("TTFT p99 ms", lambda s: s.ttft_ms.p99, "{:.1f}"),
    ("TPOT p50 ms", lambda s: s.tpot_ms.p50, "{:.2f}"),
    ("TPOT p99 ms", lambda s: s.tpot_ms.p99, "{:.2f}"),
    ("ITL p99 ms", lambda s: s.itl_ms.p99, "{:.2f}"),
    ("E2E p50 ms", lambda s: s.e2e_ms.p50, "{:.1f}"),
    ("E2E p99 ms", lambda s: s.e2e_ms.p99, "{:.1f}"),
    ("ok", lambda s: s.completed, "{}"),
    ("errors", lambda s: s.failed, "{}"),
]


def sweep_table(key: str, summaries: list[BenchSummary]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of a sweep: one row per value."""
    headers = [key] + [h for h, _, _ in SWEEP_COLUMNS]
    rows = []
    for s in summaries:
        row = [str(getattr(s, key))]
        for _, get, fmt in SWEEP_COLUMNS:
            v = get(s)
            row.append("-" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        rows.append(row)
    return headers, rows


def plot_sweep(key: str, summaries: list[BenchSummary], path: str | Path, title: str = "") -> Path:
    """PNG of output throughput against TPOT p50 and TTFT p50, each point labelled with its sweep value."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    tput = [s.output_throughput_tok_per_s for s in summaries]
    for ax, (label, get) in zip(axes, [("TPOT p50 (ms)", lambda s: s.tpot_ms.p50),
                                       ("TTFT p50 (ms)", lambda s: s.ttft_ms.p50)]):
        lat = [get(s) for s in summaries]
        ax.plot(lat, tput, marker="o")
        for s, x, y in zip(summaries, lat, tput):
            if not (math.isnan(x) or math.isnan(y)):
                ax.annotate(f"{key}={getattr(s, key)}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("output throughput (tok/s)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or f"orch bench: throughput vs latency ({key} sweep)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
