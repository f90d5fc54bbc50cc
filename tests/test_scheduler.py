"""Scheduler: continuous batching, chunked prefill, prefix reuse, preemption and stops, driven
through the engine step contract by a paged test double whose logits depend on every cached token."""
import random

import torch

from workers.block_manager import BlockManager
from workers.engine import StepInput
from workers.sampling import SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig
from workers.sequence import FinishReason, Sequence

V = 64
BS = 4


def context_logits(ctx: list[int]) -> torch.Tensor:
    """Deterministic logits of the next token given the whole context."""
    g = torch.Generator().manual_seed(hash(tuple(ctx)) & 0x7FFFFFFF)
    return torch.randn(V, generator=g)


class PagedDouble:
    """Honours the engine step contract; its 'KV cache' stores token ids in the given slots and the
    logits are computed from what it reads back through the block table."""

    def __init__(self, num_blocks: int, block_size: int = BS):
        self.bs = block_size
        self.cache = torch.full((num_blocks * block_size,), -1, dtype=torch.long)
        self.steps: list[StepInput] = []

    def slot(self, table, p):
        return table[p // self.bs] * self.bs + p % self.bs

    def step(self, step: StepInput) -> torch.Tensor:
        self.steps.append(step)
        rows = []
        device_ids = None if step.input_ids is None else step.input_ids.tolist()   # a step run ahead
        for k, c in enumerate(step.chunks):
            assert len(c.block_table) * self.bs >= c.start_pos + len(c.token_ids)
            for i, t in enumerate(c.token_ids if device_ids is None else [device_ids[k]]):
                self.cache[self.slot(c.block_table, c.start_pos + i)] = t
            if c.want_logits:
                end = c.start_pos + len(c.token_ids)
                ctx = [int(self.cache[self.slot(c.block_table, p)]) for p in range(end)]
                assert min(ctx) >= 0, "read a slot nobody wrote"
                rows.append(context_logits(ctx))
        return torch.stack(rows) if rows else torch.empty(0, V)


def reference_greedy(prompt, max_tokens, eos=()):
    toks = list(prompt)
    for _ in range(max_tokens):
        t = int(context_logits(toks).argmax())
        toks.append(t)
        if t in eos:
            break
    return toks[len(prompt):]


def run_all(sched, model, max_steps=10_000):
    outs = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return outs
        for o in sched.step(model.step):
            outs.setdefault(o.seq_id, []).append(o)
    raise AssertionError("scheduler did not finish")


def make(num_blocks=64, **cfg):
    bm = BlockManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(**cfg), bm), PagedDouble(num_blocks), bm


