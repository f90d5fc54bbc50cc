"""Serving benchmark: configuration, synthetic workload and the asyncio load generator.

Pure of the CLI (orchestrator/commands/bench.py drives it). Clients live in bench_clients.py,
statistics, tables and plots in bench_stats.py. Every request is timed on the client with
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from orchestrator.bench_clients import MIN_LENGTH_INPUTS, RequestFailed, ServerInfo, make_protocol
from orchestrator.bench_stats import BenchSummary, RequestRecord, summarize
from orchestrator.errors import OrchError

log = logging.getLogger(__name__)

PROTOCOLS = ("orch", "kserve")
LEN_DISTS = ("fixed", "uniform", "normal")
SWEEP_KEYS = {"concurrency": int, "request_rate": float}
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
    processes: int = 1

    def validate(self) -> "BenchConfig":
        """Check option values; raise BenchConfigError naming the bad one."""
        def bad(flag: str, value: object, expected: str) -> BenchConfigError:
            return BenchConfigError(f"{flag}={value!r}: expected {expected}")

        if ":" not in self.endpoint:
            raise bad("--endpoint", self.endpoint, "HOST:PORT")
        if self.protocol not in PROTOCOLS:
            raise bad("--protocol", self.protocol, " or ".join(PROTOCOLS))
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
        if self.processes < 1:
            raise bad("--processes", self.processes, "an integer >= 1")
        if self.channels is not None and self.channels < 1:
            raise bad("--channels", self.channels, "an integer >= 1")
        tok = Path(self.tokenizer or ".")
        if self.tokenizer and not (tok.is_file() or (tok / "tokenizer.json").is_file()):
            raise bad("--tokenizer", self.tokenizer, "a tokenizer.json file or a directory holding one")
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


def sample_lengths(mean: int, n: int, dist: str, spread: float, rng: random.Random) -> list[int]:
    """n lengths around mean: fixed, uniform in mean*(1 +- spread), or normal with sd mean*spread; >= 1."""
    if dist == "fixed" or spread == 0:
        return [mean] * n
    if dist == "uniform":
        lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        return [rng.randint(lo, hi) for _ in range(n)]
    if dist == "normal":
        return [max(1, round(rng.gauss(mean, mean * spread))) for _ in range(n)]
    raise BenchConfigError(f"length distribution {dist!r}: expected one of {', '.join(LEN_DISTS)}")


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
                 tokenizer: object | None = None, seed_offset: int = 0):
        import numpy as np

        self.cfg, self.vocab_size, self.exclude = cfg, vocab_size, set(exclude_ids or ())
        self.tokenizer = tokenizer
        self.rng = random.Random(cfg.seed + seed_offset)
        self.np_rng = np.random.default_rng(cfg.seed + seed_offset)
        self.count, self.stride = 0, 1  # request indices: count, count + stride, ...

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
        self.count += self.stride
        return req

    def take(self, n: int) -> list[BenchRequest]:
        """The next n requests."""
        return [self.next() for _ in range(n)]


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


def _ignore(*_args) -> None:
    return None


@dataclass
class Hooks:
    """Progress callbacks (all optional): a phase begins (name, requests or None, seconds or None); a request
    ends (whether it succeeded). Called in the process that runs run_bench."""

    on_phase: Callable[[str, int | None, float | None], None] = _ignore
    on_done: Callable[[bool], None] = _ignore


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
                       on_done: Callable[[bool], None]) -> list[RequestRecord]:
    """`workers` requests in flight at all times until the source runs dry."""
    records: list[RequestRecord] = []

    async def worker(slot: int) -> None:
        for req, msg in source:
            rec = await _run_one(proto, req, msg, slot, time.perf_counter_ns())
            records.append(rec)
            on_done(rec.ok)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return records


async def _open_loop(proto, source: Iterator[tuple[BenchRequest, object]], arrivals: list[float],
                     cap: int | None, t0_ns: int, on_done: Callable[[bool], None]) -> list[RequestRecord]:
    """Send request i at t0 + arrivals[i] seconds (waiting for a free slot when `cap` are in flight)."""
    records: list[RequestRecord] = []
    sem = asyncio.Semaphore(cap) if cap else None

    async def one(req: BenchRequest, msg: object, slot: int, due: int) -> None:
        try:
            rec = await _run_one(proto, req, msg, slot, due)
        finally:
            if sem:
                sem.release()
        records.append(rec)
        on_done(rec.ok)

    tasks = []
    for i, ((req, msg), at) in enumerate(zip(source, arrivals)):
        due = t0_ns + int(at * 1e9)
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
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


FALLBACK_VOCAB = 256  # prompt ids stay below this when the server's vocab size is unknown


def _share(n: int, shard: int, shards: int) -> int:
    """Shard's part of n items dealt round-robin."""
    return n // shards + (1 if shard < n % shards else 0)


