"""The Ray controller: a detached named actor that reconciles the cluster to a DeploymentSpec.

Phases: convert (Ray task on the convert-role node) -> distribute (shards pulled to each serving
node, verified by hash) -> build (per shard, on the node that serves it; GPU only) -> serve (rank
actors in placement groups forming one torch.distributed group; rank 0 runs the gRPC front end).
A failure names the phase, node and rank, and leaves the previous deployment serving.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from orchestrator.deploy_spec import DeploymentSpec, RankSpec

log = logging.getLogger(__name__)
CONTROLLER_NAME = "orch-controller"


def _on_node(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def node_store(artifacts: str) -> Path:
    """This node's artifact store root (ORCH_NODE_STORE overrides it per node)."""
    return Path(os.environ.get("ORCH_NODE_STORE") or artifacts)


# ---- tasks that run on cluster nodes -----------------------------------------------------------
@ray.remote(num_cpus=0)
def _convert_task(spec: dict) -> dict:
    from workers.convert import convert_checkpoint, shards_root

    store = node_store(spec["artifacts"])
    root = shards_root(store, spec["model_dir"])
    controller = ray.get_actor(CONTROLLER_NAME)

    def on_shard(path: Path, done: int, total: int) -> None:
        controller.post_event.remote(spec["name"], "convert", f"shard {path.name} written ({done}/{total})")

    dirs = convert_checkpoint(spec["model_dir"], root, spec["tp"], spec["pp"], spec["dtype"],
                              quantization=spec["quantization"], on_shard=on_shard)
    return {"store": str(store), "shards": [str(Path(d).relative_to(store)) for d in dirs],
            "converted": len(dirs.converted), "seconds": dirs.seconds}


@ray.remote(num_cpus=0)
def _list_task(store: str, rel: str) -> list[dict]:
    from workers.artifacts import list_files

    return list_files(Path(store) / rel)


@ray.remote(num_cpus=0)
def _chunk_task(store: str, rel: str, path: str, offset: int, size: int) -> bytes:
    from workers.artifacts import read_chunk

    return read_chunk(Path(store) / rel, path, offset, size)


@ray.remote(num_cpus=0)
def _ensure_task(artifacts: str, rel: str, entries: list[dict], src_store: str, src_node_id: str) -> dict:
    """Make <this node's store>/rel hold exactly `entries`, pulling from the source node if needed."""
    from workers.artifacts import matches, receive_dir

    store = node_store(artifacts)
    target = store / rel
    if matches(target, entries):
        return {"path": str(target), "moved": 0}

    def fetch(path: str, offset: int, size: int) -> bytes:
        return ray.get(_chunk_task.options(scheduling_strategy=_on_node(src_node_id))
                       .remote(src_store, rel, path, offset, size))

    moved = receive_dir(target, entries, fetch)
    return {"path": str(target), "moved": moved}


@ray.remote(num_cpus=0)
def _build_task(shard_dir: str, artifacts: str) -> str:
    from workers.build import build_engine

    return str(build_engine(shard_dir, node_store(artifacts) / "engines"))


# ---- controller state ----------------------------------------------------------------------------
@dataclass
class Deployment:
    spec: DeploymentSpec
    phase: str = "pending"
    endpoint: str | None = None
    metrics_endpoint: str | None = None
    error: str | None = None
    serve_key: str | None = None
    build_key: str | None = None
    actors: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    rank_dirs: dict[int, str] = field(default_factory=dict)   # global rank -> shard or engine dir
    rank_state: dict[int, str] = field(default_factory=dict)
    rank_node: dict[int, str] = field(default_factory=dict)   # global rank -> Ray node id it runs on


class PhaseError(Exception):
    def __init__(self, phase: str, msg: str, node: str | None = None, rank: int | None = None):
        where = "".join([f" on node {node}" if node else "", f" rank {rank}" if rank is not None else ""])
        super().__init__(f"{phase} failed{where}: {msg}")


