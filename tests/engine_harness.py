"""Helpers for engine tests: random transformers models, shards, a scheduling scenario, multi-rank runs.

Importable by spawned rank processes: nothing heavy (transformers) at module level.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.models.tiny import tiny_config

# name -> (family, config overrides): the four models the issue asks for.
MODELS = {
    "llama_gqa_rope3": ("llama", {"num_key_value_heads": 2, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "mistral_window": ("mistral", {"sliding_window": 16}),
    "qwen2_bias": ("qwen2", {"vocab_size": 509}),
}


def make_hf_model(out_dir: Path, name: str, seed: int = 0):
    """Build model `name` with transformers, give it well-scaled random weights, save it; return it."""
    import transformers

    family, overrides = MODELS[name]
    raw = tiny_config(family, **overrides)
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
    cfg = cfg_cls(**raw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def write_shards(model_dir: Path, out_root: Path, tp: int, pp: int) -> Path:
    """Convert model_dir for tp x pp into out_root; returns the tp{T}-pp{P} directory."""
    from workers.convert import convert_checkpoint

    return Path(convert_checkpoint(model_dir, out_root, tp, pp, "float32")[0]).parent


# --- a small scheduler: sequences join, prefill in chunks, decode greedily, leave --------------------

@dataclass
class SeqSpec:
    arrival: int          # step at which the sequence joins
    prompt_len: int
    max_new: int          # greedy tokens to generate
    chunk: int            # prefill chunk size


SCENARIO = [SeqSpec(0, 5, 32, 8), SeqSpec(0, 19, 10, 8), SeqSpec(0, 1, 32, 8), SeqSpec(2, 33, 20, 8),
            SeqSpec(4, 9, 32, 4), SeqSpec(11, 24, 6, 16), SeqSpec(13, 2, 12, 8)]


@dataclass
class _Seq:
    spec: SeqSpec
    prompt: list[int]
    blocks: list[int] = field(default_factory=list)
    done: int = 0                                  # tokens in the KV cache
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def run_scenario(engine, vocab: int, seed: int = 0, specs: list[SeqSpec] = SCENARIO) -> dict:
    """Drive `engine` (the driver) through a mixed prefill/decode schedule over a shuffled block pool.

    Returns {"prompts", "generated", "logits" (per sequence: one row per logits step), "step_times"}.
    """
    from workers.engine import SeqChunk, StepInput

    rng = random.Random(seed)
    bs = engine.block_size
    free = list(range(engine.num_kv_blocks))
    rng.shuffle(free)
    seqs = {i: _Seq(s, [rng.randrange(vocab) for _ in range(s.prompt_len)]) for i, s in enumerate(specs)}
    active: list[int] = []
    finished: list[int] = []
    times = []
    step_no = 0
    while len(finished) < len(seqs):
        active += [i for i, s in seqs.items() if s.spec.arrival == step_no]
        chunks = []
        for i in active:
            s = seqs[i]
            if s.done < len(s.prompt):
                toks = s.prompt[s.done: s.done + s.spec.chunk]
                want = s.done + len(toks) == len(s.prompt)
            else:
                toks, want = [s.generated[-1]], True
            while len(s.blocks) * bs < s.done + len(toks):
                s.blocks.append(free.pop())
            chunks.append(SeqChunk(i, toks, s.done, list(s.blocks), want))
        rng.shuffle(chunks)  # decode and prefill chunks interleaved in any order
        t0 = time.perf_counter()
        out = engine.step(StepInput(chunks)) if chunks else None
        times.append(time.perf_counter() - t0)
        rows = iter(out) if out is not None else iter(())
        for c in chunks:
            s = seqs[c.seq_id]
            s.done += len(c.token_ids)
            if c.want_logits:
                row = next(rows)
                s.logits.append(row.cpu())
                s.generated.append(int(row.argmax()))
                if len(s.generated) == s.spec.max_new:
                    active.remove(c.seq_id)
                    finished.append(c.seq_id)
                    free.extend(reversed(s.blocks))  # freed blocks are reused first
        step_no += 1
    return {"prompts": [seqs[i].prompt for i in seqs], "generated": [seqs[i].generated for i in seqs],
            "logits": [torch.stack(seqs[i].logits) for i in seqs], "step_times": times}


def compare_with_reference(result: dict, hf_model) -> tuple[float, int]:
    """Check every logits row against transformers (full recompute per sequence).

    Returns (worst relative error, number of rows compared); asserts greedy tokens agree."""
    worst, rows = 0.0, 0
    for prompt, gen, ours in zip(result["prompts"], result["generated"], result["logits"]):
        full = torch.tensor([prompt + gen[:-1]])
        with torch.no_grad():
            ref = hf_model(full).logits[0, len(prompt) - 1:].float()
        assert ref.shape == ours.shape, (ref.shape, ours.shape)
        err = ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        worst = max(worst, err)
        assert ref.argmax(-1).tolist() == gen, "greedy tokens differ from transformers"
        rows += len(gen)
    return worst, rows


# --- multi-process ranks -----------------------------------------------------------------------------

def _rank_main(rank: int, world: int, tp: int, pp: int, init_method: str, jobs: list[tuple[str, int]],
               out_path: str, num_kv_blocks: int, block_size: int, device: str, ops: str | None) -> None:
    """One rank: join the group once, then load and run each (shard_dir, vocab) job in turn.
    On "cuda" rank r uses GPU r and NCCL for compute; ops "cpu": the reference ops (plain torch) on
    the GPU, None: the device's own (the CUDA kernels, decode under CUDA graphs where the engine uses
    them). Each result records whether the driver's decode steps ran under CUDA graphs ("graphs")."""
    torch.set_num_threads(1)
    from workers.dist import DistContext
    from workers.engine import Engine

    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    ctx = DistContext.init(rank, world, tp, pp, init_method, backend, timeout_s=120)
    results = []
    try:
        for shard_dir, vocab in jobs:
            engine = Engine(shard_dir, num_kv_blocks=num_kv_blocks, block_size=block_size, dist=ctx,
                            device=device, ops=ops)
            if ctx.is_driver:
                results.append(run_scenario(engine, vocab))
                results[-1]["graphs"] = bool(engine.decode_graphs is not None and engine.decode_graphs.graphs)
                engine.shutdown(close_dist=False)
            else:
                engine.serve_forever()
        if ctx.is_driver:
            torch.save(results, out_path)
    except BaseException:
        import traceback

        traceback.print_exc()   # now: leaving the group may block after a failure (NCCL)
        raise
    finally:
        ctx.close()


