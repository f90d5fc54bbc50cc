"""Serving benchmark: synthetic workload, asyncio gRPC load generator, latency/throughput statistics.

Pure of the CLI (orchestrator/commands/bench.py drives it). Every request is timed on the client with
time.perf_counter_ns (monotonic); a failed request is kept as a record with its gRPC status name and
counted in the errors, never dropped.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from orchestrator.errors import OrchError

log = logging.getLogger(__name__)

PROTOCOLS = ("orch", "kserve")
LEN_DISTS = ("fixed", "uniform", "normal")
SWEEP_KEYS = {"concurrency": int, "request_rate": float}
PERCENTILES = (50, 90, 99)
STREAMS_PER_CHANNEL = 64  # concurrent streams per HTTP/2 connection before opening another


class BenchConfigError(OrchError):
    """A benchmark option is invalid."""


# ----------------------------------------------------------------------------------------------------
# configuration


@dataclass
class BenchConfig:
    """What to send, how fast, and to whom."""

    endpoint: str
    protocol: str = "orch"
    model: str = ""
    input_len: int = 128
    output_len: int = 128
    input_len_dist: str = "fixed"
    output_len_dist: str = "fixed"
    len_spread: float = 0.25
    concurrency: int | None = 1
    request_rate: float | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    warmup_requests: int = 4
    ignore_eos: bool = True
    stream: bool = True
    seed: int = 0
    timeout_s: float = 600.0
    channels: int | None = None
    tokenizer: str | None = None
    wait_ready_s: float = 0.0

    def validate(self) -> "BenchConfig":
        """Check option values; raise BenchConfigError naming the bad one."""
        def bad(flag: str, value: object, expected: str) -> BenchConfigError:
            return BenchConfigError(f"{flag}={value!r}: expected {expected}")

        if ":" not in self.endpoint:
            raise bad("--endpoint", self.endpoint, "HOST:PORT")
        if self.protocol not in PROTOCOLS:
            raise bad("--protocol", self.protocol, " or ".join(PROTOCOLS))
        if self.protocol == "kserve" and not self.model:
            raise bad("--model", self.model, "the KServe model name (required with --protocol kserve)")
        for flag, v in (("--input-len", self.input_len), ("--output-len", self.output_len)):
            if v < 1:
                raise bad(flag, v, "an integer >= 1")
        for flag, v in (("--input-len-dist", self.input_len_dist), ("--output-len-dist", self.output_len_dist)):
            if v not in LEN_DISTS:
                raise bad(flag, v, "one of " + ", ".join(LEN_DISTS))
        if not 0 <= self.len_spread < 1:
            raise bad("--len-spread", self.len_spread, "a fraction in [0, 1)")
        if self.concurrency is not None and self.concurrency < 1:
            raise bad("--concurrency", self.concurrency, "an integer >= 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise bad("--request-rate", self.request_rate, "requests per second > 0")
        if self.concurrency is None and self.request_rate is None:
            raise bad("--concurrency", None, "a concurrency or a --request-rate")
        if self.num_requests is not None and self.num_requests < 1:
            raise bad("--num-requests", self.num_requests, "an integer >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise bad("--duration", self.duration_s, "seconds > 0")
        if self.warmup_requests < 0:
            raise bad("--warmup", self.warmup_requests, "an integer >= 0")
        if self.protocol == "kserve" and not self.stream:
            raise bad("--no-stream", True, "streaming with --protocol kserve (tokens are counted per response)")
        if self.channels is not None and self.channels < 1:
            raise bad("--channels", self.channels, "an integer >= 1")
        return self

    def total_requests(self) -> int | None:
        """Measured request count, or None when the run is bounded by --duration."""
        if self.num_requests is not None:
            return self.num_requests
        if self.duration_s is not None:
            return None
        return max(64, 4 * (self.concurrency or 16))


# ----------------------------------------------------------------------------------------------------
# workload: lengths, arrivals, prompts (pure, seeded)


def sample_lengths(mean: int, n: int, dist: str, spread: float, rng: random.Random,
                   max_len: int | None = None) -> list[int]:
    """n lengths around mean: fixed, uniform in mean*(1 +- spread), or normal with sd mean*spread; >= 1."""
    if dist == "fixed" or spread == 0:
        out = [mean] * n
    elif dist == "uniform":
        lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        out = [rng.randint(lo, hi) for _ in range(n)]
    elif dist == "normal":
        out = [max(1, round(rng.gauss(mean, mean * spread))) for _ in range(n)]
    else:
        raise BenchConfigError(f"length distribution {dist!r}: expected one of {', '.join(LEN_DISTS)}")
    return [min(v, max_len) for v in out] if max_len else out


def poisson_arrivals(rate: float, rng: random.Random, n: int | None = None,
                     duration_s: float | None = None) -> list[float]:
    """Send offsets (s) of a Poisson process at `rate` req/s: n of them, or all before duration_s."""
    if n is None and duration_s is None:
        raise ValueError("poisson_arrivals needs n or duration_s")
    out: list[float] = []
    t = 0.0
    while n is None or len(out) < n:
        t += rng.expovariate(rate)
        if duration_s is not None and t >= duration_s:
            break
        out.append(t)
    return out


# Common English words that are a single token (with their leading space) in the usual BPE vocabularies.
_WORDS = ("the of and to in is was for on that with as by at from his he it an were are which be this "
          "had not first one their its new after but who they have has her she two been other when there all "
          "during into school time may years more most only over city some world would where later up such "
          "used many can state about national out known university united then made").split()


def token_prompt(n: int, vocab_size: int, exclude: set[int], rng: "object") -> list[int]:
    """n random token ids in [0, vocab_size) avoiding `exclude` (EOS/BOS); rng is a numpy Generator."""
    ids = rng.integers(0, vocab_size, size=n).tolist()
    if exclude and len(exclude) < vocab_size:
        for j, i in enumerate(ids):
            while i in exclude:
                i = (i + 1) % vocab_size
            ids[j] = i
    return ids


def text_prompt(n: int, rng: random.Random, tokenizer: "object | None" = None) -> str:
    """A text of random words: n words (~n tokens), or exactly n tokens of `tokenizer` where it can."""
    words = [rng.choice(_WORDS) for _ in range(n)]
    text = " ".join(words)
    if tokenizer is None:
        return text
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    while len(ids) < n:  # a tokenizer that merges words: add more
        text += " " + " ".join(rng.choice(_WORDS) for _ in range(n - len(ids)))
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.decode(ids[:n])


@dataclass
class BenchRequest:
    """One synthetic request: a prompt (token ids or text) and how many tokens to ask for."""

    index: int
    prompt: list[int] | str
    input_len: int
    output_len: int


class Workload:
    """Deterministic stream of requests (seeded): lengths from the config's distributions, unique prompts."""

    def __init__(self, cfg: BenchConfig, vocab_size: int, exclude_ids: set[int] | None = None,
                 max_seq_len: int | None = None, tokenizer: object | None = None, seed_offset: int = 0):
        import numpy as np

        self.cfg, self.vocab_size, self.exclude = cfg, vocab_size, set(exclude_ids or ())
        self.max_seq_len, self.tokenizer = max_seq_len, tokenizer
        self.rng = random.Random(cfg.seed + seed_offset)
        self.np_rng = np.random.default_rng(cfg.seed + seed_offset)
        self.count = 0

    def next(self) -> BenchRequest:
        """The next request."""
        c = self.cfg
        isl = sample_lengths(c.input_len, 1, c.input_len_dist, c.len_spread, self.rng)[0]
        osl = sample_lengths(c.output_len, 1, c.output_len_dist, c.len_spread, self.rng)[0]
        if c.protocol == "orch":
            prompt: list[int] | str = token_prompt(isl, self.vocab_size, self.exclude, self.np_rng)
        else:
            prompt = text_prompt(isl, self.rng, self.tokenizer)
        req = BenchRequest(self.count, prompt, isl, osl)
        self.count += 1
        return req

    def take(self, n: int) -> list[BenchRequest]:
        """The next n requests."""
        return [self.next() for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# per-request record and statistics


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
        """Time per output token after the first: (last token - first token) / (tokens - 1) (ms)."""
        n = self.output_tokens
        if n < 2 or len(self.chunk_ns) < 1:
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


def summarize(cfg: BenchConfig, records: list[RequestRecord], notes: list[str] | None = None) -> BenchSummary:
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
        ttft_ms=Dist.of([x for r in ok if (x := r.ttft_ms()) is not None]),
        tpot_ms=Dist.of([x for r in ok if (x := r.tpot_ms()) is not None]),
        itl_ms=Dist.of(itls),
        e2e_ms=Dist.of([r.e2e_ms() for r in ok]),
        notes=list(notes or []),
    )


