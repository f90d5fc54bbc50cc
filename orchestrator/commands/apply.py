"""`orch apply FILE`: reconcile the cluster to the topology (convert, build, serve)."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from orchestrator.errors import RuntimeFailure

HELP = """\
Reconcile the Ray cluster to the topology: convert the checkpoint into per-rank shards on the
convert node, build one engine per shard on the node that serves it (GPU), and start the gRPC
serving mesh. Re-applying an unchanged topology changes nothing; changing only `serve` settings
restarts serving without reconverting or rebuilding. Connects to --address, RAY_ADDRESS, or
starts/uses an embedded local Ray head (kept running in the background; `orch delete` stops it).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="deploy a topology (convert, build, serve)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="topology YAML file")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local head)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def apply_file(path: str, address: str | None, console: Console) -> dict:
    """Validate, plan and apply a topology file, showing the controller's progress; returns its result."""
    import ray

    from orchestrator import ray_cluster
    from orchestrator.controller import get_controller
    from orchestrator.deploy_spec import spec_from_topology
    from orchestrator.localhost import detect_local_gpus
    from orchestrator.validation import load_and_validate

    topo, _, plan = load_and_validate(path, local_gpus=detect_local_gpus())
    conn = ray_cluster.connect(address)
    spec = spec_from_topology(topo, plan, ray_cluster.ray_nodes())
    console.print(f"[bold]orch apply[/] {topo.name}: {spec.tp * spec.pp} ranks (tp={spec.tp} pp={spec.pp}) "
                  f"on {spec.device}, Ray at {conn.address}{' (embedded)' if conn.embedded else ''}")
    ctl = get_controller()
    seen = len(ray.get(ctl.events_since.remote(0)))
    ref = ctl.apply.remote(spec.to_dict())
    while True:
        done, _ = ray.wait([ref], timeout=0.5)
        for ev in ray.get(ctl.events_since.remote(seen)):
            seen += 1
            if ev["deployment"] == spec.name:
                style = "red" if ev.get("level") == "error" else "cyan"
                console.print(f"  [{style}]{ev['phase']:>10}[/] {escape(ev['msg'])}")
        if done:
            break
    result = ray.get(ref)
    if not result["ok"]:
        still = f"; the previous deployment keeps serving at {result['endpoint']}" if result.get("endpoint") else ""
        raise RuntimeFailure(f"apply {spec.name}: {result['error']}{still}")
    if not result["changed"]:
        console.print(f"[green]unchanged[/]: {spec.name} already serving at {result['endpoint']}")
    else:
        console.print(f"[green]serving[/] {spec.name} at {result['endpoint']} ({', '.join(result['actions'])})")
    return result


def run(args: argparse.Namespace) -> int:
    import json

    result = apply_file(args.file, args.address, Console(stderr=True))
    print(json.dumps(result) if args.json else result["endpoint"])
    return 0
