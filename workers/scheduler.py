"""Continuous-batching scheduler: chunked prefill under a token budget, preemption, sampling, stop tokens.

It knows nothing of RPC: `add` and `abort` sequences, then call `step(run)` where `run` executes a
StepInput (the engine's `step`) and returns logits; `step` returns what each sequence produced.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from workers.block_manager import BlockManager
from workers.engine import SeqChunk, StepInput
from workers.sampling import Sample, sample
from workers.sequence import FinishReason, Sequence, SeqStatus

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Limits of one scheduler."""

    max_num_seqs: int = 64              # sequences running at once
    max_num_batched_tokens: int = 512   # tokens run per step (decodes first, then prefill chunks)
    max_seq_len: int = 2048             # prompt + output tokens of one sequence


@dataclass
class SeqOutput:
    """What one sequence produced in one step."""

    seq_id: int
    token_ids: list[int]
    text: str = ""          # filled where the outputs are consumed (workers.tokenizer.TextStream)
    logprobs: list[Sample] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class StepStats:
    """Counters of the last step, for metrics."""

    num_chunks: int = 0
    num_tokens: int = 0
    num_preempted: int = 0


class Scheduler:
    """Decides what runs each step, runs it through a step function and post-processes the logits."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 eos_token_ids: tuple[int, ...] | list[int] = ()) -> None:
        self.config = config
        self.bm = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self.last_stats = StepStats()
        self.num_preemptions = 0

    # --- queue management ------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (its prompt must fit max_seq_len and the KV cache)."""
        if seq.seq_id in self.seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        if seq.generator is None and not seq.params.greedy:
            seq.generator = seq.params.make_generator()
        seq.status = SeqStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a sequence now and free its blocks; None when it is unknown or already finished."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.bm.free(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- scheduling --------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first in line, to be recomputed."""
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.last_stats.num_preempted += 1
        self.waiting.appendleft(seq)
        log.debug("preempted sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick (sequence, number of tokens to run) for this step, growing block tables as needed."""
        budget = self.config.max_num_batched_tokens
        picked: list[tuple[Sequence, int]] = []
        # running sequences: decodes first, then unfinished prefills, each in admission order
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        preempted = False
        while order and budget > 0:
            seq = order.pop(0)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.can_append(seq, seq.num_computed_tokens + n):
                victim = max(order, key=self.running.index) if order else seq  # latest admitted
                if victim is not seq:
                    order.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.bm.append(seq, seq.num_computed_tokens + n)
            picked.append((seq, n))
            budget -= n
        # admit waiting sequences first-come first-served, unless memory is short right now
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            if not self.bm.allocate(seq):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            picked.append((seq, n))
            budget -= n
        return picked

    @staticmethod
    def build_step(picked: list[tuple[Sequence, int]]) -> StepInput:
        """The engine's per-step record for the picked chunks."""
        return StepInput([
            SeqChunk(
                seq_id=seq.seq_id,
                token_ids=seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n],
                start_pos=seq.num_computed_tokens,
                block_table=list(seq.block_table),
                want_logits=seq.num_computed_tokens + n == seq.num_tokens,
            )
            for seq, n in picked
        ])

    def step(self, run: Callable[[StepInput], torch.Tensor],
             on_launched: Callable[[], None] | None = None) -> list[SeqOutput]:
        """Schedule, run one engine step, sample, apply stops; returns the outputs of this step.
        `on_launched` is called once the engine has queued the step's device work, before the wait
        for its logits: host work done there overlaps the GPU's (e.g. handing out the last outputs)."""
        self.last_stats = StepStats()
        picked = self.schedule()
        if not picked:
            return []
        step = self.build_step(picked)
        self.last_stats.num_chunks = len(picked)
        self.last_stats.num_tokens = sum(n for _, n in picked)
        logits = run(step)
        if on_launched is not None:
            on_launched()
        want = []
        for (seq, n), chunk in zip(picked, step.chunks):
            seq.num_computed_tokens += n
            self.bm.mark_computed(seq)
            if chunk.want_logits:
                want.append(seq)
        if logits.shape[0] != len(want):
            raise RuntimeError(f"engine returned {logits.shape[0]} logit rows for {len(want)} sequences")
        samples = sample(logits, [s.params for s in want], [s.token_ids for s in want],
                         [s.generator for s in want])
        now = time.monotonic()
        return [self._append_token(seq, smp, now) for seq, smp in zip(want, samples)]

    # --- post-processing ----------------------------------------------------------------
    def _append_token(self, seq: Sequence, smp: Sample, now: float) -> SeqOutput:
        tok = smp.token_id
        seq.token_ids.append(tok)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        p = seq.params
        reason, stop = None, None
        if not p.ignore_eos and tok in self.eos_token_ids:
            reason, stop = FinishReason.STOP, tok
        elif tok in p.stop_token_ids:
            reason, stop = FinishReason.STOP, tok
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_seq_len:
            reason = FinishReason.LENGTH
        out = SeqOutput(
            seq_id=seq.seq_id, token_ids=[tok],
            logprobs=[smp] if (p.logprobs or p.top_logprobs) else [],
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )
        if reason is not None:
            self._finish(seq, reason, stop)
            out.finished, out.finish_reason, out.stop_reason = True, reason, stop
        return out

    def _finish(self, seq: Sequence, reason: FinishReason, stop: str | int | None) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        del self.seqs[seq.seq_id]
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop
        log.debug("sequence %d finished: %s (%s) after %d tokens", seq.seq_id, reason.value, stop,
                  seq.num_output_tokens)