# ----------------------------------------------------------------------------------------------------
# protocols: orch.v1 and KServe v2 over grpc.aio


class RequestFailed(Exception):
    """A request failed in a way that carries no gRPC status (e.g. a KServe in-stream error)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerInfo:
    """What the server told about itself (fields stay None when it could not be asked)."""

    model: str = ""
    vocab_size: int | None = None
    max_seq_len: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    inputs: list[str] = field(default_factory=list)
    error: str = ""


def _open_channels(endpoint: str, n: int) -> list:
    import grpc

    # a local subchannel pool gives each channel its own HTTP/2 connection
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]
    return [grpc.aio.insecure_channel(endpoint, options=opts) for _ in range(n)]


class OrchProtocol:
    """orch.v1.OrchService: token-id prompts, GenerateStream (or Generate with stream=False)."""

    name = "orch"

    def __init__(self, cfg: BenchConfig, n_channels: int):
        from protos.orch.v1 import orch_pb2, orch_pb2_grpc

        self.cfg, self.pb = cfg, orch_pb2
        self.channels = _open_channels(cfg.endpoint, n_channels)
        self.stubs = [orch_pb2_grpc.OrchServiceStub(ch) for ch in self.channels]

    async def info(self) -> ServerInfo:
        """ModelInfo."""
        r = await self.stubs[0].ModelInfo(self.pb.ModelInfoRequest(model=self.cfg.model), **_info_call_args(self.cfg))
        return ServerInfo(model=r.model, vocab_size=r.vocab_size or None, max_seq_len=r.max_seq_len or None,
                          eos_token_ids=list(r.eos_token_ids), bos_token_id=r.bos_token_id)

    def build(self, req: BenchRequest) -> object:
        """The GenerateRequest of a BenchRequest."""
        pb = self.pb
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=self.cfg.ignore_eos)
        return pb.GenerateRequest(model=self.cfg.model, prompt_token_ids=req.prompt, sampling=sampling,
                                  request_id=f"bench-{req.index}")

    async def send(self, msg: object, rec: RequestRecord, slot: int) -> None:
        """Run one request, filling rec's times and token counts."""
        stub = self.stubs[slot % len(self.stubs)]
        clock = time.perf_counter_ns
        tokens, times = rec.chunk_tokens, rec.chunk_ns
        if not self.cfg.stream:
            rec.start_ns = clock()
            r = await stub.Generate(msg, timeout=self.cfg.timeout_s)
            times.append(clock())
            tokens.append(len(r.token_ids))
            self._finish(rec, r)
            return
        rec.start_ns = clock()
        call = stub.GenerateStream(msg, timeout=self.cfg.timeout_s)
        async for r in call:
            now = clock()
            n = len(r.token_ids)
            if n:
                times.append(now)
                tokens.append(n)
            if r.finish_reason:
                self._finish(rec, r)

    def _finish(self, rec: RequestRecord, r: object) -> None:
        rec.finish_reason = self.pb.FinishReason.Name(r.finish_reason)
        if r.HasField("usage"):
            rec.server_output_tokens = r.usage.completion_tokens
            rec.server_prompt_tokens = r.usage.prompt_tokens

    async def close(self) -> None:
        """Close the channels."""
        for ch in self.channels:
            await ch.close()