@ray.remote(num_cpus=0, max_concurrency=16)
class Controller:
    """Holds deployments by name and reconciles them; outlives the CLI (detached)."""

    def __init__(self) -> None:
        self.deployments: dict[str, Deployment] = {}
        self.events: list[dict] = []
        self.lock = threading.Lock()

    # -- progress ---------------------------------------------------------------------------
    def _event(self, name: str, phase: str, msg: str, **extra) -> None:
        self.events.append({"seq": len(self.events), "time": time.time(), "deployment": name,
                            "phase": phase, "msg": msg, **extra})

    def version(self) -> str:
        return code_version()

    def post_event(self, name: str, phase: str, msg: str) -> None:
        """Progress reported by a task of this controller (e.g. each converted shard)."""
        self._event(name, phase, msg)

    def events_since(self, seq: int) -> list[dict]:
        return self.events[seq:]

    # -- queries ------------------------------------------------------------------------------
    def status(self) -> dict:
        out = {}
        for name, d in self.deployments.items():
            ranks = []
            for r in d.spec.ranks:
                ranks.append({"rank": r.global_rank, "tp_rank": r.tp_rank, "pp_rank": r.pp_rank,
                              "node": r.node, "node_ip": r.node_ip,
                              "state": d.rank_state.get(r.global_rank, "pending"),
                              "running_on": d.rank_node.get(r.global_rank)})
            out[name] = {"phase": d.phase, "endpoint": d.endpoint, "metrics": d.metrics_endpoint,
                         "error": d.error, "device": d.spec.device, "tp": d.spec.tp, "pp": d.spec.pp,
                         "model": d.spec.model_dir, "serve_key": d.serve_key, "ranks": ranks,
                         "spec": d.spec.to_dict()}
        return out

    def health(self, name: str) -> dict:
        d = self.deployments.get(name)
        if not d or not d.actors:
            return {"healthy": False}
        try:
            states = ray.get([a.health.remote() for a in d.actors], timeout=10)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            return {"healthy": False, "error": str(e)}
        for r, s in zip(d.spec.ranks, states):
            d.rank_state[r.global_rank] = "serving" if s else "unhealthy"
        return {"healthy": all(states)}

    # -- reconcile ----------------------------------------------------------------------------
    def apply(self, spec_dict: dict) -> dict:
        spec = DeploymentSpec.from_dict(spec_dict)
        with self.lock:
            return self._apply(spec)

    def _apply(self, spec: DeploymentSpec) -> dict:
        name = spec.name
        prev = self.deployments.get(name)
        if prev and prev.serve_key == spec.serve_key and self.health(name)["healthy"]:
            self._event(name, "apply", "unchanged: the deployment already matches the topology")
            return {"ok": True, "changed": False, "endpoint": prev.endpoint, "actions": []}
        new = Deployment(spec=spec)
        actions: list[str] = []
        try:
            if prev and prev.build_key == spec.build_key and prev.rank_dirs:
                new.rank_dirs = dict(prev.rank_dirs)
                self._event(name, "convert", "skipped: shards and engines unchanged (only serve settings changed)")
            else:
                new.phase = "converting"
                self.deployments.setdefault(name, new)
                conv = self._convert(new)
                actions.append("convert")
                new.phase = "distributing"
                self._distribute(new, conv)
                if spec.device == "cuda":
                    new.phase = "building"
                    self._build(new)
                    actions.append("build")
            new.phase = "starting"
            if prev:
                self._stop_mesh(prev)
            try:
                self._serve(new)
            except Exception:
                self._stop_mesh(new)
                if prev:
                    self._event(name, "serve", "restoring the previous deployment")
                    try:
                        self._serve(prev)
                        prev.phase = "serving"
                    except Exception as e2:  # noqa: BLE001
                        prev.phase, prev.error = "failed", f"could not restore: {e2}"
                raise
            actions.append("serve")
        except Exception as e:  # noqa: BLE001 - reported to the CLI, previous stays
            msg = str(e) if isinstance(e, PhaseError) else f"{new.phase}: {e}"
            log.error("apply %s failed: %s\n%s", name, msg, traceback.format_exc())
            self._event(name, new.phase, f"FAILED: {msg}", level="error")
            if prev:
                self.deployments[name] = prev
            else:
                new.phase, new.error = "failed", msg
                self.deployments[name] = new
            return {"ok": False, "error": msg, "actions": actions,
                    "endpoint": prev.endpoint if prev else None}
        new.phase, new.serve_key, new.build_key = "serving", spec.serve_key, spec.build_key
        self.deployments[name] = new
        self._event(name, "serve", f"serving at {new.endpoint}")
        return {"ok": True, "changed": True, "endpoint": new.endpoint, "actions": actions}

    def delete(self, name: str) -> dict:
        with self.lock:
            d = self.deployments.pop(name, None)
            if not d:
                return {"deleted": False}
            self._stop_mesh(d)
            self._event(name, "delete", "deleted; GPUs and ports freed")
            return {"deleted": True}

    # -- phases ---------------------------------------------------------------------------------
    def _convert(self, d: Deployment) -> dict:
        s = d.spec
        self._event(s.name, "convert", f"converting {s.model_dir} to {s.tp * s.pp} shards "
                                       f"(tp={s.tp} pp={s.pp} {s.dtype}) on node {s.convert_node}")
        try:
            out = ray.get(_convert_task.options(scheduling_strategy=_on_node(s.convert_node_id)).remote(s.to_dict()))
        except Exception as e:  # noqa: BLE001
            raise PhaseError("convert", _cause(e), node=s.convert_node) from None
        done = (f"converted {out['converted']} in {out['seconds']:.1f} s" if out["converted"]
                else "all up to date, nothing converted")
        self._event(s.name, "convert", f"{len(out['shards'])} shards ready on node {s.convert_node} ({done})")
        return out

    def _distribute(self, d: Deployment, conv: dict) -> None:
        s = d.spec
        rels = {}
        for rel in conv["shards"]:
            tail = Path(rel).name  # rank-{tp}-{pp}
            rels[tail] = rel
        lists = {}
        for r in s.ranks:
            rel = rels[f"rank-{r.tp_rank}-{r.pp_rank}"]
            if rel not in lists:
                lists[rel] = _list_task.options(scheduling_strategy=_on_node(s.convert_node_id)).remote(conv["store"], rel)
        refs = {}
        for r in s.ranks:
            rel = rels[f"rank-{r.tp_rank}-{r.pp_rank}"]
            refs[r.global_rank] = (r, _ensure_task.options(scheduling_strategy=_on_node(r.node_id)).remote(
                s.artifacts, rel, lists[rel], conv["store"], s.convert_node_id))
        for g, (r, ref) in refs.items():
            try:
                res = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                raise PhaseError("distribute", _cause(e), node=r.node, rank=g) from None
            d.rank_dirs[g] = res["path"]
            what = f"pulled {res['moved'] / 1e6:.1f} MB" if res["moved"] else "already present, verified"
            self._event(s.name, "distribute", f"rank {g} shard on node {r.node}: {what}", rank=g)

    def _build(self, d: Deployment) -> None:
        s = d.spec
        refs = {r.global_rank: (r, _build_task.options(scheduling_strategy=_on_node(r.node_id))
                                .remote(d.rank_dirs[r.global_rank], s.artifacts)) for r in s.ranks}
        for g, (r, ref) in refs.items():
            try:
                d.rank_dirs[g] = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                raise PhaseError("build", _cause(e), node=r.node, rank=g) from None
            self._event(s.name, "build", f"rank {g} engine ready on node {r.node}", rank=g)

    def _serve(self, d: Deployment) -> None:
        from workers.rank import RankActor

        s = d.spec
        stages: dict[int, list[RankSpec]] = {}
        for r in s.ranks:
            stages.setdefault(r.pp_rank, []).append(r)
        actors: dict[int, object] = {}
        for pp_rank, ranks in sorted(stages.items()):
            bundles = []
            for r in ranks:
                b = {r.pin: 0.001, **r.resources}
                if s.device == "cuda":
                    b["GPU"] = 1
                else:
                    b["CPU"] = 0.01
                bundles.append(b)
            pg = placement_group(bundles, strategy="STRICT_PACK", name=f"orch-{s.name}-stage{pp_rank}")
            d.groups.append(pg)
            try:
                ray.get(pg.ready(), timeout=120)
            except Exception as e:  # noqa: BLE001
                raise PhaseError("serve", f"placement group for stage {pp_rank} not placed: {_cause(e)}",
                                 node=ranks[0].node) from None
            for i, r in enumerate(ranks):
                opts = {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                        "num_cpus": 0, "num_gpus": 1 if s.device == "cuda" else 0,
                        "resources": dict(r.resources), "max_concurrency": 4}
                actors[r.global_rank] = RankActor.options(**opts).remote()
        d.actors = [actors[r.global_rank] for r in s.ranks]
        driver = actors[0]
        master_ip, master_port = ray.get(driver.rendezvous.remote())
        init_method = f"tcp://{master_ip}:{master_port}"
        self._event(s.name, "serve", f"starting {len(actors)} ranks, rendezvous {init_method}")
        refs = {}
        for r in s.ranks:
            refs[r.global_rank] = (r, actors[r.global_rank].start.remote(
                rank_dir=d.rank_dirs[r.global_rank], rank=r.global_rank, world_size=len(s.ranks),
                tp=s.tp, pp=s.pp, init_method=init_method, device=s.device, serve=s.serve))
        for g, (r, ref) in refs.items():
            try:
                info = ray.get(ref, timeout=600)
            except Exception as e:  # noqa: BLE001
                raise PhaseError("serve", _cause(e), node=r.node, rank=g) from None
            d.rank_state[g] = "serving"
            d.rank_node[g] = info["node_id"]
            if g == 0:
                d.endpoint, d.metrics_endpoint = info["endpoint"], info.get("metrics")
            self._event(s.name, "serve", f"rank {g} up on node {r.node}", rank=g)

    def _stop_mesh(self, d: Deployment) -> None:
        if d.actors:
            try:
                ray.get([a.stop.remote() for a in d.actors], timeout=30)
            except Exception:  # noqa: BLE001 - killed below anyway
                pass
            for a in d.actors:
                ray.kill(a)
            _wait_dead(d.actors)
        for pg in d.groups:
            remove_placement_group(pg)
        d.actors, d.groups = [], []
        d.rank_state = {}


