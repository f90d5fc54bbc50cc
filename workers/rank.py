"""RankActor: one serving rank inside a Ray actor.

Every rank joins the torch.distributed group through the rendezvous the controller hands out and
loads its shard (or engine); rank 0 (first stage, tp rank 0) also runs the gRPC front end.
A leaf of the control plane: it gets everything as arguments and never imports the controller.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import ray

log = logging.getLogger(__name__)


def _bind_collectives_to(ip: str) -> None:
    """Make gloo/NCCL use the interface that carries this node's Ray address (unless the user chose):
    on multi-NIC hosts the hostname may resolve to loopback or to another network."""
    import os

    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
            return


def serve_at_normal_priority() -> None:
    """Give every thread of this process the default nice value (0).

    Ray starts its workers at nice 15 (its `worker_niceness`), which lets any busy process on the host
    (a benchmark client, the raylet) delay the engine loop and the gRPC front end. Linux keeps nice
    per thread, so each thread is reset; threads and processes started later inherit 0. Lowering a
    nice value needs CAP_SYS_NICE: without it this logs how to start Ray instead
    (RAY_worker_niceness=0) and carries on.
    """
    import os

    for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except PermissionError:
            log.warning("serving at nice %d (not allowed to lower it): start Ray with RAY_worker_niceness=0 "
                        "so that other processes on the host do not slow serving",
                        os.getpriority(os.PRIO_PROCESS, tid))
            return


@ray.remote
class RankActor:
    def __init__(self) -> None:
        self.rank: int | None = None
        self.server = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the group's init_method."""
        from workers.dist import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def start(self, *, rank_dir: str, rank: int, world_size: int, tp: int, pp: int, init_method: str,
              device: str, serve: dict) -> dict:
        """Join the group and load the shard; rank 0 returns once its gRPC server is up."""
        from workers.engine import run_rank

        self.rank = rank
        serve_at_normal_priority()
        _bind_collectives_to(ray.util.get_node_ip_address())
        kv = dict(num_kv_blocks=serve["num_kv_blocks"], block_size=serve["block_size"])
        if rank != 0:
            loaded = threading.Event()

            def follow() -> None:
                try:
                    run_rank(rank_dir, rank, world_size, tp, pp, init_method, device=device,
                             on_ready=lambda _engine: loaded.set(), **kv)
                except BaseException as e:  # noqa: BLE001 - reported through health()/start()
                    self.error = e
                    loaded.set()

            self.thread = threading.Thread(target=follow, name=f"orch-rank-{rank}", daemon=True)
            self.thread.start()
            loaded.wait()
            if self.error is not None:
                raise self.error
            return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id()}
        engine = run_rank(rank_dir, 0, world_size, tp, pp, init_method, device=device, **kv)
        return self._start_front_end(engine, rank_dir, device, serve)

    def _start_front_end(self, engine, rank_dir: str, device: str, serve: dict) -> dict:
        from workers.server import ServerConfig, ServerThread

        cfg = ServerConfig(shard_dir=Path(rank_dir), model_name=serve.get("model_name") or "model",
                           host=serve["host"], port=serve["port"], metrics_port=serve.get("metrics_port"),
                           device=device, max_num_seqs=serve["max_num_seqs"], max_seq_len=serve["max_seq_len"],
                           max_num_batched_tokens=serve["max_num_batched_tokens"], block_size=serve["block_size"],
                           num_kv_blocks=serve["num_kv_blocks"], **ServerConfig.tls_from_env())
        try:
            self.server = ServerThread(cfg, engine=engine)  # ModelInfo and tokenizer derived from the engine
        except BaseException:
            engine.shutdown()
            raise
        host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address()
        metrics = f"{host}:{self.server.metrics_port}" if self.server.metrics_port else None
        return {"rank": 0, "endpoint": f"{host}:{self.server.port}", "metrics": metrics,
                "node_id": ray.get_runtime_context().get_node_id()}

    def health(self) -> bool:
        if self.rank == 0:
            return self.server is not None and self.server.healthy
        return self.thread is not None and self.thread.is_alive() and self.error is None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.thread is not None:
            self.thread.join(15)
