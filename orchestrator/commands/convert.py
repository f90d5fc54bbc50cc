"""`orch convert FILE`: convert the topology's checkpoint into per-rank TP/PP shards (locally)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HELP = """\
Convert the Hugging Face safetensors checkpoint at model.path into one shard per (tensor rank,
pipeline rank) under <build.artifacts>/shards/<key>/tp{T}-pp{P}/rank-{t}-{p}/, in model.dtype.
<key> names the checkpoint's content (sha256 of its files) and the converter version.
Streams tensor slices, so memory stays small; each shard appears atomically. Rerunning with
the same checkpoint, layout and dtype does nothing; a new layout converts only its own shards
and keeps the others (--prune deletes them).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert the checkpoint into per-rank shards", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="topology YAML file")
    p.add_argument("--force", action="store_true", help="reconvert every shard of the layout, even valid ones")
    p.add_argument("--verify", action="store_true",
                   help="re-hash existing shards' contents before reusing them (default: check manifests and sizes)")
    p.add_argument("--prune", action="store_true", help="delete this checkpoint's shards of other tp/pp layouts")
    p.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar)")
    p.set_defaults(func=run)


def convert_topology(topo, *, progress: bool = True, force: bool = False, verify: bool = False):
    """Convert a loaded Topology's checkpoint into its layout's shards; returns (root, ConvertResult).

    The shards of the layout are in <root>/tp{T}-pp{P}/ (also what `orch serve FILE` needs)."""
    from orchestrator.errors import PlanError
    from workers.convert import HASH_CACHE, convert_checkpoint, shards_root

    artifacts = topo.build.artifacts
    if "://" in artifacts:
        raise topo.error("build.artifacts", f"{artifacts!r} is a URI; converting writes shards to a local directory")
    try:
        root = shards_root(artifacts, topo.model.path)
        res = convert_checkpoint(topo.model.path, root, topo.parallelism.tensor, topo.parallelism.pipeline,
                                 topo.model.dtype, progress=progress, quantization=topo.build.quantization,
                                 force=force, verify=verify, hash_cache=Path(artifacts) / "shards" / HASH_CACHE)
    except PlanError as e:  # messages start with the topology key at fault: point at its line
        m = re.match(r"([a-z_]+\.[a-z_]+)=", str(e))
        if m:
            raise PlanError(f"{topo.where(m.group(1))}: {e}") from None
        raise
    return root, res


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from orchestrator.topology import load_topology
    from workers.convert import prune_layouts

    topo = load_topology(args.file)
    tp, pp = topo.parallelism.tensor, topo.parallelism.pipeline
    root, res = convert_topology(topo, progress=not args.json, force=args.force, verify=args.verify)
    pruned = prune_layouts(root, (tp, pp)) if args.prune else []
    if args.json:
        print(json.dumps({
            "root": str(root), "tp": tp, "pp": pp, "dtype": topo.model.dtype, "noop": res.noop,
            "shards": [str(d) for d in res], "converted": [str(d) for d in res.converted],
            "reused": [str(d) for d in res.reused], "bytes_written": res.bytes_written,
            "seconds": round(res.seconds, 3), "pruned": [str(d) for d in pruned],
        }, indent=1))
        return 0
    console = Console()
    where = root / f"tp{tp}-pp{pp}"
    if res.noop:
        console.print(f"up to date: {len(res)} shards in {where} (nothing to convert)", soft_wrap=True)
    else:
        console.print(f"converted {len(res.converted)} of {len(res)} shards "
                      f"({res.bytes_written / 1e6:.1f} MB, {res.seconds:.1f} s) into {where}", soft_wrap=True)
    for d in pruned:
        console.print(f"pruned {d}")
    return 0
