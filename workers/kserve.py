"""KServe v2 (inference.GRPCInferenceService) front end with the tensor names of Triton's
TensorRT-LLM ensemble, so Triton clients and benchmark tools drive orch unchanged.

Inputs: text_input BYTES (required), max_tokens INT32, stream BOOL, temperature FP32, top_k INT32,
top_p FP32, random_seed UINT64, stop_words BYTES, repetition_penalty FP32, end_id INT32,
min_length INT32, exclude_input_in_output BOOL, beam_width INT32 (1 only); a few more TensorRT-LLM
inputs are accepted and ignored. Output: text_output BYTES. Without temperature (or with 0) decoding
is greedy; top_p 0 means no top-p limit, as in TensorRT-LLM.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import struct
from typing import Any, AsyncIterator

import grpc
import numpy as np

from protos.kserve import grpc_predict_v2_pb2 as pb
from protos.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from workers.sampling import SamplingParams
from workers.serving import GenerationRequest, RequestError, Serving

log = logging.getLogger(__name__)

_NP = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
       "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
       "FP32": np.float32, "FP64": np.float64}
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}

# (name, datatype, dims) of the inputs and outputs orch reads and writes
INPUTS = [("text_input", "BYTES", [-1, 1]), ("max_tokens", "INT32", [-1, 1]), ("stream", "BOOL", [-1, 1]),
          ("temperature", "FP32", [-1, 1]), ("top_k", "INT32", [-1, 1]), ("top_p", "FP32", [-1, 1]),
          ("random_seed", "UINT64", [-1, 1]), ("stop_words", "BYTES", [-1, -1]),
          ("repetition_penalty", "FP32", [-1, 1]), ("end_id", "INT32", [-1, 1]), ("min_length", "INT32", [-1, 1]),
          ("exclude_input_in_output", "BOOL", [-1, 1]), ("beam_width", "INT32", [-1, 1])]
OUTPUTS = [("text_output", "BYTES", [-1, -1])]
# TensorRT-LLM ensemble inputs that orch accepts and ignores
IGNORED = {"pad_id", "bad_words", "presence_penalty", "frequency_penalty", "length_penalty", "return_log_probs",
           "return_context_logits", "return_generation_logits", "embedding_bias_words", "embedding_bias_weights",
           "num_return_sequences", "return_perf_metrics"}
_KNOWN = {name for name, _, _ in INPUTS}


def decode_bytes(raw: bytes) -> list[bytes]:
    """Elements of a raw BYTES tensor (each prefixed by its 4-byte little-endian length)."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise RequestError("INVALID_ARGUMENT", "malformed BYTES tensor: truncated length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise RequestError("INVALID_ARGUMENT", "malformed BYTES tensor: element runs past the end")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def encode_bytes(items: list[bytes]) -> bytes:
    """Raw BYTES tensor of the given elements."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _values(inp: Any, raw: bytes | None) -> list:
    """The elements of one input tensor, flattened."""
    dt = inp.datatype
    if dt not in _CONTENTS:
        raise RequestError("INVALID_ARGUMENT", f"input {inp.name!r}: unsupported datatype {dt!r}")
    if raw is not None:
        if dt == "BYTES":
            return decode_bytes(raw)
        try:
            return np.frombuffer(raw, dtype=_NP[dt]).tolist()
        except ValueError:
            raise RequestError("INVALID_ARGUMENT", f"input {inp.name!r}: {len(raw)} raw bytes do not hold "
                                                   f"whole {dt} elements") from None
    return list(getattr(inp.contents, _CONTENTS[dt]))


def read_inputs(request: Any) -> dict[str, list]:
    """name -> flattened values of every input of a ModelInferRequest (batch of one)."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise RequestError("INVALID_ARGUMENT", f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs")
    out: dict[str, list] = {}
    for i, inp in enumerate(request.inputs):
        if inp.name not in _KNOWN and inp.name not in IGNORED:
            raise RequestError("INVALID_ARGUMENT", f"unknown input {inp.name!r}; expected some of "
                                                   + ", ".join(n for n, _, _ in INPUTS))
        if inp.shape and inp.shape[0] != 1 and len(inp.shape) > 1:
            raise RequestError("INVALID_ARGUMENT", f"input {inp.name!r}: batch size {inp.shape[0]}; "
                                                   "orch takes one request per ModelInfer (batch size 1)")
        out[inp.name] = _values(inp, raws[i] if raws else None)
    return out


def _scalar(inputs: dict[str, list], name: str, default: Any) -> Any:
    vals = inputs.get(name)
    if not vals:
        return default
    if len(vals) != 1:
        raise RequestError("INVALID_ARGUMENT", f"input {name!r} must hold one value, got {len(vals)}")
    return vals[0]


def params_from_inputs(inputs: dict[str, list]) -> tuple[SamplingParams, bool, bool]:
    """(sampling params, stream?, exclude input from a non-streamed output?) of TensorRT-LLM style inputs."""
    try:
        return _params_from_inputs(inputs)
    except (ValueError, TypeError, OverflowError) as e:
        raise RequestError("INVALID_ARGUMENT", f"bad sampling input: {e}") from None