def _wait_dead(actors: list, timeout: float = 15.0) -> None:
    """Block until killed actors are gone, so their ports and GPUs are free again."""
    deadline = time.time() + timeout
    for a in actors:
        while time.time() < deadline:
            try:
                ray.get(a.health.remote(), timeout=1)
            except ray.exceptions.RayActorError:
                break
            except Exception:  # noqa: BLE001 - timeouts: ask again
                pass
            time.sleep(0.1)


def _cause(e: Exception) -> str:
    """The innermost message of a (Ray-wrapped) exception."""
    cause = getattr(e, "cause", None) or e.__cause__ or e
    return f"{type(cause).__name__}: {cause}"


def code_version() -> str:
    """Fingerprint of the control-plane code a controller runs (a detached actor outlives upgrades)."""
    import hashlib

    h = hashlib.sha256()
    for mod in ("controller.py", "deploy_spec.py"):
        h.update((Path(__file__).with_name(mod)).read_bytes())
    h.update((Path(__file__).parents[1] / "workers" / "rank.py").read_bytes())
    return h.hexdigest()[:16]


def get_controller(create: bool = True):
    """The detached named controller actor (created on first use). One left by other orch code is
    replaced when it holds nothing; with deployments it is kept, and a warning says to re-apply."""
    try:
        ctl = ray.get_actor(CONTROLLER_NAME)
    except ValueError:
        ctl = None
    if ctl is not None and ray.get(ctl.version.remote()) != code_version():
        if not ray.get(ctl.status.remote()):
            ray.kill(ctl)
            ctl = None
        else:
            log.warning("the controller runs other orch code than this CLI; `orch delete` and re-apply to upgrade it")
    if ctl is None and create:
        ctl = Controller.options(name=CONTROLLER_NAME, lifetime="detached", get_if_exists=True).remote()
    return ctl
