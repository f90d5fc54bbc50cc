"""The gRPC server of one model: orch.v1, KServe v2, grpc.health.v1, reflection and Prometheus metrics.

`Server` owns the engine thread and starts the gRPC front end (`Frontend`) in a child process
(workers/frontend.py); `run_server` blocks (for `orch serve`), `ServerThread` runs one in the
background (tests, embedding).
"""
from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from orchestrator.errors import CheckpointError, RuntimeFailure
from protos.kserve import grpc_predict_v2_pb2
from protos.orch.v1 import orch_pb2, orch_pb2_grpc
from workers.block_manager import blocks_for_sequences
from workers.dist import free_port  # noqa: F401 - re-exported for callers of the server
from workers.metrics import ServerMetrics
from workers.sampling import SamplingParams
from workers.scheduler import SeqOutput
from workers.sequence import FinishReason
from workers.frontend import EngineBridge, frontend_main
from workers.serving import EngineLoop, ModelInfo, RequestError, Serving, make_scheduler
from workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ORCH_SERVICE = "orch.v1.OrchService"
KSERVE_SERVICE = "inference.GRPCInferenceService"
DEFAULT_MAX_TOKENS = 16


@dataclass
class ServerConfig:
    """Everything one server needs (orch serve fills it from flags or a topology's serve section)."""

    shard_dir: Path
    model_name: str = "model"
    host: str = "127.0.0.1"
    port: int = 50051                 # 0 = any free port
    metrics_port: int | None = None   # None = no exporter, 0 = any free port
    device: str = "cpu"
    max_num_seqs: int = 64
    max_seq_len: int = 2048
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_kv_blocks: int | None = None  # None = kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.1
    enable_prefix_caching: bool = True
    max_message_bytes: int = 4 << 20
    tls_cert: Path | None = None      # PEM certificate chain; with tls_key the port speaks TLS only
    tls_key: Path | None = None

    @classmethod
    def tls_from_env(cls) -> dict:
        """tls_cert / tls_key from ORCH_TLS_CERT / ORCH_TLS_KEY (set by the Helm chart), when given."""
        import os

        cert, key = os.environ.get("ORCH_TLS_CERT"), os.environ.get("ORCH_TLS_KEY")
        return {"tls_cert": Path(cert), "tls_key": Path(key)} if cert and key else {}


# --- shards and engine ---------------------------------------------------------------------------

def find_layout(shard_dir: Path | str) -> tuple[Path, int, int]:
    """(directory holding rank-*-* shards, tp, pp) for a rank dir, a tp{T}-pp{P} dir or a shard root."""
    d = Path(shard_dir)
    if (d / "manifest.json").is_file():
        m = json.loads((d / "manifest.json").read_text())
        return (d, 1, 1) if (m.get("tp_size"), m.get("pp_size")) == (1, 1) else (d.parent, m["tp_size"], m["pp_size"])
    layouts = sorted(p.parent.parent for p in d.glob("tp*-pp*/rank-0-0/manifest.json"))
    if (d / "rank-0-0" / "manifest.json").is_file():
        layouts = [d]
    if not layouts:
        raise CheckpointError(f"{d}: no converted shards (expected rank-*/manifest.json written by `orch convert`)")
    if len(layouts) > 1:
        raise CheckpointError(f"{d}: several shard layouts ({', '.join(p.name for p in layouts)}); "
                              "point --shards at one of them")
    m = json.loads((layouts[0] / "rank-0-0" / "manifest.json").read_text())
    return layouts[0], int(m["tp_size"]), int(m["pp_size"])


def _size_kv_cache(cfg: ServerConfig, layout: Path, tp: int, pp: int) -> tuple[int, dict]:
    """Number of KV blocks (given, or what kv_cache_fraction of memory leaves after the weights), and
    rank 0's manifest. Never more than max_num_seqs full-length sequences can use."""
    from workers.engine import kv_block_bytes_for, memory_budget_bytes, num_kv_blocks_for_budget
    from workers.models.config import ModelConfig

    rank0 = layout / "rank-0-0" if (layout / "rank-0-0").is_dir() else layout
    manifest = json.loads((rank0 / "manifest.json").read_text())
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks, manifest
    mc = ModelConfig.from_dict(manifest["model_config"])
    block_bytes = kv_block_bytes_for(mc, tp, pp, cfg.block_size, manifest["dtype"])
    weights = (max(p.stat().st_size for p in layout.glob("**/model.safetensors"))
               if cfg.device.startswith("cuda") else 0)
    budget = memory_budget_bytes(cfg.device, cfg.kv_cache_fraction, weights)
    n = min(num_kv_blocks_for_budget(budget, block_bytes),
            blocks_for_sequences(cfg.max_num_seqs, cfg.max_seq_len, cfg.block_size))
    if n < 1:
        raise CheckpointError(f"{layout}: no memory left for the KV cache (kv_cache_fraction "
                              f"{cfg.kv_cache_fraction}); raise it or set num_kv_blocks")
    log.info("KV cache: %d blocks of %d tokens (%.2f GB)", n, cfg.block_size, n * block_bytes / 1e9)
    return n, manifest


