"""`orch apply` on an embedded local Ray: convert, serve, idempotent re-apply, serve-only and
parallelism changes, a failing apply that leaves the previous deployment serving, status, delete."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.client import OrchClient
from orchestrator.commands.smoke import reference_tokens
from workers.dist import free_port
from workers.models.tiny import write_random_checkpoint

TOPOLOGY = """\
name: ctl-test
model:
  path: {model}
  dtype: float32
parallelism:
  tensor: {tp}
  pipeline: {pp}
device: cpu
build:
  artifacts: {artifacts}
serve:
  host: 127.0.0.1
  port: {port}
  metrics_port: {metrics_port}
  max_num_seqs: {max_num_seqs}
  max_seq_len: 256
  max_num_batched_tokens: 128
"""
PROMPT = [5, 17, 99, 3, 250, 41, 8]


def orch(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"orch {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controller")
    env = dict(os.environ, ORCH_HOME=str(tmp / "home"))
    env.pop("RAY_ADDRESS", None)
    model = write_random_checkpoint(tmp / "model", seed=7)
    params = dict(model=model, artifacts=tmp / "artifacts", port=free_port(), metrics_port=free_port(),
                  tp=1, pp=1, max_num_seqs=8)

    def topology(name: str, **over) -> Path:
        path = tmp / f"{name}.yaml"
        path.write_text(TOPOLOGY.format(**{**params, **over}))
        return path

    first = orch(env, "apply", str(topology("base")), "--json")
    result = json.loads(first.stdout)
    ref = reference_tokens(model, tmp / "ref", PROMPT, 12)
    yield {"env": env, "tmp": tmp, "topology": topology, "result": result, "ref": ref, "model": model,
           "first": first}
    orch(env, "delete", str(topology("base")), check=False)


def served_tokens(endpoint: str) -> list[int]:
    with OrchClient(endpoint, timeout=120) as c:
        return c.generate(prompt_ids=PROMPT, max_tokens=12, ignore_eos=True).token_ids


def test_apply_serves_the_reference_tokens(deployment):
    r = deployment["result"]
    assert r["ok"] and r["changed"] and r["actions"] == ["convert", "serve"]
    assert "shard rank-0-0 written (1/1)" in deployment["first"].stderr and "serving at" in deployment["first"].stderr
    assert served_tokens(r["endpoint"]) == deployment["ref"]


def test_serving_rank_runs_at_normal_priority(deployment):
    """Ray starts workers at nice 15; the rank actor and its front end must serve at nice 0."""
    import psutil

    home = deployment["env"]["ORCH_HOME"]
    ranks = [p for p in psutil.process_iter(["cmdline"])
             if any("ray::RankActor" in a for a in p.info["cmdline"] or [])
             and p.environ().get("ORCH_HOME") == home]
    assert ranks, "no RankActor process of this deployment found"
    procs = ranks + [c for r in ranks for c in r.children(recursive=True)]
    nice = {(p.pid, t.id): os.getpriority(os.PRIO_PROCESS, t.id) for p in procs for t in p.threads()}
    assert len(procs) >= 2 and set(nice.values()) == {0}, nice


def test_reapply_unchanged_is_a_noop(deployment):
    out = orch(deployment["env"], "apply", str(deployment["topology"]("base")), "--json")
    r = json.loads(out.stdout)
    assert r["ok"] and not r["changed"] and r["actions"] == []
    assert "unchanged" in out.stderr


def test_status_json_shows_ranks_and_endpoint(deployment):
    st = json.loads(orch(deployment["env"], "status", "--json").stdout)["ctl-test"]
    assert st["phase"] == "serving" and st["healthy"] is True
    assert st["endpoint"] == deployment["result"]["endpoint"]
    assert [r["rank"] for r in st["ranks"]] == [0] and st["ranks"][0]["state"] == "serving"


def test_serve_change_restarts_serving_only_and_parallelism_change_reconverts(deployment):
    env, topology = deployment["env"], deployment["topology"]
    assert "unchanged: the running deployment already matches" in orch(env, "plan", str(topology("base"))).stdout
    diff = json.loads(orch(env, "plan", str(topology("serve-change", max_num_seqs=4)), "--json").stdout)["diff"]
    assert diff["phases"] == ["serve"] and "serve.max_num_seqs" in diff["changed"]
    diff = json.loads(orch(env, "plan", str(topology("tp2", tp=2)), "--json").stdout)["diff"]
    assert diff["phases"] == ["convert", "serve"] and "tp" in diff["changed"]
    r = json.loads(orch(env, "apply", str(topology("serve-change", max_num_seqs=4)), "--json").stdout)
    assert r["ok"] and r["actions"] == ["serve"]
    assert served_tokens(r["endpoint"]) == deployment["ref"]
    out = orch(env, "apply", str(topology("tp2", tp=2)), "--json")
    r = json.loads(out.stdout)
    assert r["ok"] and r["actions"] == ["convert", "serve"]
    assert "(1/2)" in out.stderr and "(2/2)" in out.stderr  # progress per shard
    st = json.loads(orch(env, "status", "--json").stdout)["ctl-test"]
    assert st["tp"] == 2 and len(st["ranks"]) == 2
    assert served_tokens(r["endpoint"]) == deployment["ref"]
    # back to the base topology for the tests that follow
    assert json.loads(orch(env, "apply", str(topology("base")), "--json").stdout)["ok"]


def test_failed_apply_names_phase_and_keeps_previous_serving(deployment):
    tmp = deployment["tmp"]
    broken = tmp / "broken-model"
    shutil.copytree(deployment["model"], broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated: fails in the convert phase
    out = orch(deployment["env"], "apply", str(deployment["topology"]("broken", model=broken)), check=False)
    assert out.returncode == 1
    assert "convert failed on node local" in out.stderr and "model.safetensors" in out.stderr
    assert "previous deployment keeps serving" in out.stderr
    assert served_tokens(deployment["result"]["endpoint"]) == deployment["ref"]


def test_delete_tears_down_and_stops_embedded_ray(deployment):
    env = deployment["env"]
    out = orch(env, "delete", str(deployment["topology"]("base")))
    assert "deleted ctl-test" in out.stdout and "stopped the embedded Ray head" in out.stdout
    assert orch(env, "status").stdout.strip() == "nothing deployed"
    with pytest.raises(Exception):
        served_tokens(deployment["result"]["endpoint"])
