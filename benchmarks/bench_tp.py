"""Tensor-parallel decode on the GPUs of one host: the Llama-3.1-8B shape with random bf16 weights split
over --tp ranks (one GPU each, NCCL). Each rank writes its random shard, builds its engine on its own GPU
and starts through workers.engine.run_rank, as a served rank does; the driver times batch-1 decode and
ISL/OSL 128/128 throughput through engine.step while the other ranks follow each step. Decode steps run
under CUDA graphs that hold the NCCL all-reduces. Result JSON as bench_decode's.

    python benchmarks/bench_tp.py --tp 2 --out results.json [--batches 1,64,256]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import BLOCK_SIZE, run_workload, write_random_shard  # noqa: E402

log = logging.getLogger("bench_tp")


def _rank(rank: int, args: argparse.Namespace, init: str) -> None:
    from workers.build import build_engine
    from workers.engine import run_rank

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(message)s")
    torch.cuda.set_device(rank)
    work = Path(args.work)
    shard = work / f"shard-tp{args.tp}-rank{rank}"
    t0 = time.perf_counter()
    if not (shard / "manifest.json").is_file():
        write_random_shard(shard, seed=rank, tp=args.tp, tp_rank=rank)
    t1 = time.perf_counter()
    engine_dir = build_engine(shard, work / "engines")
    t2 = time.perf_counter()
    engine = run_rank(str(engine_dir), rank, args.tp, args.tp, 1, init, device=f"cuda:{rank}",
                      num_kv_blocks=args.kv_blocks, block_size=BLOCK_SIZE)
    if engine is None:   # a follower: served every step until the driver shut down
        return
    m: dict = {"write_random_shard_s": round(t1 - t0, 2), "build_8b_rank0_s": round(t2 - t1, 2)}
    for b in (int(x) for x in args.batches.split(",")):
        osl = args.bs1_steps + 1 if b == 1 else 128
        r = run_workload(engine, b, 128, osl, budget_s=args.budget_s)
        key = f"tp{args.tp}_bs{b}"
        m[f"{key}_decode_tok_s"] = round(b * r["decode_steps"] / r["decode_s"], 1)
        m[f"{key}_decode_step_wall_ms"] = round(1e3 * r["decode_s"] / max(1, r["decode_steps"]), 3)
        if b > 1:
            m[f"{key}_isl128_osl128_tok_s"] = round(r["output_tokens"] / (r["prefill_s"] + r["decode_s"]), 1)
        log.info("%s: %s", key, {k: v for k, v in m.items() if k.startswith(key)})
    m["decode_graphs_captured"] = sorted(engine.decode_graphs.graphs) if engine.decode_graphs else []
    engine.shutdown()
    result = {"name": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": f"{args.tp} x {torch.cuda.get_device_name()}", "command": " ".join(["python", *sys.argv]),
              "metrics": m,
              "notes": [f"tensor parallel over {args.tp} GPUs of one host, NCCL; steps broadcast to the other "
                        "ranks, so each step's tokens are read back before the next (lockstep)"]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--name", default="decode_8b_tp")
    p.add_argument("--tp", type=int, default=2, help="ranks, one GPU each")
    p.add_argument("--batches", default="1,64", help="decode batch sizes (1: batch-1 decode; others: 128/128)")
    p.add_argument("--bs1-steps", type=int, default=256, help="timed batch-1 decode steps")
    p.add_argument("--budget-s", type=float, default=20.0, help="decode seconds per run at most")
    p.add_argument("--kv-blocks", type=int, default=4096, help="KV blocks of 16 tokens per rank (same on all)")
    p.add_argument("--work", default="/tmp/bench_tp", help="scratch dir for the random shards and engines")
    args = p.parse_args(argv)
    if torch.cuda.device_count() < args.tp:
        p.error(f"--tp {args.tp} needs {args.tp} GPUs; this host has {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    from workers.dist import free_port

    mp.spawn(_rank, args=(args, f"tcp://127.0.0.1:{free_port()}"), nprocs=args.tp, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