def prompts(n, seed, lo=1, hi=30, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(V) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_batched_greedy_equals_each_alone_and_budget_holds():
    sched, model, bm = make(num_blocks=128, max_num_seqs=8, max_num_batched_tokens=24)
    ps = prompts(12, seed=1)
    for i, p in enumerate(ps):
        sched.add(Sequence(i, list(p), SamplingParams(max_tokens=9, ignore_eos=True)))
    outs = run_all(sched, model)
    for i, p in enumerate(ps):
        assert [t for o in outs[i] for t in o.token_ids] == reference_greedy(p, 9)
        assert outs[i][-1].finished and outs[i][-1].finish_reason is FinishReason.LENGTH
    assert all(sum(len(c.token_ids) for c in s.chunks) <= 24 for s in model.steps)
    assert max(len(s.chunks) for s in model.steps) <= 8
    assert bm.num_used_blocks == 0


def test_long_prefill_is_chunked_and_does_not_stall_decodes():
    sched, model, _ = make(num_blocks=128, max_num_batched_tokens=8)
    short, long_prompt = prompts(1, 2, 3, 4)[0], prompts(1, 3, 60, 61)[0]
    sched.add(Sequence(0, list(short), SamplingParams(max_tokens=30, ignore_eos=True)))
    got = {0: [], 1: []}
    for o in sched.step(model.step):  # seq 0 prefilled, now decoding
        got[o.seq_id] += o.token_ids
    sched.add(Sequence(1, list(long_prompt), SamplingParams(max_tokens=3, ignore_eos=True)))
    n_steps = 0
    while sched.seqs[1].num_computed_tokens < len(long_prompt):
        outs = sched.step(model.step)
        assert any(o.seq_id == 0 for o in outs), "the running decode was stalled by the prefill"
        for o in outs:
            got[o.seq_id] += o.token_ids
        n_steps += 1
    assert n_steps >= len(long_prompt) // 7  # prefill went in chunks of at most 7 tokens
    for k, v in run_all(sched, model).items():
        got[k] += [t for o in v for t in o.token_ids]
    assert got[0] == reference_greedy(short, 30)
    assert got[1] == reference_greedy(long_prompt, 3)


def test_shared_prefix_is_computed_once():
    prefix = prompts(1, 4, 12, 13)[0]
    sched, model, bm = make(num_blocks=128, max_num_batched_tokens=256)
    ps = prompts(6, seed=5, lo=1, hi=6, prefix=prefix)
    sched.add(Sequence(0, list(ps[0]), SamplingParams(max_tokens=4, ignore_eos=True)))
    run_all(sched, model)
    first_round = len(model.steps)
    for i, p in enumerate(ps[1:], 1):
        sched.add(Sequence(i, list(p), SamplingParams(max_tokens=4, ignore_eos=True)))
    outs = run_all(sched, model)
    for i, p in enumerate(ps[1:], 1):
        assert [t for o in outs[i] for t in o.token_ids] == reference_greedy(p, 4)
        assert outs[i][-1].num_cached_tokens == len(prefix)
    assert bm.hit_tokens >= 5 * len(prefix)
    second_round = [c for s in model.steps[first_round:] for c in s.chunks]
    assert all(c.start_pos >= len(prefix) for c in second_round)


def test_more_work_than_kv_capacity_preempts_and_still_matches():
    # 12 blocks of 4 = 48 token slots; 6 sequences that end at ~30 tokens each
    sched, model, bm = make(num_blocks=12, max_num_seqs=6, max_num_batched_tokens=64)
    ps = prompts(6, seed=6, lo=8, hi=14)
    for i, p in enumerate(ps):
        sched.add(Sequence(i, list(p), SamplingParams(max_tokens=16, ignore_eos=True)))
    outs = run_all(sched, model)
    assert sched.num_preemptions > 0
    for i, p in enumerate(ps):
        assert [t for o in outs[i] for t in o.token_ids] == reference_greedy(p, 16)
    assert bm.num_used_blocks == 0


def test_abort_frees_blocks_at_once():
    sched, model, bm = make(num_blocks=64)
    for i, p in enumerate(prompts(3, seed=7, lo=10, hi=20)):
        sched.add(Sequence(i, p, SamplingParams(max_tokens=50, ignore_eos=True)))
    sched.step(model.step)
    used = bm.num_used_blocks
    seq = sched.abort(1)
    assert seq.finish_reason is FinishReason.ABORT and seq.block_table == []
    assert bm.num_used_blocks < used
    assert sched.abort(1) is None
    run_all(sched, model)
    assert bm.num_used_blocks == 0


def test_stop_tokens_eos_and_ignore_eos():
    p = prompts(1, seed=8, lo=5, hi=6)[0]
    free_run = reference_greedy(p, 12)
    eos = free_run[4]
    first = free_run.index(eos)
    sched, model, _ = make()
    sched.eos_token_ids = frozenset([eos])
    sched.add(Sequence(0, list(p), SamplingParams(max_tokens=12)))
    sched.add(Sequence(1, list(p), SamplingParams(max_tokens=12, ignore_eos=True)))
    sched.add(Sequence(2, list(p), SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[eos])))
    outs = run_all(sched, model)
    got0 = [t for o in outs[0] for t in o.token_ids]
    assert got0 == free_run[:first + 1] and outs[0][-1].finish_reason is FinishReason.STOP
    assert outs[0][-1].stop_reason == eos
    assert [t for o in outs[1] for t in o.token_ids] == free_run
    assert [t for o in outs[2] for t in o.token_ids] == free_run[:first + 1]


def test_seeded_sampling_is_the_same_in_any_batch():
    ps = prompts(5, seed=9)

    def run(order):
        sched, model, _ = make(num_blocks=128, max_num_batched_tokens=16)
        for i in order:
            sched.add(Sequence(i, list(ps[i]), SamplingParams(temperature=1.0, seed=100 + i, max_tokens=10,
                                                              ignore_eos=True)))
        return {k: [t for o in v for t in o.token_ids] for k, v in run_all(sched, model).items()}

    together = run(range(5))
    alone = {i: run([i])[i] for i in range(5)}
    assert together == alone
    assert len({tuple(v) for v in together.values()}) == 5