def launch_engine(cfg: ServerConfig) -> tuple[Any, list, ModelInfo]:
    """Load the driver's engine; with TP/PP start the other ranks as local processes first."""
    from workers.engine import Engine, run_rank
    from workers.models.config import ModelConfig

    layout, tp, pp = find_layout(cfg.shard_dir)
    num_blocks, manifest = _size_kv_cache(cfg, layout, tp, pp)
    procs: list = []
    if tp * pp == 1:
        engine = Engine(layout, device=cfg.device, num_kv_blocks=num_blocks, block_size=cfg.block_size)
    else:
        init = f"tcp://127.0.0.1:{free_port()}"
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, tp * pp):
            p = ctx.Process(target=run_rank, name=f"orch-rank-{rank}", daemon=True, kwargs=dict(
                shard_dir=str(layout), rank=rank, world_size=tp * pp, tp=tp, pp=pp, init_method=init,
                device=cfg.device, num_kv_blocks=num_blocks, block_size=cfg.block_size))
            p.start()
            procs.append(p)
        engine = run_rank(layout, 0, tp * pp, tp, pp, init, device=cfg.device, num_kv_blocks=num_blocks,
                          block_size=cfg.block_size)
    info = model_info(cfg, ModelConfig.from_dict(manifest["model_config"]), num_blocks, tp, pp, manifest["dtype"])
    return engine, procs, info


def model_info(cfg: ServerConfig, mc: Any, num_kv_blocks: int, tp: int = 1, pp: int = 1,
               dtype: str = "float32") -> ModelInfo:
    """What the server tells clients; max_seq_len is capped by the model's positions and the KV cache."""
    max_seq_len = min(cfg.max_seq_len, mc.max_position_embeddings, num_kv_blocks * cfg.block_size)
    if max_seq_len < cfg.max_seq_len:
        log.warning("max_seq_len lowered from %d to %d (model positions / KV cache capacity)",
                    cfg.max_seq_len, max_seq_len)
    return ModelInfo(name=cfg.model_name, model_config=mc, max_seq_len=max_seq_len, block_size=cfg.block_size,
                     num_kv_blocks=num_kv_blocks, max_num_seqs=cfg.max_num_seqs,
                     max_num_batched_tokens=cfg.max_num_batched_tokens, tp=tp, pp=pp, dtype=dtype,
                     device=cfg.device, aliases=("ensemble",))


def load_tokenizer(cfg: ServerConfig) -> Tokenizer | None:
    """The tokenizer copied next to the rank-0 shard, if any."""
    layout, _, _ = find_layout(cfg.shard_dir)
    for d in (layout, layout / "rank-0-0"):
        if (d / "tokenizer.json").is_file():
            return Tokenizer(d)
    log.warning("%s: no tokenizer.json; only token-id prompts will work", layout)
    return None


# --- orch.v1 ---------------------------------------------------------------------------------------

_FINISH = {FinishReason.STOP: orch_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: orch_pb2.FINISH_REASON_LENGTH,
           FinishReason.ABORT: orch_pb2.FINISH_REASON_CANCELLED}


def params_from_proto(p: orch_pb2.SamplingParams) -> SamplingParams:
    """SamplingParams of a request (unset optional fields take their documented defaults)."""
    return SamplingParams(
        temperature=p.temperature, top_k=p.top_k,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        stop_token_ids=list(p.stop_token_ids), stop=list(p.stop),
        max_tokens=p.max_tokens if p.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        ignore_eos=p.ignore_eos, logprobs=p.logprobs, top_logprobs=p.top_logprobs,
    )


def response_from_outputs(request_id: str, outs: list[SeqOutput]) -> orch_pb2.GenerateResponse:
    """One GenerateResponse covering the given consecutive outputs of a sequence."""
    r = orch_pb2.GenerateResponse(request_id=request_id, text="".join(o.text for o in outs))
    for o in outs:
        r.token_ids.extend(o.token_ids)
        for s in o.logprobs:
            r.logprobs.add(token_id=s.token_id, logprob=s.logprob or 0.0,
                           top=[orch_pb2.TopLogprob(token_id=t, logprob=v) for t, v in (s.top or [])])
    last = outs[-1]
    if last.finished:
        r.finish_reason = _FINISH[last.finish_reason]
        if last.stop_reason is not None:
            r.stop_reason = str(last.stop_reason)
        r.usage.prompt_tokens = last.num_prompt_tokens
        r.usage.completion_tokens = last.num_output_tokens
        r.usage.cached_prompt_tokens = last.num_cached_tokens
    return r


