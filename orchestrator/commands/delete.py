"""`orch delete FILE`: tear a deployment down and free its GPUs."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("delete", help="tear a deployment down",
                       description="Stop every rank of the topology's deployment and free its GPUs and ports. "
                                   "When the embedded local Ray head holds nothing else, it is stopped too.")
    p.add_argument("file", help="topology YAML file (its `name` picks the deployment)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the embedded head)")
    p.set_defaults(func=run)


def delete_deployment(name: str, address: str | None) -> bool:
    """Tear down deployment `name`; stop the embedded head when it holds nothing else. Returns deleted?"""
    import ray

    from orchestrator import ray_cluster
    from orchestrator.controller import get_controller

    conn = ray_cluster.connect(address, start=False)
    ctl = get_controller(create=False) if conn else None
    deleted = bool(ctl) and ray.get(ctl.delete.remote(name))["deleted"]
    if conn and conn.embedded and ctl and not ray.get(ctl.status.remote()):
        ray.kill(ctl)
        ray.shutdown()
        ray_cluster.stop_embedded_head()
        print("stopped the embedded Ray head")
    return deleted


def run(args: argparse.Namespace) -> int:
    from orchestrator.topology import load_topology

    topo = load_topology(args.file)
    deleted = delete_deployment(topo.name, args.address)
    print(f"deleted {topo.name}" if deleted else f"{topo.name}: nothing deployed")
    return 0