def _run_rank_main(rank: int, world: int, tp: int, pp: int, init_method: str, shard_dir: str, vocab: int,
                   out_path: str, num_kv_blocks: int, block_size: int) -> None:
    """One rank started the way servers start them: workers.engine.run_rank."""
    torch.set_num_threads(1)
    from workers.engine import run_rank

    engine = run_rank(shard_dir, rank, world, tp, pp, init_method, num_kv_blocks=num_kv_blocks,
                      block_size=block_size)
    if engine is not None:
        from workers.engine import SeqChunk, StepInput

        result = run_scenario(engine, vocab, specs=SCENARIO[:3])
        # one step too big for a single control broadcast: 4 prompts of LONG_PROMPT tokens
        gen = torch.Generator().manual_seed(5)
        prompts = [torch.randint(0, vocab, (LONG_PROMPT,), generator=gen).tolist() for _ in range(4)]
        per = -(-LONG_PROMPT // block_size)
        chunks = [SeqChunk(i, p, 0, list(range(i * per, (i + 1) * per))) for i, p in enumerate(prompts)]
        result["long"] = (prompts, engine.step(StepInput(chunks)))
        engine.shutdown()
        torch.save([result], out_path)


LONG_PROMPT = 1000


def _spawn(fn, args: tuple, world: int, timeout_s: float) -> None:
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def run_ranks(jobs: list[tuple[str, int]], tp: int, pp: int, out_path: Path, num_kv_blocks: int = 64,
              block_size: int = 4, timeout_s: float = 120.0, device: str = "cpu", ops: str | None = "cpu") -> list[dict]:
    """Run the scenario for each job on tp*pp processes sharing one group (gloo on CPU, NCCL on GPUs);
    returns the driver's results per job. ops: see _rank_main."""
    from workers.dist import free_port

    init = f"tcp://127.0.0.1:{free_port()}"
    _spawn(_rank_main, (tp * pp, tp, pp, init, jobs, str(out_path), num_kv_blocks, block_size, device, ops),
           tp * pp, timeout_s)
    return torch.load(out_path)


def run_ranks_via_run_rank(shard_dir: str, vocab: int, tp: int, pp: int, out_path: Path, num_kv_blocks: int = 64,
                           block_size: int = 4, timeout_s: float = 120.0) -> dict:
    """A short scenario on ranks started by run_rank (followers exit when the driver shuts down)."""
    from workers.dist import free_port

    init = f"tcp://127.0.0.1:{free_port()}"
    _spawn(_run_rank_main, (tp * pp, tp, pp, init, shard_dir, vocab, str(out_path), num_kv_blocks, block_size),
           tp * pp, timeout_s)
    return torch.load(out_path)[0]


def _mismatched_main(rank: int, init_method: str, shard_dir: str, out_path: str) -> None:
    """pp=2 ranks whose KV caches disagree (64 vs 8 blocks): the follower fails on a high block id."""
    torch.set_num_threads(1)
    from workers.engine import SeqChunk, StepInput, run_rank

    try:
        engine = run_rank(shard_dir, rank, 2, 1, 2, init_method, num_kv_blocks=64 if rank == 0 else 8,
                          block_size=4)
    except IndexError as e:  # the follower: run_rank has left the group on its way out
        torch.save(f"follower: {e!r}", out_path + ".follower")
        return
    engine.step(StepInput([SeqChunk(0, [1, 2, 3], 0, [1])]))
    try:
        engine.step(StepInput([SeqChunk(0, [1, 2, 3], 0, [40])]))
        outcome = "returned"
    except RuntimeError as e:
        outcome = f"raised: {e}"
    torch.save(outcome, out_path)


def follower_failure_outcome(shard_dir: str, out_path: Path, timeout_s: float = 60.0) -> tuple[str, str]:
    """(driver, follower) outcomes when the follower fails mid-step: "raised: ..." or "returned"."""
    from workers.dist import free_port

    _spawn(_mismatched_main, (f"tcp://127.0.0.1:{free_port()}", shard_dir, str(out_path)), 2, timeout_s)
    return torch.load(out_path), torch.load(str(out_path) + ".follower")