class KServeProtocol:
    """KServe v2 GRPCInferenceService, Triton TensorRT-LLM tensor names, timed over ModelStreamInfer.

    Inputs text_input (BYTES), max_tokens (INT32), stream (BOOL) and, when the model lists it,
    ignore_eos (BOOL); output text_output (BYTES). Each streamed response carrying text_output counts
    as one output token (Triton's decoupled streaming sends one response per token).
    """

    name = "kserve"

    def __init__(self, cfg: BenchConfig, n_channels: int):
        from protos.kserve import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

        self.cfg, self.pb = cfg, grpc_predict_v2_pb2
        self.channels = _open_channels(cfg.endpoint, n_channels)
        self.stubs = [grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(ch) for ch in self.channels]
        self.inputs: list[str] = []

    async def info(self) -> ServerInfo:
        """ModelMetadata: the model's input names."""
        r = await self.stubs[0].ModelMetadata(self.pb.ModelMetadataRequest(name=self.cfg.model),
                                              **_info_call_args(self.cfg))
        self.inputs = [t.name for t in r.inputs]
        return ServerInfo(model=r.name, inputs=self.inputs)

    def build(self, req: BenchRequest) -> object:
        """The ModelInferRequest of a BenchRequest."""
        pb = self.pb
        T = pb.ModelInferRequest.InferInputTensor
        C = pb.InferTensorContents
        inputs = [
            T(name="text_input", datatype="BYTES", shape=[1, 1], contents=C(bytes_contents=[req.prompt.encode()])),
            T(name="max_tokens", datatype="INT32", shape=[1, 1], contents=C(int_contents=[req.output_len])),
            T(name="stream", datatype="BOOL", shape=[1, 1], contents=C(bool_contents=[True])),
        ]
        if self.cfg.ignore_eos and "ignore_eos" in self.inputs:
            inputs.append(T(name="ignore_eos", datatype="BOOL", shape=[1, 1], contents=C(bool_contents=[True])))
        return pb.ModelInferRequest(
            model_name=self.cfg.model, id=f"bench-{req.index}", inputs=inputs,
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="text_output")],
            parameters={"triton_enable_empty_final_response": pb.InferParameter(bool_param=True)})

    async def send(self, msg: object, rec: RequestRecord, slot: int) -> None:
        """Run one request on its own ModelStreamInfer stream, filling rec."""
        stub = self.stubs[slot % len(self.stubs)]
        clock = time.perf_counter_ns
        rec.start_ns = clock()
        call = stub.ModelStreamInfer(timeout=self.cfg.timeout_s)
        await call.write(msg)
        await call.done_writing()
        async for r in call:
            now = clock()
            if r.error_message:
                call.cancel()
                raise RequestFailed("INFER_ERROR", r.error_message)
            ir = r.infer_response
            if any(o.name == "text_output" for o in ir.outputs):
                rec.chunk_ns.append(now)
                rec.chunk_tokens.append(1)
            p = ir.parameters.get("triton_final_response")
            if p is not None and p.bool_param:
                rec.finish_reason = "FINAL_RESPONSE"
                call.cancel()
                break

    async def close(self) -> None:
        """Close the channels."""
        for ch in self.channels:
            await ch.close()


