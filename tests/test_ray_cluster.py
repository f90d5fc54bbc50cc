"""Mapping topology nodes onto live Ray nodes: by orch-node-<name> resource, IP or label; refusals name the node."""
from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.errors import OrchError
from orchestrator.ray_cluster import match_nodes
from orchestrator.topology import parse_topology

TOPO = """\
name: t
model: {path: /nonexistent}
parallelism: {tensor: 2, pipeline: 1}
device: cuda
nodes:
  - {name: gpu-a, address: 10.1.0.5, gpus: 2}
  - {name: gpu-b, address: "zone=b", gpus: 2, resources: {fast-nic: 1}}
  - {name: big, address: 10.1.0.9, gpus: 0, roles: [convert]}
"""


def node(ip, gpus=0, labels=None, **res):
    return {"node_id": f"id-{ip}", "ip": ip, "labels": labels or {}, "resources": {"CPU": 8, "GPU": gpus, **res}}


def topo():
    return parse_topology(TOPO, "c.yaml")


def test_nodes_match_by_ip_label_and_orch_resource():
    nodes = [node("10.1.0.9"), node("10.1.0.7", 2, {"zone": "b"}, **{"fast-nic": 1}), node("10.1.0.5", 2),
             node("10.1.0.6", 2, **{"orch-node-gpu-a": 1})]
    m = match_nodes(topo(), nodes, "cuda")
    # the orch-node-<name> resource (set by the Helm chart) wins over an IP match
    assert {k: v["ip"] for k, v in m.items()} == {"gpu-a": "10.1.0.6", "gpu-b": "10.1.0.7", "big": "10.1.0.9"}


def test_absent_node_is_refused_by_name():
    with pytest.raises(OrchError, match=r"nodes.gpu-b: no live Ray node at address 'zone=b'"):
        match_nodes(topo(), [node("10.1.0.9"), node("10.1.0.5", 2)], "cuda")


def test_missing_gpus_and_resources_are_refused_by_name():
    with pytest.raises(OrchError, match=r"nodes.gpu-a: topology lists 2 GPUs but the Ray node at 10.1.0.5 has 1"):
        match_nodes(topo(), [node("10.1.0.9"), node("10.1.0.5", 1), node("10.1.0.7", 2, {"zone": "b"})], "cuda")
    with pytest.raises(OrchError, match=r"nodes.gpu-b: Ray node at 10.1.0.7 lacks resource fast-nic=1"):
        match_nodes(topo(), [node("10.1.0.9"), node("10.1.0.5", 2), node("10.1.0.7", 2, {"zone": "b"})], "cuda")


PRIORITY_CHECK = """
import os, threading
from workers.rank import serve_at_normal_priority
os.nice(7)                                    # this thread; the one started next inherits it
ready, done = threading.Event(), threading.Event()
t = threading.Thread(target=lambda: (ready.set(), done.wait())); t.start(); ready.wait()
tids = [int(x) for x in os.listdir("/proc/self/task")]
before = [os.getpriority(os.PRIO_PROCESS, i) for i in tids]
serve_at_normal_priority()
after = [os.getpriority(os.PRIO_PROCESS, i) for i in tids]
done.set(); t.join()
print(before, after)
assert len(tids) >= 2 and max(before) == 7 and after == [0] * len(tids)
"""


def test_serving_threads_are_reset_to_nice_zero():
    """Ray workers run at nice 15; a rank resets every thread (Linux keeps nice per thread)."""
    probe = subprocess.run([sys.executable, "-c", "import os; os.nice(1); os.setpriority(os.PRIO_PROCESS, 0, 0)"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("lowering a nice value needs CAP_SYS_NICE here")
    out = subprocess.run([sys.executable, "-c", PRIORITY_CHECK], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
