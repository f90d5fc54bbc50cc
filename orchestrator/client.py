"""A small synchronous client of orch.v1.OrchService (used by `orch generate`, `orch smoke`, scripts)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from orchestrator.errors import OrchError, RuntimeFailure

_BAD_INPUT = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}


class RequestRejected(OrchError):
    """The server refused the request as invalid (exit code 2)."""


@dataclass
class Completion:
    """A whole answer (or what a stream delivered)."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""            # "length", "stop", "cancelled" ("" while running)
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _finish_name(pb: Any, value: int) -> str:
    return "" if value == 0 else pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def completion_from(pb: Any, msg: Any, into: Completion | None = None) -> Completion:
    """Add one GenerateResponse to a Completion (a fresh one when into is None)."""
    c = into or Completion()
    c.request_id = msg.request_id
    c.token_ids.extend(msg.token_ids)
    c.text += msg.text
    c.logprobs.extend({"token_id": lp.token_id, "logprob": lp.logprob,
                       "top": [(t.token_id, t.logprob) for t in lp.top]} for lp in msg.logprobs)
    if msg.finish_reason:
        c.finish_reason = _finish_name(pb, msg.finish_reason)
        c.stop_reason = msg.stop_reason
        c.prompt_tokens = msg.usage.prompt_tokens
        c.completion_tokens = msg.usage.completion_tokens
        c.cached_prompt_tokens = msg.usage.cached_prompt_tokens
    return c


class OrchClient:
    """Talks to one orch server at HOST:PORT."""

    def __init__(self, endpoint: str, timeout: float | None = None, max_message_bytes: int = 64 << 20,
                 tls_ca: str | None = None) -> None:
        import grpc

        from protos.orch.v1 import orch_pb2, orch_pb2_grpc

        self.endpoint, self.timeout, self.pb = endpoint, timeout, orch_pb2
        self._grpc = grpc
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca is not None:  # TLS, trusting this CA bundle ("" = the system's roots)
            from pathlib import Path

            roots = Path(tls_ca).read_bytes() if tls_ca else None
            self.channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self.channel = grpc.insecure_channel(endpoint, options=options)
        self.stub = orch_pb2_grpc.OrchServiceStub(self.channel)

    def __enter__(self) -> "OrchClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _error(self, e: Any) -> OrchError:
        code = e.code().name if hasattr(e, "code") and e.code() else "UNKNOWN"
        msg = f"{self.endpoint}: {code}: {e.details() if hasattr(e, 'details') else e}"
        return RequestRejected(msg) if code in _BAD_INPUT else RuntimeFailure(msg)

    def request(self, prompt: str | None = None, prompt_ids: list[int] | None = None, *, max_tokens: int = 16,
                temperature: float = 0.0, top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                repetition_penalty: float | None = None, stop: list[str] | None = None,
                stop_token_ids: list[int] | None = None, ignore_eos: bool = False, logprobs: bool = False,
                top_logprobs: int = 0, model: str = "", request_id: str = "",
                include_special_tokens: bool = False) -> Any:
        """The GenerateRequest message for these arguments."""
        pb = self.pb
        s = pb.SamplingParams(temperature=temperature, top_k=top_k, max_tokens=max_tokens, ignore_eos=ignore_eos,
                              logprobs=logprobs, top_logprobs=top_logprobs, stop=stop or [],
                              stop_token_ids=stop_token_ids or [])
        if top_p is not None:
            s.top_p = top_p
        if seed is not None:
            s.seed = seed
        if repetition_penalty is not None:
            s.repetition_penalty = repetition_penalty
        return pb.GenerateRequest(model=model, prompt=prompt or "", prompt_token_ids=prompt_ids or [],
                                  sampling=s, request_id=request_id, include_special_tokens=include_special_tokens)

    def generate(self, prompt: str | None = None, prompt_ids: list[int] | None = None, **kw: Any) -> Completion:
        """The whole completion in one call (unary Generate)."""
        try:
            msg = self.stub.Generate(self.request(prompt, prompt_ids, **kw), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return completion_from(self.pb, msg)

    def stream(self, prompt: str | None = None, prompt_ids: list[int] | None = None, **kw: Any) -> Iterator[Completion]:
        """One Completion per streamed message (its new tokens and text; the last has finish_reason)."""
        call = self.stub.GenerateStream(self.request(prompt, prompt_ids, **kw), timeout=self.timeout)
        try:
            for msg in call:
                yield completion_from(self.pb, msg)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()

    def tokenize(self, text: str, add_special_tokens: bool = True, model: str = "") -> list[int]:
        """Token ids of text with the served model's tokenizer."""
        try:
            r = self.stub.Tokenize(self.pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens,
                                                           model=model), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return list(r.token_ids)

    def model_info(self, model: str = "") -> dict[str, Any]:
        """The server's ModelInfo as a dict."""
        try:
            r = self.stub.ModelInfo(self.pb.ModelInfoRequest(model=model), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return {f.name: list(getattr(r, f.name)) if f.is_repeated else getattr(r, f.name) for f in r.DESCRIPTOR.fields}

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health service says SERVING."""
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        end = time.monotonic() + timeout
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except self._grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise RuntimeFailure(f"{self.endpoint}: server not ready after {timeout:.0f} s")
            time.sleep(0.2)