def _info_call_args(cfg: BenchConfig) -> dict:
    if cfg.wait_ready_s > 0:
        return {"timeout": cfg.wait_ready_s, "wait_for_ready": True}
    return {"timeout": 10.0}


def make_protocol(cfg: BenchConfig, n_channels: int) -> OrchProtocol | KServeProtocol:
    """The client for cfg.protocol."""
    return (OrchProtocol if cfg.protocol == "orch" else KServeProtocol)(cfg, n_channels)


# ----------------------------------------------------------------------------------------------------
# the load generator


@dataclass
class BenchResult:
    """A run: its config, summary, measured and warm-up records, and what the server said."""

    config: BenchConfig
    summary: BenchSummary
    records: list[RequestRecord]
    warmup: list[RequestRecord]
    server: ServerInfo
    t0_ns: int

    def write_request_log(self, path: str | Path) -> None:
        """One JSON line per measured request (times in ms from the first send)."""
        with open(path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r.to_dict(self.t0_ns)) + "\n")


@dataclass
class Hooks:
    """Progress callbacks (all optional): a phase begins; a request ends."""

    on_phase: Callable[[str, int | None, float | None], None] = lambda phase, total, duration: None
    on_done: Callable[[RequestRecord], None] = lambda rec: None


async def _run_one(proto, req: BenchRequest, msg: object, slot: int, scheduled_ns: int) -> RequestRecord:
    import grpc

    rec = RequestRecord(req.index, req.input_len, req.output_len, scheduled_ns=scheduled_ns)
    try:
        await proto.send(msg, rec, slot)
    except grpc.aio.AioRpcError as e:
        rec.status, rec.error = e.code().name, e.details() or ""
    except RequestFailed as e:
        rec.status, rec.error = e.status, str(e)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a client-side failure is still an error of this request
        rec.status, rec.error = f"CLIENT_{type(e).__name__}", str(e)
    rec.end_ns = time.perf_counter_ns()
    if not rec.start_ns:
        rec.start_ns = rec.end_ns
    return rec


