"""Continuous-batching scheduler: chunked prefill under a token budget, preemption, sampling, stop tokens.

It knows nothing of RPC: `add` and `abort` sequences, then call `step(run)` where `run` executes a
StepInput (the engine's `step`) and returns logits; `step` returns what each sequence produced.

Running ahead: when a decode step's every sequence picks its token by plain argmax and the next step
would be the same sequences again, the next step is launched before this one's tokens are read back
(its input tokens are this step's argmax, left on the device), so the host's work on a step's outputs
overlaps the GPU's next step. A sequence that turns out to have stopped (EOS, a stop token, an abort)
wastes its row of the step run ahead, which is dropped; everything else is as if run in lockstep.
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
from workers.sampling import Sample, is_plain_greedy, sample
from workers.sequence import FinishReason, Sequence, SeqStatus

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Limits of one scheduler."""

    max_num_seqs: int = 64              # sequences running at once
    max_num_batched_tokens: int = 512   # tokens run per step (decodes first, then prefill chunks)
    max_seq_len: int = 2048             # prompt + output tokens of one sequence
    run_ahead: bool = True              # launch the next decode step before reading this one's tokens


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
class _Launched:
    """A step whose device work is queued and whose logits are not read yet."""

    picked: list[tuple[Sequence, int]]
    step: StepInput
    logits: torch.Tensor
    tokens: list[int] | None = None   # its argmax, once read back (a step run ahead of it needed them)


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
        self._ahead: _Launched | None = None   # the step launched ahead, consumed by the next step()

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
        return bool(self.waiting or self.running or self._ahead)

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
        """Run one engine step (the one launched ahead by the last call, else a newly scheduled one),
        sample, apply stops; returns its outputs. `on_launched` is called once the device work is
        queued (including a step run ahead), before the wait for the logits: host work done there
        overlaps the GPU's (e.g. handing out the last outputs)."""
        self.last_stats = StepStats()
        cur, self._ahead = self._ahead, None
        if cur is None:
            picked = self.schedule()
            if not picked:
                return []
            step = self.build_step(picked)
            cur = _Launched(picked, step, run(step))
        self.last_stats.num_chunks = len(cur.picked)
        self.last_stats.num_tokens = sum(n for _, n in cur.picked)
        live = [i for i, (seq, _) in enumerate(cur.picked) if self.seqs.get(seq.seq_id) is seq]
        self._run_ahead(cur, live, run)
        if on_launched is not None:
            on_launched()
        return self._finish_step(cur, live)

    def _can_run_ahead(self, cur: _Launched, live: list[int]) -> bool:
        """Whether the step after `cur` is already known: cur is all decode, its live sequences are all
        that runs, each picks by plain argmax, nothing waits to be admitted, and blocks suffice."""
        cfg = self.config
        if not cfg.run_ahead or not live or len(live) != len(self.running) or len(live) > cfg.max_num_batched_tokens:
            return False
        if self.waiting and len(self.running) < cfg.max_num_seqs:
            return False
        if any(len(c.token_ids) != 1 or not c.want_logits for c in cur.step.chunks):
            return False
        seqs = [cur.picked[i][0] for i in live]
        if not all(is_plain_greedy(s.params) for s in seqs):
            return False
        need = sum(max(0, self.bm.blocks_for(s.num_computed_tokens + 2) - len(s.block_table)) for s in seqs)
        return need <= self.bm.num_free_blocks

    def _run_ahead(self, cur: _Launched, live: list[int], run: Callable[[StepInput], torch.Tensor]) -> None:
        """Launch the next decode step now, its inputs being cur's argmax still on the device; the
        argmax is copied back in the same stream order, before the next step's work."""
        if not self._can_run_ahead(cur, live):
            return
        dev = cur.logits.device
        rows = live if len(live) < cur.logits.shape[0] else None
        logits = cur.logits if rows is None else cur.logits[_index(rows, dev)]
        tokens = logits.argmax(dim=-1)
        host = torch.empty(len(live), dtype=torch.int64, pin_memory=dev.type == "cuda")
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event() if dev.type == "cuda" else None
        if copied is not None:
            copied.record()
        nxt, keep = [], []
        for j, i in enumerate(live):
            seq = cur.picked[i][0]
            if self._length_reached(seq, pending=1):   # cur's token ends it: the step ahead leaves it out
                continue
            self.bm.append(seq, seq.num_computed_tokens + 2)
            nxt.append((seq, 1))
            keep.append(j)
        if nxt:
            ids = tokens if len(keep) == len(live) else tokens[_index(keep, dev)]
            step = StepInput([SeqChunk(seq.seq_id, [0], seq.num_computed_tokens + 1, list(seq.block_table))
                              for seq, _ in nxt], input_ids=ids)
            self._ahead = _Launched(nxt, step, run(step))
        if copied is not None:
            copied.synchronize()
        cur.tokens = host.tolist()

    def _finish_step(self, cur: _Launched, live: list[int]) -> list[SeqOutput]:
        """Account cur's tokens, sample its live sequences' next tokens, apply stops."""
        want, rows = [], []
        row = 0
        alive = set(live) if len(live) < len(cur.picked) else None
        for i, ((seq, n), chunk) in enumerate(zip(cur.picked, cur.step.chunks)):
            if chunk.want_logits:
                row += 1
            if alive is not None and i not in alive:   # stopped or aborted since it was launched ahead: dropped
                continue
            seq.num_computed_tokens += n
            self.bm.mark_computed(seq)
            if chunk.want_logits:
                want.append(seq)
                rows.append(row - 1)
        if cur.logits.shape[0] != row:
            raise RuntimeError(f"engine returned {cur.logits.shape[0]} logit rows for {row} sequences")
        now = time.monotonic()
        if cur.tokens is not None:   # read back already (all plain greedy): the same pick as sample's
            samples = [Sample(t) for t in cur.tokens]
        elif not want:
            samples = []
        else:
            logits = cur.logits if len(rows) == row else cur.logits[_index(rows, cur.logits.device)]
            samples = sample(logits, [s.params for s in want], [s.token_ids for s in want],
                             [s.generator for s in want])
        return [self._append_token(seq, smp, now) for seq, smp in zip(want, samples)]

    # --- post-processing ----------------------------------------------------------------
    def _length_reached(self, seq: Sequence, pending: int = 0) -> bool:
        """Whether the sequence is at its length limit (max_tokens or max_seq_len), counting `pending`
        tokens sampled but not appended yet."""
        return (seq.num_output_tokens + pending >= seq.params.max_tokens
                or seq.num_tokens + pending >= self.config.max_seq_len)

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
        elif self._length_reached(seq):
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


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices on the device without waiting for it (a pinned, asynchronous copy on the GPU)."""
    t = torch.tensor(rows, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
