"""`orch build FILE`: build the GPU engine of every converted shard of the topology on this machine."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = """\
For each converted shard of the topology's layout (run `orch convert FILE` first), compile the CUDA
kernels for this machine's GPU with NVRTC, tune their launch choices for the model's shapes, and write
an engine directory under <build.artifacts>/engines/<key>/: the shard's files (hard-linked), the
cubins, tuning.json and engine.json, which pins the GPU name and architecture, CUDA runtime and
driver, NVRTC, CuPy, torch and orch versions. <key> covers the shard's content hash, that stack and
the kernel sources, so an unchanged build is skipped. Batch size, sequence length and KV-cache
size are runtime settings: changing them needs no rebuild. `orch apply` builds on each serving
node by itself; this command builds locally, on the current GPU.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build GPU engines for the converted shards", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="topology YAML file")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date engine exists")
    p.add_argument("--no-tune", action="store_true", help="skip launch tuning (default choices)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from orchestrator.errors import CheckpointError
    from orchestrator.topology import load_topology
    from workers.build import build_engine
    from workers.convert import shards_root

    topo = load_topology(args.file)
    tp, pp = topo.parallelism.tensor, topo.parallelism.pipeline
    artifacts = Path(topo.build.artifacts)
    layout = shards_root(artifacts, topo.model.path) / f"tp{tp}-pp{pp}"
    ranks = sorted(layout.glob("rank-*-*")) if layout.is_dir() else []
    if len(ranks) != tp * pp:
        raise CheckpointError(f"{args.file}: {len(ranks)} of {tp * pp} converted shards found in {layout}; "
                              f"run `orch convert {args.file}` first")
    console = Console(quiet=args.json)
    out, t0 = [], time.perf_counter()
    for rank_dir in ranks:
        eng = build_engine(rank_dir, artifacts / "engines", force=args.force, tune=not args.no_tune,
                           progress=lambda msg, r=rank_dir.name: console.print(f"[{r}] {msg}", soft_wrap=True))
        out.append({"shard": str(rank_dir), "engine": str(eng)})
    if args.json:
        print(json.dumps({"engines": out, "seconds": round(time.perf_counter() - t0, 3)}, indent=1))
    else:
        console.print(f"{len(out)} engine(s) ready in {time.perf_counter() - t0:.1f} s")
    return 0