async def _closed_loop(proto, source: Iterator[tuple[BenchRequest, object]], workers: int,
                       on_done: Callable[[RequestRecord], None]) -> list[RequestRecord]:
    """`workers` requests in flight at all times until the source runs dry."""
    records: list[RequestRecord] = []

    async def worker(slot: int) -> None:
        for req, msg in source:
            rec = await _run_one(proto, req, msg, slot, time.perf_counter_ns())
            records.append(rec)
            on_done(rec)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return records


async def _open_loop(proto, source: Iterator[tuple[BenchRequest, object]], arrivals: list[float],
                     cap: int | None, on_done: Callable[[RequestRecord], None]) -> list[RequestRecord]:
    """Send request i at arrivals[i] seconds (waiting for a free slot when `cap` are in flight)."""
    records: list[RequestRecord] = []
    sem = asyncio.Semaphore(cap) if cap else None

    async def one(req: BenchRequest, msg: object, slot: int, due: int) -> None:
        try:
            rec = await _run_one(proto, req, msg, slot, due)
        finally:
            if sem:
                sem.release()
        records.append(rec)
        on_done(rec)

    tasks = []
    t0 = time.perf_counter_ns()
    for i, ((req, msg), at) in enumerate(zip(source, arrivals)):
        due = t0 + int(at * 1e9)
        delay = (due - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        if sem:
            await sem.acquire()
        tasks.append(asyncio.create_task(one(req, msg, i, due)))
    await asyncio.gather(*tasks)
    return records


def _prebuilt(proto, reqs: list[BenchRequest]) -> Iterator[tuple[BenchRequest, object]]:
    return iter([(r, proto.build(r)) for r in reqs])


def _until(proto, workload: Workload, deadline_ns: int) -> Iterator[tuple[BenchRequest, object]]:
    while time.perf_counter_ns() < deadline_ns:
        req = workload.next()
        yield req, proto.build(req)


def _load_tokenizer(path: str | None):
    if not path:
        return None
    from tokenizers import Tokenizer

    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise BenchConfigError(f"--tokenizer={path!r}: expected a tokenizer.json file or a directory holding one")
    return Tokenizer.from_file(str(f))


FALLBACK_VOCAB = 256  # prompt ids stay below this when the server's vocab size is unknown


async def run_bench_async(cfg: BenchConfig, hooks: Hooks | None = None) -> BenchResult:
    """Warm up, then run the measured phase; returns all records and their summary."""
    import grpc

    cfg.validate()
    hooks = hooks or Hooks()
    notes: list[str] = []
    peak = cfg.concurrency or max(1, math.ceil(cfg.request_rate or 1))
    proto = make_protocol(cfg, cfg.channels or max(1, math.ceil(peak / STREAMS_PER_CHANNEL)))
    try:
        try:
            server = await proto.info()
        except grpc.aio.AioRpcError as e:
            server = ServerInfo(error=f"{e.code().name}: {e.details()}")
            notes.append(f"server info unavailable ({server.error})")
        vocab = server.vocab_size or FALLBACK_VOCAB
        exclude = set(server.eos_token_ids) | ({server.bos_token_id} if server.bos_token_id else set())
        tok = _load_tokenizer(cfg.tokenizer)
        if cfg.protocol == "kserve":
            notes.append("kserve: prompts are random words, " + ("exactly --input-len tokens of --tokenizer "
                         "(before any special tokens the server adds)" if tok else "about one token per word")
                         + "; output tokens are counted as one per streamed response")
            if cfg.ignore_eos and server.inputs and "ignore_eos" not in server.inputs:
                notes.append("kserve: the model has no ignore_eos input; outputs may stop early at EOS")
        if cfg.protocol == "orch" and server.vocab_size is None:
            notes.append(f"prompt token ids drawn below {FALLBACK_VOCAB} (vocab size unknown)")

        def workload(offset: int) -> Workload:
            return Workload(cfg, vocab, exclude, server.max_seq_len, tok, seed_offset=offset)

        warmup: list[RequestRecord] = []
        if cfg.warmup_requests:
            hooks.on_phase("warmup", cfg.warmup_requests, None)
            src = _prebuilt(proto, workload(1_000_003).take(cfg.warmup_requests))
            warmup = await _closed_loop(proto, src, min(cfg.warmup_requests, cfg.concurrency or 8), hooks.on_done)
            if not any(r.ok for r in warmup):
                notes.append("every warm-up request failed")

        total = cfg.total_requests()
        hooks.on_phase("bench", total, cfg.duration_s)
        wl = workload(0)
        t0 = time.perf_counter_ns()
        if total is not None:
            src = _prebuilt(proto, wl.take(total))
            t0 = time.perf_counter_ns()
        else:
            src = _until(proto, wl, t0 + int(cfg.duration_s * 1e9))
        if cfg.request_rate is None:
            records = await _closed_loop(proto, src, cfg.concurrency, hooks.on_done)
        else:
            arrivals = poisson_arrivals(cfg.request_rate, random.Random(cfg.seed + 7), n=total,
                                        duration_s=cfg.duration_s)
            records = await _open_loop(proto, src, arrivals, cfg.concurrency, hooks.on_done)
    finally:
        await proto.close()
    records.sort(key=lambda r: r.index)
    if server.max_seq_len:
        over = sum(1 for r in records if r.input_len + r.requested_output_len > server.max_seq_len)
        if over:
            notes.append(f"{over} request(s) exceed the server's max_seq_len {server.max_seq_len} "
                         "(prompt + output tokens)")
    if records:
        t0 = min(r.start_ns for r in records)
    return BenchResult(cfg, summarize(cfg, records, notes), records, warmup, server, t0)


def run_bench(cfg: BenchConfig, hooks: Hooks | None = None) -> BenchResult:
    """Synchronous wrapper of run_bench_async."""
    return asyncio.run(run_bench_async(cfg, hooks))


# ----------------------------------------------------------------------------------------------------
# sweeps: one run per value, a table and a throughput-latency plot


def parse_sweep(spec: str) -> tuple[str, list[int | float]]:
    """'concurrency=1,8,64' -> ('concurrency', [1, 8, 64]); also request_rate=..."""
    key, sep, vals = spec.partition("=")
    key = key.strip().replace("-", "_")
    if key == "rate":
        key = "request_rate"
    if not sep or key not in SWEEP_KEYS:
        raise BenchConfigError(f"--sweep={spec!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
    try:
        values = [SWEEP_KEYS[key](v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise BenchConfigError(f"--sweep={spec!r}: values of {key} must be {SWEEP_KEYS[key].__name__}s") from None
    if not values or any(v <= 0 for v in values):
        raise BenchConfigError(f"--sweep={spec!r}: expected one or more positive values")
    return key, values


def sweep_configs(cfg: BenchConfig, key: str, values: list[int | float]) -> list[BenchConfig]:
    """One config per sweep value (the request count follows the concurrency unless it was set)."""
    from dataclasses import replace

    return [replace(cfg, **{key: v}).validate() for v in values]


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
    import matplotlib

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
