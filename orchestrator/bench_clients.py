"""Benchmark clients over grpc.aio: orch.v1.OrchService and KServe v2 (Triton TensorRT-LLM tensor names).

Each client fills a RequestRecord: perf_counter_ns just before the call, at every message carrying
tokens, and the token count of each message.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.bench_stats import RequestRecord

if TYPE_CHECKING:
    from orchestrator.bench import BenchConfig, BenchRequest



class RequestFailed(Exception):
    """A request failed in a way that carries no gRPC status (e.g. a KServe in-stream error)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerInfo:
    """What the server told about itself (fields stay None when it could not be asked)."""

    model: str = ""
    vocab_size: int | None = None
    max_seq_len: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    inputs: list[str] = field(default_factory=list)
    error: str = ""


class _Channels:
    """n gRPC channels to one endpoint, each its own HTTP/2 connection; requests are spread over them."""

    def __init__(self, endpoint: str, n: int, stub_class: type):
        import grpc

        opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20)]
        self.channels = [grpc.aio.insecure_channel(endpoint, options=opts) for _ in range(n)]
        self.stubs = [stub_class(ch) for ch in self.channels]

    async def connect(self, timeout_s: float) -> None:
        """Open every connection now, so that no measured request pays for it (best effort)."""
        try:
            await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in self.channels)), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        """Close the channels."""
        for ch in self.channels:
            await ch.close()


class OrchProtocol(_Channels):
    """orch.v1.OrchService: token-id prompts, GenerateStream (or Generate with stream=False)."""

    name = "orch"

    def __init__(self, cfg: "BenchConfig", n_channels: int):
        from protos.orch.v1 import orch_pb2, orch_pb2_grpc

        super().__init__(cfg.endpoint, n_channels, orch_pb2_grpc.OrchServiceStub)
        self.cfg, self.pb = cfg, orch_pb2

    async def info(self) -> ServerInfo:
        """ModelInfo."""
        r = await self.stubs[0].ModelInfo(self.pb.ModelInfoRequest(model=self.cfg.model), **_info_call_args(self.cfg))
        return ServerInfo(model=r.model, vocab_size=r.vocab_size or None, max_seq_len=r.max_seq_len or None,
                          eos_token_ids=list(r.eos_token_ids), bos_token_id=r.bos_token_id)

    def build(self, req: "BenchRequest") -> object:
        """The GenerateRequest of a BenchRequest."""
        pb = self.pb
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=self.cfg.ignore_eos)
        return pb.GenerateRequest(model=self.cfg.model, prompt_token_ids=req.prompt, sampling=sampling,
                                  request_id=f"bench-{req.index}")

    async def send(self, msg: object, rec: RequestRecord, slot: int) -> None:
        """Run one request, filling rec's times and token counts."""
        stub = self.stubs[slot % len(self.stubs)]
        clock = time.perf_counter_ns
        tokens, times = rec.chunk_tokens, rec.chunk_ns
        if not self.cfg.stream:
            rec.start_ns = clock()
            r = await stub.Generate(msg, timeout=self.cfg.timeout_s)
            times.append(clock())
            tokens.append(len(r.token_ids))
            self._finish(rec, r)
            return
        rec.start_ns = clock()
        call = stub.GenerateStream(msg, timeout=self.cfg.timeout_s)
        async for r in call:
            now = clock()
            n = len(r.token_ids)
            if n:
                times.append(now)
                tokens.append(n)
            if r.finish_reason:
                self._finish(rec, r)

    def _finish(self, rec: RequestRecord, r: object) -> None:
        rec.finish_reason = self.pb.FinishReason.Name(r.finish_reason)
        if r.HasField("usage"):
            rec.server_output_tokens = r.usage.completion_tokens
            rec.server_prompt_tokens = r.usage.prompt_tokens
            rec.server_cached_tokens = r.usage.cached_prompt_tokens


KSERVE_DEFAULT_MODEL = "ensemble"  # the usual name of Triton's TensorRT-LLM model
MIN_LENGTH_INPUTS = ("min_length", "min_tokens")  # TensorRT-LLM's minimum-output-length input, by version