def _params_from_inputs(inputs: dict[str, list]) -> tuple[SamplingParams, bool, bool]:
    temperature = float(_scalar(inputs, "temperature", 0.0))
    top_p = float(_scalar(inputs, "top_p", 0.0))
    max_tokens = int(_scalar(inputs, "max_tokens", 16))
    end_id = _scalar(inputs, "end_id", None)
    if int(_scalar(inputs, "beam_width", 1)) != 1:
        raise RequestError("INVALID_ARGUMENT", "beam_width must be 1 (orch does not do beam search)")
    stops = [s.decode("utf-8", "replace") for s in inputs.get("stop_words", []) if s]
    params = SamplingParams(
        temperature=temperature,
        top_k=int(_scalar(inputs, "top_k", 0)),
        top_p=1.0 if top_p == 0.0 else top_p,
        seed=int(_scalar(inputs, "random_seed", 0)) if "random_seed" in inputs else None,
        repetition_penalty=float(_scalar(inputs, "repetition_penalty", 1.0)),
        stop=stops,
        stop_token_ids=[int(end_id)] if end_id is not None else [],
        max_tokens=max_tokens,
        ignore_eos=int(_scalar(inputs, "min_length", 0)) >= max_tokens,
    )
    return params, bool(_scalar(inputs, "stream", False)), bool(_scalar(inputs, "exclude_input_in_output", False))


def _tensor_meta(specs) -> list:
    return [pb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in specs]


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over a Serving."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        try:
            self.version = importlib.metadata.version("orch")
        except importlib.metadata.PackageNotFoundError:
            self.version = "0"

    # --- health and metadata ---
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.serving.loop.healthy)

    async def ModelReady(self, request, context):
        try:
            self.serving.check_model(request.name)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.serving.loop.healthy)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="orch", version=self.version, extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            self.serving.check_model(request.name)
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return pb.ModelMetadataResponse(name=request.name or self.serving.info.name, versions=["1"],
                                        platform="ensemble", inputs=_tensor_meta(INPUTS),
                                        outputs=_tensor_meta(OUTPUTS))

    # --- inference ---
    async def _prepare(self, request) -> tuple[GenerationRequest, bool, str]:
        """(request, stream?, text to put before the output)."""
        try:
            self.serving.check_model(request.model_name)
            for o in request.outputs:
                if o.name not in {n for n, _, _ in OUTPUTS}:
                    raise RequestError("INVALID_ARGUMENT", f"unknown output {o.name!r}; orch returns text_output")
            inputs = read_inputs(request)
            texts = inputs.get("text_input")
            if not texts or len(texts) != 1:
                raise RequestError("INVALID_ARGUMENT", "input 'text_input' (BYTES, one element) is required")
            params, stream, exclude = params_from_inputs(inputs)
        except RequestError:
            self.serving.loop.count_rejected()
            raise
        prompt = texts[0].decode("utf-8", "replace")
        req = await self.serving.prepare_async(model=request.model_name, prompt=prompt, params=params,
                                               request_id=request.id or "")
        return req, stream, "" if (stream or exclude) else prompt

    def _response(self, request, text: str, final: bool | None = None) -> Any:
        r = pb.ModelInferResponse(model_name=request.model_name or self.serving.info.name,
                                  model_version=request.model_version or "1", id=request.id)
        r.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
        r.raw_output_contents.append(encode_bytes([text.encode("utf-8")]))
        if final is not None:
            r.parameters["triton_final_response"].bool_param = final
        return r

    async def ModelInfer(self, request, context):
        try:
            req, _, head = await self._prepare(request)
            text = "".join(o.text for o in await self.serving.collect(req))
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return self._response(request, head + text)

    async def _stream_one(self, request) -> AsyncIterator[Any]:
        req, stream, head = await self._prepare(request)
        empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
            if "triton_enable_empty_final_response" in request.parameters else False
        if not stream:
            text = "".join(o.text for o in await self.serving.collect(req))
            yield self._response(request, head + text, final=not empty_final)
        else:
            async for outs in self.serving.stream(req):
                for o in outs:  # one response per token, as Triton's decoupled streaming sends
                    yield self._response(request, o.text, final=o.finished and not empty_final)
        if empty_final:
            r = pb.ModelInferResponse(model_name=request.model_name or self.serving.info.name,
                                      model_version=request.model_version or "1", id=request.id)
            r.parameters["triton_final_response"].bool_param = True
            yield r

    async def ModelStreamInfer(self, request_iterator, context):
        """Many requests in, their responses out as they come (errors as error_message responses)."""
        out: asyncio.Queue = asyncio.Queue()
        one_done = object()
        tasks: list[asyncio.Task] = []
        pending = 0

        async def run_one(request) -> None:
            try:
                async for r in self._stream_one(request):
                    await out.put(pb.ModelStreamInferResponse(infer_response=r))
            except RequestError as e:
                await out.put(pb.ModelStreamInferResponse(
                    error_message=str(e), infer_response=pb.ModelInferResponse(id=request.id)))
            finally:
                out.put_nowait(one_done)

        async def read() -> None:
            nonlocal pending
            async for request in request_iterator:
                pending += 1
                tasks.append(asyncio.create_task(run_one(request)))
            await out.put(None)  # the client sent its last request

        reader = asyncio.create_task(read())
        reading = True
        try:
            while reading or pending:
                item = await out.get()
                if item is None:
                    reading = False
                elif item is one_done:
                    pending -= 1
                else:
                    yield item
        finally:
            reader.cancel()
            for t in tasks:
                t.cancel()
