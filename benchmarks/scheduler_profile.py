"""Profile one serving engine thread without gRPC: 64 sequences through Scheduler + Engine on a device.

python benchmarks/scheduler_profile.py --device cuda   (prints ms/step split into engine and the rest)
"""
import argparse
import cProfile
import pstats
import random
import tempfile
import time
from pathlib import Path

import torch

from workers.block_manager import BlockManager
from workers.convert import convert_checkpoint
from workers.engine import Engine
from workers.models.tiny import write_random_checkpoint
from workers.sampling import SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig
from workers.sequence import Sequence
from workers.tokenizer import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cpu")
ap.add_argument("--seqs", type=int, default=64)
ap.add_argument("--big", action="store_true", help="~1.1B Llama shape instead of the tiny default")
args = ap.parse_args()
work = Path(tempfile.mkdtemp())
shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=32000) if args.big else {}
m = write_random_checkpoint(work / "m", **shape)
convert_checkpoint(m, work / "s", 1, 1, "bfloat16" if args.device == "cuda" else "float32")
engine = Engine(work / "s" / "tp1-pp1", device=args.device, num_kv_blocks=4097, block_size=16)
tok = Tokenizer(m)
V = engine.model_config.vocab_size
engine_s = [0.0]


def run(step):
    t = time.perf_counter()
    out = engine.step(step)
    if out.is_cuda:
        torch.cuda.synchronize()
    engine_s[0] += time.perf_counter() - t
    return out


def batch(n_tokens):
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_seq_len=1024),
                      BlockManager(4097, 16))
    rng = random.Random(0)
    for i in range(args.seqs):
        p = [rng.randrange(3, V) for _ in range(128)]
        s = Sequence(i, p, SamplingParams(max_tokens=n_tokens, ignore_eos=True))
        s.detokenizer = tok.detokenizer(p)
        sched.add(s)
    return sched


sched = batch(64)  # warm-up: graphs, allocator
while sched.has_work():
    sched.step(run)
sched = batch(128)
sched.step(run)  # prefill
engine_s[0] = 0.0
n, t0 = 0, time.perf_counter()
prof = cProfile.Profile()
prof.enable()
while sched.has_work():
    sched.step(run)
    n += 1
prof.disable()
total = time.perf_counter() - t0
print(f"{n} decode steps of {args.seqs} seqs: {total / n * 1e3:.2f} ms/step, engine.step {engine_s[0] / n * 1e3:.2f} ms, "
      f"rest {(total - engine_s[0]) / n * 1e3:.2f} ms (profiled)")
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
