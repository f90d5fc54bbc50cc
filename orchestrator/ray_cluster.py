"""Connect to Ray: a given address, RAY_ADDRESS, the topology's, or an embedded local head.

The embedded head is a `ray start --head` process that outlives the CLI (the controller actor lives
in it); its address is recorded under ORCH_HOME (default ~/.orch) so later commands find it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import OrchError, RuntimeFailure

log = logging.getLogger(__name__)
NAMESPACE = "orch"


def orch_home() -> Path:
    return Path(os.environ.get("ORCH_HOME", Path.home() / ".orch"))


def _embedded_file() -> Path:
    return orch_home() / "embedded-ray.json"


def _reachable(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def embedded_address() -> str | None:
    """Address of the embedded head started by an earlier command, if it still runs."""
    try:
        info = json.loads(_embedded_file().read_text())
    except (OSError, ValueError):
        return None
    addr = info.get("address")
    return addr if addr and _reachable(addr) else None


def start_embedded_head() -> str:
    """Start a local Ray head in its own session (it outlives this process) and record it."""
    from workers.dist import free_port

    port = free_port()
    address = f"127.0.0.1:{port}"
    home = orch_home()
    home.mkdir(parents=True, exist_ok=True)
    # the ray CLI through this interpreter: works where Ray is importable but its script is not on PATH
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
           f"--num-cpus={max(os.cpu_count() or 1, 4)}"]
    log.info("starting an embedded local Ray head at %s", address)
    # workers at nice 0, not Ray's default 15: the serving ranks must not yield to every busy process
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")
    logf = open(home / "embedded-ray.log", "ab")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 60
    while not _reachable(address):
        if proc.poll() is not None or time.time() > deadline:
            stop_process_group(proc.pid)
            tail = (home / "embedded-ray.log").read_text(errors="replace")[-2000:]
            raise RuntimeFailure(f"could not start an embedded Ray head (log {home / 'embedded-ray.log'}): {tail}")
        time.sleep(0.2)
    time.sleep(1.0)  # let the raylet register with the GCS
    _embedded_file().write_text(json.dumps({"address": address, "pgid": proc.pid, "started": time.time()}))
    return address


def stop_process_group(pgid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process group (a `ray start --block` and everything it started), then SIGKILL."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def stop_embedded_head() -> bool:
    """Stop the embedded head recorded under ORCH_HOME; returns whether one was recorded."""
    try:
        info = json.loads(_embedded_file().read_text())
    except (OSError, ValueError):
        return False
    _embedded_file().unlink(missing_ok=True)
    if info.get("pgid"):
        stop_process_group(int(info["pgid"]), timeout=5)
    return True


@dataclass
class Connection:
    address: str
    embedded: bool


def connect(address: str | None = None, *, start: bool = True) -> Connection | None:
    """ray.init against the chosen cluster; with nothing given, the embedded head (started if asked)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    embedded = False
    if not address:
        address = embedded_address()
        embedded = True
        if address is None:
            if not start:
                return None
            address = start_embedded_head()
    if ray.is_initialized():
        return Connection(address, embedded)
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        raise RuntimeFailure(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return Connection(address, embedded)


def ray_nodes() -> list[dict]:
    """Alive Ray nodes as dicts with node_id, ip, resources and labels."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        out.append({"node_id": n["NodeID"], "ip": n["NodeManagerAddress"],
                    "resources": dict(n.get("Resources", {})), "labels": dict(n.get("Labels") or {})})
    return out


def match_nodes(topology, nodes: list[dict], device: str) -> dict[str, dict]:
    """Map each topology node name to a live Ray node; refuse, naming the node, when one is absent."""
    if not topology.nodes:
        local = nodes[0] if len(nodes) == 1 else next((n for n in nodes if n["ip"] in ("127.0.0.1",)), nodes[0])
        return {"local": local}
    mapping: dict[str, dict] = {}
    for spec in topology.nodes:
        # a node carrying the resource orch-node-<name> (set by the Helm chart / ray start) wins;
        # otherwise match the address as an IP or a `key=value` Ray node label
        cand = ([n for n in nodes if f"orch-node-{spec.name}" in n["resources"]]
                or [n for n in nodes if n["ip"] == spec.address
                    or any(f"{k}={v}" == spec.address for k, v in n["labels"].items())])
        if not cand:
            known = ", ".join(sorted(n["ip"] for n in nodes))
            raise OrchError(f"nodes.{spec.name}: no live Ray node at address {spec.address!r} (live nodes: {known})")
        node = cand[0]
        if device == "cuda" and spec.gpus and node["resources"].get("GPU", 0) < spec.gpus:
            raise OrchError(f"nodes.{spec.name}: topology lists {spec.gpus} GPUs but the Ray node at "
                            f"{node['ip']} has {int(node['resources'].get('GPU', 0))}")
        for res, amount in (getattr(spec, "resources", None) or {}).items():
            if node["resources"].get(res, 0) < amount:
                raise OrchError(f"nodes.{spec.name}: Ray node at {node['ip']} lacks resource "
                                f"{res}={amount} (has {node['resources'].get(res, 0)})")
        mapping[spec.name] = node
    return mapping
