"""`orch apply` across a real multi-node Ray cluster on this machine: a head (convert role) in the
root network namespace and two worker nodes, each in its own namespace with its own address and
its own artifact store (no shared filesystem), running TP2 x PP2 over gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.client import OrchClient
from orchestrator.commands.smoke import reference_tokens
from tests.fixtures.netns_cluster import NetnsCluster, netns_permitted
from workers.models.tiny import write_random_checkpoint

PROMPT = [11, 200, 7, 42, 301, 5, 77, 19, 64]


def topology(model, artifacts, nodes, port) -> str:
    # namespaced nodes are addressed by IP; loopback nodes (all 127.0.0.1) by their orch-node-<name> resource
    head, a, b = (n if n.netns or n.name == "head" and n.ip != "127.0.0.1" else
                  type(n)(n.name, f"orch-node-{n.name}", n.resources, n.netns, n.store) for n in nodes)
    return f"""\
name: mn-test
model:
  path: {model}
  dtype: float32
parallelism:
  tensor: 2
  pipeline: 2
device: cpu
nodes:
  - name: head
    address: {head.ip}
    roles: [convert]
    memory_gb: 16
  - name: worker-a
    address: {a.ip}
    gpus: 2
    roles: [serve]
    resources: {{fakegpu: 2}}
  - name: worker-b
    address: {b.ip}
    gpus: 2
    roles: [serve]
    resources: {{fakegpu: 2}}
build:
  artifacts: {artifacts}
serve:
  host: 0.0.0.0
  port: {port}
  max_num_seqs: 8
  max_seq_len: 256
  max_num_batched_tokens: 128
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    namespaces = netns_permitted() and not os.environ.get("ORCH_TEST_NO_NETNS")
    if not namespaces:
        print("network namespaces not permitted here: separate ray nodes on loopback instead")
    c = NetnsCluster(tmp / "cluster", [("worker-a", {"fakegpu": 2}), ("worker-b", {"fakegpu": 2})],
                     head_resources={"bigmem": 1}, namespaces=namespaces, port=6390 if namespaces else 6391)
    c.start()
    yield tmp, c
    c.stop()


def test_tp2_pp2_across_nodes_matches_single_process(cluster):
    tmp, c = cluster
    model = write_random_checkpoint(tmp / "model", seed=3)
    path = tmp / "mn.yaml"
    path.write_text(topology(model, tmp / "artifacts", c.nodes, 50000 + os.getpid() % 10000))
    env = dict(os.environ, ORCH_HOME=str(tmp / "home"))
    cmd = [sys.executable, "-m", "orchestrator", "apply", str(path), "--address", c.address, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["actions"] == ["convert", "serve"]
    # conversion ran on the convert node, shards were pulled into each worker's own store
    assert "on node head" in out.stderr and "pulled" in out.stderr
    for node in c.nodes[1:]:
        assert list(node.store.rglob("manifest.json")), f"no shard arrived in {node.store}"
    st = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--json", "--address", c.address],
                        capture_output=True, text=True, env=env, timeout=120)
    ranks = json.loads(st.stdout)["mn-test"]["ranks"]
    placed = {(r["tp_rank"], r["pp_rank"]): r["node"] for r in ranks}
    assert placed == {(0, 0): "worker-a", (1, 0): "worker-a", (0, 1): "worker-b", (1, 1): "worker-b"}
    if c.namespaces:  # each node has its own address
        a, b = c.nodes[1], c.nodes[2]
        assert {r["rank"]: r["node_ip"] for r in ranks} == {0: a.ip, 1: a.ip, 2: b.ip, 3: b.ip}
        assert result["endpoint"].startswith(a.ip + ":")
    # where each rank actually runs: the Ray node carrying that node's orch-node-<name> resource
    assert {r["rank"]: r["running_on"] for r in ranks} == {
        0: c.node_ids["worker-a"], 1: c.node_ids["worker-a"], 2: c.node_ids["worker-b"], 3: c.node_ids["worker-b"]}
    with OrchClient(result["endpoint"], timeout=300) as client:
        served = client.generate(prompt_ids=PROMPT, max_tokens=16, ignore_eos=True).token_ids
    assert served == reference_tokens(model, tmp, PROMPT, 16)
    down = subprocess.run([sys.executable, "-m", "orchestrator", "delete", str(path), "--address", c.address],
                          capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0 and "deleted mn-test" in down.stdout