def num_shards(cfg: BenchConfig) -> int:
    """Client processes a run uses (never more than the requests that may be in flight)."""
    return max(1, min(cfg.processes, cfg.concurrency or cfg.processes))


async def probe(cfg: BenchConfig) -> tuple[ServerInfo, list[str]]:
    """Ask the server about itself; (info, notes for the report). Unreachable servers give empty info."""
    import grpc

    notes: list[str] = []
    proto = make_protocol(cfg, 1)
    try:
        server = await proto.info()
    except grpc.aio.AioRpcError as e:
        server = ServerInfo(error=f"{e.code().name}: {e.details()}")
        notes.append(f"server info unavailable ({server.error})")
    finally:
        await proto.close()
    if cfg.protocol == "kserve":
        notes.append("kserve: prompts are random words, " + ("exactly --input-len tokens of --tokenizer "
                     "(before any special tokens the server adds)" if cfg.tokenizer else "about one token per word")
                     + "; output tokens are counted as one per streamed response")
        if cfg.ignore_eos and server.inputs and not {"ignore_eos", *MIN_LENGTH_INPUTS} & set(server.inputs):
            notes.append("kserve: the model has no min_length or ignore_eos input; outputs may stop at EOS")
    if cfg.protocol == "orch" and server.vocab_size is None:
        notes.append(f"prompt token ids drawn below {FALLBACK_VOCAB} (vocab size unknown)")
    return server, notes


async def run_shard(cfg: BenchConfig, server: ServerInfo, shard: int = 0, shards: int = 1,
                    hooks: Hooks | None = None, sync: Callable[[], int] | None = None
                    ) -> tuple[list[RequestRecord], list[RequestRecord], float]:
    """One client process's part of a run: (warm-up records, measured records, CPU busy fraction).

    Shard i of n sends requests i, i+n, ... of the run's workload with its share of the concurrency;
    `sync` (multi-process runs) is called after warm-up and returns the common start time (perf_counter_ns).
    """
    hooks = hooks or Hooks()
    tok = _load_tokenizer(cfg.tokenizer)
    exclude = set(server.eos_token_ids) | {b for b in [server.bos_token_id] if b is not None and b >= 0}

    def workload(seed_offset: int) -> Workload:
        return Workload(cfg, server.vocab_size or FALLBACK_VOCAB, exclude, tok, seed_offset)

    conc = _share(cfg.concurrency, shard, shards) if cfg.concurrency else None
    peak = conc or max(1, math.ceil((cfg.request_rate or 1) / shards))
    proto = make_protocol(cfg, cfg.channels or max(1, math.ceil(peak / STREAMS_PER_CHANNEL)))
    if hasattr(proto, "inputs"):  # KServe: the model's declared inputs decide how ignore_eos is sent
        proto.inputs = list(server.inputs)
    try:
        if not server.error:
            await proto.connect(5.0)
        warmup: list[RequestRecord] = []
        n_warm = _share(cfg.warmup_requests, shard, shards)
        if n_warm:
            if sync is None:
                hooks.on_phase("warmup", cfg.warmup_requests, None)
            src = _prebuilt(proto, workload(1_000_003).take(cfg.warmup_requests)[shard::shards])
            warmup = await _closed_loop(proto, src, min(n_warm, conc or 8), hooks.on_done)
        total = cfg.total_requests()
        if sync is None:
            hooks.on_phase("bench", total, cfg.duration_s)
        if total is not None:
            src = _prebuilt(proto, workload(0).take(total)[shard::shards])
        else:
            wl = workload(7919 * shard)
            wl.count, wl.stride = shard, shards  # request indices stay unique across shards
        start = sync() if sync else time.perf_counter_ns()
        if (wait := start - time.perf_counter_ns()) > 0:
            await asyncio.sleep(wait / 1e9)
        if total is None:
            src = _until(proto, wl, start + int(cfg.duration_s * 1e9))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if cfg.request_rate is None:
            records = await _closed_loop(proto, src, conc, hooks.on_done)
        else:
            arrivals = poisson_arrivals(cfg.request_rate, random.Random(cfg.seed + 7), n=total,
                                        duration_s=cfg.duration_s)[shard::shards]
            records = await _open_loop(proto, src, arrivals, conc, start, hooks.on_done)
        busy = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    finally:
        await proto.close()
    return warmup, records, busy