def test_random_arrivals_aborts_and_tight_memory_keep_every_answer_exact():
    """A random mix: arrivals between steps, shared prefixes, aborts, a cache too small for the load."""
    rng = random.Random(10)
    sched, model, bm = make(num_blocks=24, max_num_seqs=6, max_num_batched_tokens=20)
    prefixes = prompts(3, seed=11, lo=8, hi=20)
    pending = []
    for i in range(40):
        p = rng.choice(prefixes)[:rng.randrange(0, 20)] + prompts(1, seed=100 + i, lo=1, hi=12)[0]
        pending.append(Sequence(i, p, SamplingParams(max_tokens=rng.randrange(1, 20), ignore_eos=True)))
    want = {s.seq_id: (list(s.token_ids), s.params.max_tokens) for s in pending}
    got, aborted, steps = {}, set(), 0
    while pending or sched.has_work():
        for _ in range(rng.randrange(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        if rng.random() < 0.05 and sched.seqs:
            victim = rng.choice(list(sched.seqs))
            sched.abort(victim)
            aborted.add(victim)
        for o in sched.step(model.step):
            got.setdefault(o.seq_id, []).extend(o.token_ids)
        steps += 1
        assert steps < 5000
    assert bm.num_used_blocks == 0 and sched.num_preemptions > 0 and bm.hit_tokens > 0
    for sid, (p, n) in want.items():
        if sid not in aborted:
            assert got[sid] == reference_greedy(p, n), sid


def test_run_ahead_overlaps_decode_steps_and_changes_no_answer():
    """Decode steps of plain-greedy batches are launched ahead (input tokens left on the device); EOS
    stops, length stops, aborts and a sampled request joining (which stops running ahead) give exactly
    the lockstep answers, and every block comes back."""
    ps = prompts(5, seed=12, lo=3, hi=9)
    eos = reference_greedy(ps[0], 20)[6]

    def run(ahead: bool):
        sched, model, bm = make(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, run_ahead=ahead)
        sched.eos_token_ids = frozenset([eos])
        for i in range(4):
            sched.add(Sequence(i, list(ps[i]), SamplingParams(max_tokens=5 + 3 * i)))
        got, ahead_steps = {}, []
        for k in range(200):
            if k == 4:
                sched.abort(3)
            if k == 9:
                sched.add(Sequence(4, list(ps[4]), SamplingParams(temperature=1.0, seed=5, max_tokens=6)))
            n = len(model.steps)
            for o in sched.step(model.step):
                got.setdefault(o.seq_id, []).extend(o.token_ids)
            ahead_steps += [s for s in model.steps[n:] if s.input_ids is not None]
            if not sched.has_work():
                break
        assert bm.num_used_blocks == 0
        return got, ahead_steps, model.steps

    lockstep, none, _ = run(False)
    got, ahead, steps = run(True)
    assert none == [] and len(ahead) >= 8
    assert got == lockstep
    assert got[0] == reference_greedy(ps[0], 5, eos=(eos,))
    for i in (1, 2):
        assert got[i] == reference_greedy(ps[i], 5 + 3 * i, eos=(eos,))
    assert all(len(c.token_ids) == 1 for s in ahead for c in s.chunks)
    # while the sampled request runs nothing is launched ahead
    sampled = [i for i, s in enumerate(steps) if any(c.seq_id == 4 for c in s.chunks)]
    assert sampled and all(steps[i].input_ids is None for i in sampled)


def test_aborting_every_sequence_of_a_step_run_ahead():
    """The only sequence is aborted while the step launched ahead for it is in flight: that step's
    outputs are dropped, nothing more runs, and its blocks are free."""
    sched, model, bm = make(num_blocks=16)
    sched.add(Sequence(0, prompts(1, seed=13, lo=6, hi=7)[0], SamplingParams(max_tokens=50, ignore_eos=True)))
    sched.step(model.step)   # prefill
    sched.step(model.step)   # a decode step, which launches the next one ahead
    assert model.steps[-1].input_ids is not None and sched.has_work()
    sched.abort(0)
    n = len(model.steps)
    assert sched.step(model.step) == [] and len(model.steps) == n
    assert not sched.has_work() and bm.num_used_blocks == 0