class OrchServicer(orch_pb2_grpc.OrchServiceServicer):
    """orch.v1.OrchService over a Serving."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def _request(self, request: orch_pb2.GenerateRequest):
        return await self.serving.prepare_async(
            model=request.model, prompt=request.prompt, prompt_token_ids=list(request.prompt_token_ids),
            params=params_from_proto(request.sampling), request_id=request.request_id,
            skip_special_tokens=not request.include_special_tokens)

    async def GenerateStream(self, request, context):
        try:
            req = await self._request(request)
            async for outs in self.serving.stream(req):
                yield response_from_outputs(req.request_id, outs)
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))

    async def Generate(self, request, context):
        try:
            req = await self._request(request)
            outs = await self.serving.collect(req)
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return response_from_outputs(req.request_id, outs)

    async def Tokenize(self, request, context):
        try:
            self.serving.check_model(request.model)
            ids = self.serving.tokenize(request.text, request.add_special_tokens)
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        tok = self.serving.tokenizer
        return orch_pb2.TokenizeResponse(token_ids=ids, tokens=[tok.id_to_token(i) for i in ids])

    async def ModelInfo(self, request, context):
        try:
            self.serving.check_model(request.model)
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        i, mc = self.serving.info, self.serving.info.model_config
        return orch_pb2.ModelInfoResponse(
            model=i.name, architecture=mc.architecture, vocab_size=mc.vocab_size, max_seq_len=i.max_seq_len,
            eos_token_ids=list(mc.eos_token_ids), bos_token_id=mc.bos_token_id if mc.bos_token_id is not None else -1,
            tp_size=i.tp, pp_size=i.pp, dtype=i.dtype, device=i.device, block_size=i.block_size,
            num_kv_blocks=i.num_kv_blocks, max_num_seqs=i.max_num_seqs,
            max_num_batched_tokens=i.max_num_batched_tokens)


# --- the server ------------------------------------------------------------------------------------

def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """A pool holding every served file (KServe's lives apart from the default pool, see gen_protos.sh)."""
    pool = descriptor_pool.DescriptorPool()
    for mod in (orch_pb2, grpc_predict_v2_pb2, health_pb2, reflection_pb2):
        pool.AddSerializedFile(mod.DESCRIPTOR.serialized_pb)
    return pool


class Frontend:
    """The gRPC server (orch.v1, KServe v2, health, reflection) over a Serving; it runs in the front-end
    process (workers/frontend.py), where `loop` is the pipe to the engine loop."""

    def __init__(self, cfg: ServerConfig, info: ModelInfo, loop: Any, tokenizer: Tokenizer | None) -> None:
        self.cfg, self.info, self.loop = cfg, info, loop
        self.serving = Serving(info, loop, tokenizer)
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        """Bind and start serving; RuntimeFailure when the port cannot be had."""
        from workers.kserve import KServeServicer
        from protos.kserve import grpc_predict_v2_pb2_grpc

        opts = [("grpc.max_receive_message_length", self.cfg.max_message_bytes),
                ("grpc.max_send_message_length", self.cfg.max_message_bytes),
                ("grpc.so_reuseport", 0)]  # a second server on a busy port fails instead of sharing it
        server = self._grpc = grpc.aio.server(options=opts)
        orch_pb2_grpc.add_OrchServiceServicer_to_server(OrchServicer(self.serving), server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(self.serving), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [ORCH_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server,
            pool=_reflection_pool())
        address = f"{self.cfg.host}:{self.cfg.port}"
        try:
            if self.cfg.tls_cert and self.cfg.tls_key:
                creds = grpc.ssl_server_credentials([(self.cfg.tls_key.read_bytes(), self.cfg.tls_cert.read_bytes())])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
            if not self.port:
                raise RuntimeError("bind failed")
            await server.start()
        except (RuntimeError, OSError) as e:
            await self.stop(grace=0)
            raise RuntimeFailure(f"cannot listen on {address} ({e}); is another server using it?") from None
        await self._set_health(True)
        self._watch = asyncio.create_task(self._watch_engine())

    async def _set_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", ORCH_SERVICE, KSERVE_SERVICE):
            await self._health.set(name, status)

    async def _watch_engine(self) -> None:
        healthy = True
        while True:
            await asyncio.sleep(0.5)
            if self.loop.healthy != healthy:
                healthy = self.loop.healthy
                await self._set_health(healthy)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop taking requests and end the streams."""
        if self._watch is not None:
            self._watch.cancel()
        if self._health is not None and self.port:
            await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)


FRONTEND_START_TIMEOUT_S = 120.0


class Server:
    """One model: the engine loop in this process, its gRPC front end in a child process (so that the
    per-token RPC work does not share this process's GIL with the engine thread)."""

    def __init__(self, cfg: ServerConfig, engine: Any = None, info: ModelInfo | None = None) -> None:
        self.cfg = cfg
        self.procs: list = []
        if engine is None:
            engine, self.procs, info = launch_engine(cfg)
        if info is None:  # an engine made elsewhere (e.g. a Ray rank actor)
            info = model_info(cfg, engine.model_config, engine.num_kv_blocks, engine.tp, engine.pp,
                              str(engine.dtype).removeprefix("torch."))
        self.engine = engine
        self.info = info
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(make_scheduler(info, cfg.enable_prefix_caching), engine.step, self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._frontend: Any = None      # the front-end process
        self._bridge: EngineBridge | None = None

    async def start(self) -> None:
        """Start the engine thread, the front-end process (which binds the gRPC port) and the metrics exporter."""
        self.loop.start()
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        self._frontend = ctx.Process(target=frontend_main, args=(self.cfg, self.info, child), name="orch-frontend",
                                     daemon=True)
        self._frontend.start()
        child.close()
        msg = await asyncio.get_running_loop().run_in_executor(None, _first_message, conn, self._frontend)
        try:
            if msg[0] != "ready":
                raise RuntimeFailure(msg[1])
            self.port = msg[1]
            self._bridge = EngineBridge(self.loop, conn)
            self._bridge.start()
            if self.cfg.metrics_port is not None:
                try:
                    self.metrics_port = self.metrics.serve_http(self.cfg.metrics_port, self.cfg.host)
                except OSError as e:
                    raise RuntimeFailure(f"cannot listen on metrics port {self.cfg.metrics_port} ({e}); "
                                         "is another server using it?") from None
        except RuntimeFailure:
            await self.stop(grace=0)
            raise
        log.info("serving %s on %s:%d (metrics: %s)", self.info.name, self.cfg.host, self.port,
                 self.metrics_port if self.metrics_port else "off")

    @property
    def healthy(self) -> bool:
        """The engine steps without failing and the front-end process (the gRPC port) is alive."""
        return self.loop.healthy and self._frontend is not None and self._frontend.is_alive()

    async def stop(self, grace: float = 2.0) -> None:
        """Stop the front end (ending its streams), the engine thread and the other ranks."""
        aio = asyncio.get_running_loop()
        if self._bridge is not None:
            self._bridge.send(("stop", grace))
        if self._frontend is not None:
            await aio.run_in_executor(None, self._frontend.join, grace + 15)
            if self._frontend.is_alive():
                self._frontend.kill()
        await aio.run_in_executor(None, self.loop.stop)
        self.metrics.close()
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def _first_message(conn: Any, proc: Any) -> tuple:
    """The front end's ("ready", port) or ("error", message), or an error if it dies or hangs first."""
    waited = 0.0
    while not conn.poll(0.5):
        waited += 0.5
        if not proc.is_alive():
            return ("error", f"the gRPC front-end process exited (status {proc.exitcode}) before it was ready")
        if waited > FRONTEND_START_TIMEOUT_S:
            proc.kill()
            return ("error", f"the gRPC front-end process was not ready after {FRONTEND_START_TIMEOUT_S:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        return ("error", "the gRPC front-end process closed its pipe before it was ready")


def run_server(cfg: ServerConfig) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import signal

    async def main() -> None:
        server = Server(cfg)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await server.stop()

    asyncio.run(main())


class ServerThread:
    """A Server running on its own event loop in a background thread."""

    def __init__(self, cfg: ServerConfig, **server_kwargs: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._aio: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self._thread = threading.Thread(target=self._main, args=(cfg, server_kwargs), name="orch-server",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self, cfg: ServerConfig, kwargs: dict) -> None:
        self._aio = asyncio.new_event_loop()
        try:
            self.server = Server(cfg, **kwargs)
            self._aio.run_until_complete(self.server.start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._aio.run_forever()
        self._aio.close()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def healthy(self) -> bool:
        return self.server is not None and self.server.healthy

    def stop(self) -> None:
        """Stop the server and its thread."""
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(), self._aio)
        fut.result(30)
        self._aio.call_soon_threadsafe(self._aio.stop)
        self._thread.join(10)