BUSY_WARNING = 0.8  # client CPU seconds per second above which its own delays may show in the timings


def _finish(cfg: BenchConfig, server: ServerInfo, notes: list[str], warmup: list[RequestRecord],
            records: list[RequestRecord], busy: list[float]) -> BenchResult:
    records.sort(key=lambda r: r.index)
    cached = sum(r.server_cached_tokens or 0 for r in records)
    if cached:
        notes.append(f"{cached} prompt tokens came from the server's prefix cache (prompts of an earlier run "
                     "with the same --seed?); TTFT is then optimistic")
    if max(busy) > BUSY_WARNING:
        notes.append(f"a client process was {max(busy):.0%} busy (CPU time / wall time): its own delays may "
                     "show in the latencies; spread the load with --processes")
    if warmup and not any(r.ok for r in warmup):
        notes.append("every warm-up request failed")
    if server.max_seq_len:
        over = sum(1 for r in records if r.input_len + r.requested_output_len > server.max_seq_len)
        if over:
            notes.append(f"{over} request(s) exceed the server's max_seq_len {server.max_seq_len} "
                         "(prompt + output tokens)")
    t0 = min((r.start_ns for r in records), default=0)
    return BenchResult(cfg, summarize(cfg, records, notes, max(busy)), records, warmup, server, t0)


async def run_bench_async(cfg: BenchConfig, hooks: Hooks | None = None) -> BenchResult:
    """Warm up, then run the measured phase in this process; returns all records and their summary."""
    cfg.validate()
    server, notes = await probe(cfg)
    warmup, records, busy = await run_shard(cfg, server, hooks=hooks)
    return _finish(cfg, server, notes, warmup, records, [busy])


def _shard_process(cfg: BenchConfig, server: ServerInfo, shard: int, shards: int, q, go, start) -> None:
    """Entry point of a client process: run the shard, report progress and records through q."""
    import traceback

    def sync() -> int:
        q.put(("ready", shard))
        go.wait()
        return start.value

    try:
        hooks = Hooks(on_done=lambda ok: q.put(("done", ok)))
        q.put(("result", shard, *asyncio.run(run_shard(cfg, server, shard, shards, hooks, sync))))
    except BaseException:
        q.put(("error", shard, traceback.format_exc()))


def _run_processes(cfg: BenchConfig, hooks: Hooks, shards: int) -> BenchResult:
    """Run the benchmark in `shards` client processes that start their measured phase together."""
    import multiprocessing
    import queue as queue_mod

    from orchestrator.errors import RuntimeFailure

    server, notes = asyncio.run(probe(cfg))
    ctx = multiprocessing.get_context("spawn")
    q, go, start = ctx.Queue(), ctx.Event(), ctx.Value("q", 0)
    procs = [ctx.Process(target=_shard_process, args=(cfg, server, i, shards, q, go, start), daemon=True,
                         name=f"orch-bench-{i}") for i in range(shards)]
    for p in procs:
        p.start()
    if cfg.warmup_requests:
        hooks.on_phase("warmup", cfg.warmup_requests, None)
    ready, warmup, records, busy = 0, [], [], []
    try:
        while len(busy) < shards:
            try:
                msg = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p.name for p in procs if not p.is_alive() and p.exitcode]
                if dead:
                    raise RuntimeFailure(f"benchmark client process {dead[0]} died") from None
                continue
            if msg[0] == "done":
                hooks.on_done(msg[1])
            elif msg[0] == "ready":
                ready += 1
                if ready == shards:
                    hooks.on_phase("bench", cfg.total_requests(), cfg.duration_s)
                    start.value = time.perf_counter_ns() + 20_000_000  # all shards start together
                    go.set()
            elif msg[0] == "result":
                warmup += msg[2]
                records += msg[3]
                busy.append(msg[4])
            else:
                raise RuntimeFailure(f"benchmark client process {msg[1]} failed:\n{msg[2]}")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return _finish(cfg, server, notes, warmup, records, busy)


def run_bench(cfg: BenchConfig, hooks: Hooks | None = None) -> BenchResult:
    """Run a benchmark (in cfg.processes client processes when > 1); returns records and summary."""
    cfg.validate()
    shards = num_shards(cfg)
    if shards == 1:
        return asyncio.run(run_bench_async(cfg, hooks))
    return _run_processes(cfg, hooks or Hooks(), shards)


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
    """One config per sweep value (the request count follows the concurrency unless it was set; each
    point has its own seed, so no point's prompts hit the server's prefix cache from an earlier one)."""
    return [replace(cfg, **{key: v}, seed=cfg.seed + 1009 * i).validate() for i, v in enumerate(values)]
