"""`orch status`: deployments, their ranks, nodes, phase, health and endpoint."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show what runs: ranks, nodes, phase, health, endpoint",
                       description="Show every deployment the controller holds: phase, health, endpoint, "
                                   "and each rank's node and state.")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the embedded head)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def current_status(address: str | None) -> dict | None:
    """The controller's status dict, or None when no cluster or controller runs."""
    import ray

    from orchestrator import ray_cluster
    from orchestrator.controller import get_controller

    if ray_cluster.connect(address, start=False) is None:
        return None
    ctl = get_controller(create=False)
    if ctl is None:
        return None
    status = ray.get(ctl.status.remote())
    for name in status:
        status[name]["healthy"] = ray.get(ctl.health.remote(name))["healthy"]
    return status


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    status = current_status(args.address) or {}
    if args.json:
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "spec"} for k, v in status.items()}, indent=1))
        return 0
    console = Console()
    if not status:
        console.print("nothing deployed")
        return 0
    for name, d in status.items():
        health = "[green]healthy[/]" if d["healthy"] else "[red]unhealthy[/]"
        console.print(f"[bold]{name}[/]: {d['phase']} ({health}) endpoint {d['endpoint']} "
                      f"device {d['device']} tp={d['tp']} pp={d['pp']}")
        if d.get("error"):
            console.print(f"  [red]error[/]: {d['error']}")
        t = Table("rank", "tp", "pp", "node", "address", "state")
        for r in d["ranks"]:
            t.add_row(str(r["rank"]), str(r["tp_rank"]), str(r["pp_rank"]), r["node"], r["node_ip"], r["state"])
        console.print(t)
    return 0
