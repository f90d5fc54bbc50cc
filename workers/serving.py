"""The model-facing half of a server: the engine thread, request validation, async token streams.

RPC front ends (workers/server.py for orch.v1, workers/kserve.py for KServe v2) turn wire messages
into `GenerationRequest`s, call `Serving.prepare` / `Serving.stream`, and turn `SeqOutput`s back.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from workers.block_manager import BlockManager
from workers.engine import StepInput
from workers.metrics import ServerMetrics
from workers.models.config import ModelConfig
from workers.sampling import InvalidParams, SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig, SeqOutput, StepStats
from workers.sequence import FinishReason, Sequence
from workers.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses; `code` names a grpc.StatusCode (INVALID_ARGUMENT, NOT_FOUND...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # pickles with its code (it crosses the pipe to the front-end process)
        return (RequestError, (self.code, str(self)))


@dataclass
class ModelInfo:
    """What a server serves and its limits."""

    name: str
    model_config: ModelConfig
    max_seq_len: int
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    tp: int = 1
    pp: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    aliases: tuple[str, ...] = ()


@dataclass
class GenerationRequest:
    """One validated request, ready for the scheduler."""

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    want_text: bool = True
    skip_special_tokens: bool = True


SWITCH_INTERVAL_S = 0.0005  # the process's GIL switch interval while an engine loop runs
LONG_PROMPT_CHARS = 8192  # longer text prompts are tokenized off the event loop

Sink = Callable[["SeqOutput | BaseException"], None]


class EngineLoop:
    """Runs the scheduler and the engine in one thread, stepping while there is work.

    Other threads `submit` and `abort` through a queue; each sequence's outputs go to its sink,
    called from the engine thread.
    """

    def __init__(self, scheduler: Scheduler, run_step: Callable[[StepInput], torch.Tensor],
                 metrics: ServerMetrics) -> None:
        self.scheduler = scheduler
        self.run_step = run_step
        self.metrics = metrics
        self.healthy = True
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._sinks: dict[int, Sink] = {}
        self._arrivals: dict[int, float] = {}
        self._last_token: dict[int, float] = {}
        self._seen_queried = self._seen_hits = 0
        self._ready: list[tuple[list[SeqOutput], float, StepStats]] = []   # steps whose outputs are not handed out yet
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stop = False
        self.flush_hooks: list[Callable[[], None]] = []  # called after each round of sink calls

    # --- called from any thread ---
    def start(self) -> None:
        # The engine thread shares the GIL with the other threads of its process (the pipe to the gRPC
        # front end, the metrics exporter, an in-process server's event loop). Each time it gives the GIL
        # up (every torch call, the wait for the GPU) a busy thread may keep it for a whole switch
        # interval (5 ms by default) before the engine gets it back: a shorter one bounds that stall.
        sys.setswitchinterval(float(os.environ.get("ORCH_SWITCH_INTERVAL_S", SWITCH_INTERVAL_S)))
        self._thread.start()

    def submit(self, req: GenerationRequest, sink: Sink, seq_id: int | None = None) -> int:
        """Queue a request; returns its sequence id (for abort): `seq_id`, or a fresh one. One caller
        either always passes ids (a front end's own) or never."""
        seq = Sequence(next(self._ids) if seq_id is None else seq_id, list(req.prompt_token_ids), req.params)
        self._inbox.put(("add", seq, sink))
        return seq.seq_id

    def abort(self, seq_id: int, completed: bool = False) -> None:
        """Cancel a sequence (`completed`: it ended on a stop string, found where its text is made);
        its blocks are freed before the next step."""
        self._inbox.put(("abort", seq_id, completed))

    def count_rejected(self) -> None:
        """Count a request refused before it reached the engine."""
        self.metrics.requests.labels("rejected").inc()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, abort what is left and end the thread."""
        self._inbox.put(("stop", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread ---
    def _handle(self, op: str, arg, extra) -> None:
        """One inbox item: ("add", Sequence, sink), ("abort", seq_id, completed) or ("stop", None, None)."""
        if op == "add":
            self.scheduler.add(arg)
            self._sinks[arg.seq_id] = extra
            self._arrivals[arg.seq_id] = arg.arrival_time
            self.metrics.prompt_tokens.inc(arg.num_prompt_tokens)
        elif op == "abort":
            if self.scheduler.abort(arg) is not None:
                if extra:   # completed: it ended on a stop string
                    self._count_completed(arg, time.monotonic())
                else:
                    self.metrics.requests.labels("cancelled").inc()
                    log.debug("sequence %d cancelled", arg)
            self._forget(arg)
        elif op == "stop":
            self._stop = True

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        # A step's outputs are handed out (metrics, sinks, the front end's pipe) once the next step's
        # GPU work is queued (on_launched), so that this Python work overlaps the GPU's instead of
        # adding to the engine's host time; with nothing more to run they go at once.
        while not self._stop:
            if not self.scheduler.has_work():
                self._hand_out()
            self._drain(block=not self.scheduler.has_work())
            self._update_gauges()
            if self._stop or not self.scheduler.has_work():
                continue
            try:
                outs = self.scheduler.step(self.run_step, on_launched=self._hand_out)
            except Exception as e:  # the engine failed: fail every request, keep answering
                log.exception("engine step failed")
                self.healthy = False
                self._hand_out()
                self._fail_all(e)
                self._flush()
                continue
            self._ready.append((outs, time.monotonic(), self.scheduler.last_stats))
            if not outs:  # nothing ran (e.g. no KV blocks free yet): nothing will call on_launched
                self._hand_out()
        self._hand_out()
        self._fail_all(RequestError("UNAVAILABLE", "server is shutting down"))
        self._flush()

    def _hand_out(self) -> None:
        """Deliver the finished steps' outputs, then flush them to the readers."""
        ready, self._ready = self._ready, []
        for outs, t, stats in ready:
            self._deliver(outs, t, stats)
        self._flush()

    def _flush(self) -> None:
        for hook in self.flush_hooks:
            hook()

    def _fail_all(self, err: BaseException) -> None:
        for seq_id in list(self.scheduler.seqs):
            self.scheduler.abort(seq_id)
            sink = self._sinks.get(seq_id)
            self._forget(seq_id)
            if sink is not None:
                self.metrics.requests.labels("failed").inc()
                sink(err)
        self._update_gauges()

    def _forget(self, seq_id: int) -> None:
        self._sinks.pop(seq_id, None)
        self._arrivals.pop(seq_id, None)
        self._last_token.pop(seq_id, None)

    def _deliver(self, outs: list[SeqOutput], now: float, stats: StepStats) -> None:
        """Metrics and sinks of one step's outputs (`now`: when the step finished)."""
        m = self.metrics
        m.generated_tokens.inc(sum(len(o.token_ids) for o in outs))
        for o in outs:
            sink = self._sinks.get(o.seq_id)
            prev = self._last_token.get(o.seq_id)
            if prev is None:
                m.ttft.observe(now - self._arrival(o.seq_id))
            else:
                m.itl.observe(now - prev)
            self._last_token[o.seq_id] = now
            if o.finished:
                self._count_completed(o.seq_id, now)
                self._forget(o.seq_id)
            if sink is not None:
                sink(o)
        m.preemptions.inc(stats.num_preempted)
        m.step_tokens.observe(stats.num_tokens)
        self._update_gauges()

    def _update_gauges(self) -> None:
        m, s = self.metrics, self.scheduler
        bm = s.bm
        m.queue_length.set(len(s.waiting))
        m.running.set(len(s.running))
        m.kv_used.set(bm.num_used_blocks)
        m.kv_free.set(bm.num_free_blocks)
        m.prefix_queried.inc(bm.queried_tokens - self._seen_queried)
        m.prefix_hits.inc(bm.hit_tokens - self._seen_hits)
        self._seen_queried, self._seen_hits = bm.queried_tokens, bm.hit_tokens
        m.prefix_hit_rate.set(bm.hit_rate())

    def _count_completed(self, seq_id: int, now: float) -> None:
        """Metrics of a request that ended normally (the engine stopped it, or a stop string did)."""
        self.metrics.e2e.observe(now - self._arrival(seq_id))
        self.metrics.requests.labels("completed").inc()

    def _arrival(self, seq_id: int) -> float:
        return self._arrivals.get(seq_id, time.monotonic())


class _AioDispatch:
    """Hands engine-thread outputs to asyncio queues of one event loop, one wake-up per engine step."""

    def __init__(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        self.aio_loop = aio_loop
        self._pending: list[tuple[asyncio.Queue, object]] = []  # filled by the engine thread only

    def sink(self, q: asyncio.Queue) -> Sink:
        return lambda item: self._pending.append((q, item))

    def flush(self) -> None:
        """Engine thread, after each step: deliver what the step produced."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            self.aio_loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # event loop already closed
            pass


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


class Serving:
    """Validates requests and streams their outputs to asyncio code (one per server)."""

    def __init__(self, info: ModelInfo, loop: "EngineLoop | Any", tokenizer: Tokenizer | None) -> None:
        """`loop`: the EngineLoop, or anything with its submit / abort / count_rejected / healthy /
        flush_hooks (the front end's pipe to it, workers/frontend.py)."""
        self.info = info
        self.loop = loop
        self.tokenizer = tokenizer
        self._dispatch: dict[asyncio.AbstractEventLoop, _AioDispatch] = {}

    # --- validation ---
    def check_model(self, name: str) -> None:
        """Raise NOT_FOUND unless name is empty or names the served model."""
        if name and name != self.info.name and name not in self.info.aliases:
            raise RequestError("NOT_FOUND", f"unknown model {name!r}; this server serves {self.info.name!r}")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text with the model's tokenizer."""
        if self.tokenizer is None:
            raise RequestError("FAILED_PRECONDITION", "the served model has no tokenizer.json: send token ids")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def prepare(self, *, model: str = "", prompt: str = "", prompt_token_ids: list[int] | None = None,
                params: SamplingParams, request_id: str = "", want_text: bool = True,
                skip_special_tokens: bool = True) -> GenerationRequest:
        """Check a request and turn it into a GenerationRequest; raises RequestError."""
        try:
            return self._prepare(model, prompt, prompt_token_ids, params, request_id, want_text, skip_special_tokens)
        except RequestError:
            self.loop.count_rejected()
            raise

    async def prepare_async(self, **kw) -> GenerationRequest:
        """prepare() that tokenizes long text prompts on a worker thread, off the event loop."""
        if len(kw.get("prompt") or "") < LONG_PROMPT_CHARS:
            return self.prepare(**kw)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.prepare(**kw))

    def _prepare(self, model, prompt, ids, params, request_id, want_text, skip_special) -> GenerationRequest:
        self.check_model(model)
        ids = list(ids or [])
        if prompt and ids:
            raise RequestError("INVALID_ARGUMENT", "give the prompt as text or as token ids, not both")
        if prompt:
            ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("INVALID_ARGUMENT", "empty prompt: send a non-empty prompt or prompt_token_ids")
        vocab = self.info.model_config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise RequestError("INVALID_ARGUMENT",
                                   f"prompt token id {t} at index {i} is outside the vocabulary [0, {vocab})")
        try:
            params.validate()
        except InvalidParams as e:
            raise RequestError("INVALID_ARGUMENT", str(e)) from None
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise RequestError("INVALID_ARGUMENT", f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        limit = self.info.max_seq_len
        if len(ids) + params.max_tokens > limit:
            raise RequestError("INVALID_ARGUMENT", f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                                                   f"= {len(ids) + params.max_tokens} exceeds max_seq_len {limit}")
        if not self.loop.healthy:
            raise RequestError("UNAVAILABLE", "the engine failed; see the server log")
        return GenerationRequest(ids, params, request_id or uuid.uuid4().hex, want_text, skip_special)

    # --- generation ---
    async def stream(self, req: GenerationRequest) -> AsyncIterator[list[SeqOutput]]:
        """The request's outputs as the engine produces them, in lists of everything new since the last
        yield (one output per list unless the reader falls behind); leaving early cancels the request."""
        q: asyncio.Queue = asyncio.Queue()
        text = None
        if req.want_text and self.tokenizer is not None:
            text = TextStream(self.tokenizer, req.prompt_token_ids, req.skip_special_tokens, req.params.stop)
        seq_id = self.loop.submit(req, self._dispatch_for(asyncio.get_running_loop()).sink(q))
        done = False
        try:
            while not done:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                for n, item in enumerate(items):
                    if isinstance(item, RequestError):
                        done = True
                        raise item
                    if isinstance(item, BaseException):
                        done = True
                        raise RequestError("INTERNAL", f"engine failed: {item}")
                    if text is not None:
                        item.text, stop = text.add(item.token_ids, item.finished)
                        if stop is not None:   # a stop string: the request ends here, the engine stops it
                            if not item.finished:
                                self.loop.abort(seq_id, completed=True)
                            item.finished, item.finish_reason, item.stop_reason = True, FinishReason.STOP, stop
                    if item.finished:
                        done = True
                        del items[n + 1:]
                        break
                yield items
        finally:
            if not done:
                self.loop.abort(seq_id)

    def _dispatch_for(self, aio_loop: asyncio.AbstractEventLoop) -> "_AioDispatch":
        d = self._dispatch.get(aio_loop)
        if d is None:
            d = self._dispatch[aio_loop] = _AioDispatch(aio_loop)
            self.loop.flush_hooks.append(d.flush)
        return d

    async def collect(self, req: GenerationRequest) -> list[SeqOutput]:
        """All outputs of a request, once it has finished."""
        return [o async for batch in self.stream(req) for o in batch]


def make_scheduler(info: ModelInfo, enable_prefix_caching: bool = True) -> Scheduler:
    """A scheduler with a fresh block manager sized by info."""
    bm = BlockManager(info.num_kv_blocks, info.block_size, enable_prefix_caching)
    cfg = SchedulerConfig(max_num_seqs=info.max_num_seqs, max_num_batched_tokens=info.max_num_batched_tokens,
                          max_seq_len=info.max_seq_len)
    return Scheduler(cfg, bm, info.model_config.eos_token_ids)
