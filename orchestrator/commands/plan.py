"""`orch plan FILE [--json]`: show where every rank runs and how its memory is spent."""
from __future__ import annotations

import argparse
import json
import os

from orchestrator.commands.validate import SHAPE_ONLY_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `orch plan`."""
    p = sub.add_parser("plan", help="show the placement and memory plan of a topology",
                       description="Validate a topology and print its plan: rank -> node/GPU, the converting node, "
                       "layer ranges per pipeline stage, per-GPU memory (weights, activations, KV cache) and the "
                       "resulting concurrent-token capacity. The plan has a content hash.",
                       epilog="Exit codes: 0 ok, 2 invalid input (including a model that does not fit), "
                       "1 runtime failure. Memory figures are estimates; see orchestrator/plan.py.")
    p.add_argument("file", metavar="FILE", help="topology YAML file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (with content_hash)")
    p.add_argument("--shape-only", action="store_true", help=SHAPE_ONLY_HELP)
    p.add_argument("--address", help="Ray cluster to diff against (default: RAY_ADDRESS, else the embedded head "
                   "if one runs); with no cluster running the diff says everything would be created")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate, plan and print."""
    from orchestrator.localhost import detect_local_gpus
    from orchestrator.validation import load_and_validate

    topo, _, plan = load_and_validate(args.file, shape_only=args.shape_only, local_gpus=detect_local_gpus())
    diff = None if args.shape_only else running_diff(topo, plan, args.address)
    if args.json:
        print(json.dumps({**plan.to_dict(), **({"diff": diff} if diff else {})}, indent=2, sort_keys=True))
    else:
        from rich.console import Console

        console = Console()
        console.print(plan.render_table())
        if diff:
            if not diff["running"]:
                console.print(f"not deployed: apply would run {', '.join(diff['phases'])}")
            elif not diff["phases"]:
                console.print("unchanged: the running deployment already matches")
            else:
                console.print(f"changes against what runs: {', '.join(diff['changed'])}; "
                              f"apply would run {', '.join(diff['phases'])}")
    return 0


def running_diff(topo, plan, address: str | None) -> dict | None:
    """The diff against the deployment of the same name, when a cluster with a controller is reachable."""
    from orchestrator import ray_cluster

    if not (address or os.environ.get("RAY_ADDRESS") or ray_cluster.embedded_address()):
        return None
    import ray

    from orchestrator.controller import get_controller
    from orchestrator.deploy_spec import DeploymentSpec, diff_specs, spec_from_topology

    ray_cluster.connect(address, start=False)
    ctl = get_controller(create=False)
    status = ray.get(ctl.status.remote()) if ctl else {}
    running = status.get(topo.name)
    new = spec_from_topology(topo, plan, ray_cluster.ray_nodes())
    return diff_specs(DeploymentSpec.from_dict(running["spec"]) if running else None, new)