class KServeProtocol(_Channels):
    """KServe v2 GRPCInferenceService, Triton TensorRT-LLM tensor names, timed over ModelStreamInfer.

    Inputs text_input (BYTES), max_tokens (INT32), stream (BOOL) and, for ignore_eos, min_length or
    min_tokens (INT32) = max_tokens, or else ignore_eos (BOOL), when the model lists one; output
    text_output (BYTES). Each streamed response carrying text_output counts as one output token
    (Triton's decoupled streaming sends one response per token).
    """

    name = "kserve"

    def __init__(self, cfg: "BenchConfig", n_channels: int):
        from protos.kserve import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

        super().__init__(cfg.endpoint, n_channels, grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub)
        self.cfg, self.pb = cfg, grpc_predict_v2_pb2
        self.model = cfg.model or KSERVE_DEFAULT_MODEL
        self.inputs: list[str] = []

    async def info(self) -> ServerInfo:
        """ModelMetadata: the model's input names."""
        r = await self.stubs[0].ModelMetadata(self.pb.ModelMetadataRequest(name=self.model),
                                              **_info_call_args(self.cfg))
        self.inputs = [t.name for t in r.inputs]
        return ServerInfo(model=r.name, inputs=self.inputs)

    def build(self, req: "BenchRequest") -> object:
        """The ModelInferRequest of a BenchRequest."""
        pb = self.pb
        T = pb.ModelInferRequest.InferInputTensor
        C = pb.InferTensorContents
        inputs = [
            T(name="text_input", datatype="BYTES", shape=[1, 1], contents=C(bytes_contents=[req.prompt.encode()])),
            T(name="max_tokens", datatype="INT32", shape=[1, 1], contents=C(int_contents=[req.output_len])),
            T(name="stream", datatype="BOOL", shape=[1, 1], contents=C(bool_contents=[True])),
        ]
        floor = next((n for n in MIN_LENGTH_INPUTS if n in self.inputs), None) if self.cfg.ignore_eos else None
        if floor:  # TensorRT-LLM ignores EOS before the minimum length
            inputs.append(T(name=floor, datatype="INT32", shape=[1, 1], contents=C(int_contents=[req.output_len])))
        elif self.cfg.ignore_eos and "ignore_eos" in self.inputs:
            inputs.append(T(name="ignore_eos", datatype="BOOL", shape=[1, 1], contents=C(bool_contents=[True])))
        return pb.ModelInferRequest(
            model_name=self.model, id=f"bench-{req.index}", inputs=inputs,
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="text_output")],
            parameters={"triton_enable_empty_final_response": pb.InferParameter(bool_param=True)})

    async def send(self, msg: object, rec: RequestRecord, slot: int) -> None:
        """Run one request on its own ModelStreamInfer stream, filling rec."""
        stub = self.stubs[slot % len(self.stubs)]
        clock = time.perf_counter_ns
        rec.start_ns = clock()
        call = stub.ModelStreamInfer(timeout=self.cfg.timeout_s)
        await call.write(msg)
        await call.done_writing()
        async for r in call:
            now = clock()
            if r.error_message:
                call.cancel()
                raise RequestFailed("INFER_ERROR", r.error_message)
            ir = r.infer_response
            if any(o.name == "text_output" for o in ir.outputs):
                rec.chunk_ns.append(now)
                rec.chunk_tokens.append(1)
            p = ir.parameters.get("triton_final_response")
            if p is not None and p.bool_param:
                rec.finish_reason = "FINAL_RESPONSE"
                call.cancel()
                break


def _info_call_args(cfg: "BenchConfig") -> dict:
    if cfg.wait_ready_s > 0:
        return {"timeout": cfg.wait_ready_s, "wait_for_ready": True}
    return {"timeout": 10.0}


def make_protocol(cfg: "BenchConfig", n_channels: int) -> OrchProtocol | KServeProtocol:
    """The client for cfg.protocol."""
    return (OrchProtocol if cfg.protocol == "orch" else KServeProtocol)(cfg, n_channels)
