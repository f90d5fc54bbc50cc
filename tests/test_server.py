"""A real orch server on loopback (CPU engine, tiny random model): batching equals running alone,
prefix cache hits, cancellation, over-capacity load, bad input, seeded sampling, health, reflection."""
import asyncio
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.orch.v1 import orch_pb2, orch_pb2_grpc
from tests.fixtures.serving import scrape, start_server, tiny_shards

VOCAB = 512
BLOCKS, BS = 48, 16  # 768 KV slots: the 64-client test needs about 3000, so it queues and preempts


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(shards):
    srv = start_server(shards, num_kv_blocks=BLOCKS, block_size=BS,
                       max_num_seqs=64, max_num_batched_tokens=256, max_seq_len=512)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield orch_pb2_grpc.OrchServiceStub(ch)
    ch.close()


def greedy(ids, n, **kw):
    return orch_pb2.GenerateRequest(prompt_token_ids=ids, sampling=orch_pb2.SamplingParams(
        max_tokens=n, ignore_eos=True, **kw))


def random_prompts(n, seed, lo=2, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


async def _stream_all(port, requests):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        st = orch_pb2_grpc.OrchServiceStub(ch)

        async def one(req):
            msgs = [m async for m in st.GenerateStream(req)]
            return msgs

        return await asyncio.gather(*(one(r) for r in requests))


def test_64_concurrent_streams_get_exactly_their_alone_greedy_tokens(server, stub):
    prompts = random_prompts(64, seed=1)
    alone = [list(stub.Generate(greedy(p, 8)).token_ids) for p in prompts]
    before = scrape(server.metrics_port)
    results = asyncio.run(_stream_all(server.port, [greedy(p, 8) for p in prompts]))
    for p, want, msgs in zip(prompts, alone, results):
        got = [t for m in msgs for t in m.token_ids]
        assert got == want
        assert all(m.finish_reason == orch_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        last = msgs[-1]
        assert last.finish_reason == orch_pb2.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(p), 8)
    after = scrape(server.metrics_port)
    assert after['orch_requests_total{outcome="completed"}'] - before['orch_requests_total{outcome="completed"}'] == 64
    assert after["orch_generated_tokens_total"] - before["orch_generated_tokens_total"] == 64 * 8
    assert after["orch_kv_blocks_used"] == 0
    assert after["orch_time_to_first_token_seconds_count"] >= 128


def test_more_requests_than_kv_capacity_all_complete(server, stub):
    prompts = random_prompts(24, seed=2, lo=60, hi=100)  # ~24 x 8 blocks = 4x the cache
    alone = [list(stub.Generate(greedy(p, 40)).token_ids) for p in prompts[:3]]
    before = scrape(server.metrics_port)
    results = asyncio.run(_stream_all(server.port, [greedy(p, 40) for p in prompts]))
    assert all(msgs[-1].usage.completion_tokens == 40 for msgs in results)
    assert [[t for m in msgs for t in m.token_ids] for msgs in results[:3]] == alone
    after = scrape(server.metrics_port)
    assert after["orch_preemptions_total"] > before["orch_preemptions_total"]
    assert after["orch_kv_blocks_used"] == 0


def test_shared_prefix_shows_cache_hits(server, stub):
    prefix = random_prompts(1, seed=3, lo=50, hi=51)[0]
    before = scrape(server.metrics_port)
    first = stub.Generate(greedy(prefix + [5, 6], 4))
    second = stub.Generate(greedy(prefix + [7, 8, 9], 4))
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens == 48  # three full blocks of 16
    after = scrape(server.metrics_port)
    assert after["orch_prefix_cache_hit_tokens_total"] - before["orch_prefix_cache_hit_tokens_total"] >= 48
    assert 0 < after["orch_prefix_cache_hit_rate"] <= 1


def _wait_metric(port, name, pred, timeout=5.0):
    end = time.monotonic() + timeout
    while True:
        v = scrape(port).get(name)
        if pred(v) or time.monotonic() > end:
            return v
        time.sleep(0.02)


def test_cancelling_a_stream_frees_its_blocks(server, stub):
    before = scrape(server.metrics_port)['orch_requests_total{outcome="cancelled"}']
    call = stub.GenerateStream(greedy(random_prompts(1, seed=4, lo=40, hi=41)[0], 400))
    for i, _ in enumerate(call):
        if i == 3:
            break
    assert scrape(server.metrics_port)["orch_kv_blocks_used"] > 0
    call.cancel()
    assert _wait_metric(server.metrics_port, "orch_kv_blocks_used", lambda v: v == 0) == 0
    assert _wait_metric(server.metrics_port, 'orch_requests_total{outcome="cancelled"}',
                        lambda v: v == before + 1) == before + 1


def test_seeded_sampling_is_reproducible(server, stub):
    p = random_prompts(1, seed=5)[0]

    def req(seed):
        return orch_pb2.GenerateRequest(prompt_token_ids=p, sampling=orch_pb2.SamplingParams(
            temperature=1.0, top_p=0.95, top_k=50, seed=seed, max_tokens=16, ignore_eos=True))

    a = list(stub.Generate(req(123)).token_ids)
    # again, while other requests share the batch
    others = [greedy(q, 16) for q in random_prompts(6, seed=6)]
    results = asyncio.run(_stream_all(server.port, others + [req(123), req(124)]))
    b = [t for m in results[-2] for t in m.token_ids]
    c = [t for m in results[-1] for t in m.token_ids]
    assert a == b and a != c


def test_text_prompt_stream_and_stop_string(server, stub):
    full = stub.Generate(orch_pb2.GenerateRequest(prompt="The quick brown fox", sampling=orch_pb2.SamplingParams(
        max_tokens=24, ignore_eos=True)))
    streamed = list(stub.GenerateStream(orch_pb2.GenerateRequest(
        prompt="The quick brown fox", sampling=orch_pb2.SamplingParams(max_tokens=24, ignore_eos=True))))
    assert "".join(m.text for m in streamed) == full.text
    assert [t for m in streamed for t in m.token_ids] == list(full.token_ids)
    text = full.text
    before = scrape(server.metrics_port)
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    cut = stub.Generate(orch_pb2.GenerateRequest(prompt="The quick brown fox", sampling=orch_pb2.SamplingParams(
        max_tokens=24, ignore_eos=True, stop=[stop])))
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == orch_pb2.FINISH_REASON_STOP and cut.stop_reason == stop
    chunks = list(stub.GenerateStream(orch_pb2.GenerateRequest(
        prompt="The quick brown fox", sampling=orch_pb2.SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))))
    assert "".join(m.text for m in chunks) == cut.text  # the stop string never leaks into the stream
    # the front end found the stop strings and told the engine: both sequences ended there, as completed
    deadline = time.time() + 10
    while (after := scrape(server.metrics_port))["orch_running_sequences"] and time.time() < deadline:
        time.sleep(0.05)
    assert after["orch_running_sequences"] == 0 and after["orch_kv_blocks_used"] == 0
    assert after['orch_requests_total{outcome="completed"}'] - before['orch_requests_total{outcome="completed"}'] == 2
    assert after["orch_generated_tokens_total"] - before["orch_generated_tokens_total"] < 2 * 24


def test_logprobs_tokenize_and_model_info(server, stub):
    r = stub.Generate(greedy(random_prompts(1, seed=7)[0], 3, logprobs=True, top_logprobs=2))
    assert len(r.logprobs) == 3
    for lp, tok in zip(r.logprobs, r.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0 and lp.top[0].token_id == tok  # greedy = the top-1
    tk = stub.Tokenize(orch_pb2.TokenizeRequest(text="café 東京"))
    assert len(tk.token_ids) == len(tk.tokens) > 0
    info = stub.ModelInfo(orch_pb2.ModelInfoRequest(model="tiny"))
    assert (info.vocab_size, info.num_kv_blocks, info.block_size, info.max_seq_len) == (VOCAB, BLOCKS, BS, 512)


@pytest.mark.parametrize("req,code,words", [
    (orch_pb2.GenerateRequest(model="nope", prompt_token_ids=[5]), grpc.StatusCode.NOT_FOUND, "unknown model"),
    (orch_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty prompt"),
    (orch_pb2.GenerateRequest(prompt_token_ids=[5, VOCAB]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    (orch_pb2.GenerateRequest(prompt_token_ids=[5, -1]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    (greedy([5] * 500, 100), grpc.StatusCode.INVALID_ARGUMENT, "max_seq_len"),
    (greedy([5], 4, temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (greedy([5], 4, temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (greedy([5], 4, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (greedy([5], 4, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (greedy([5], 4, top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (greedy([5], -3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (greedy([5], 4, repetition_penalty=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
    (orch_pb2.GenerateRequest(prompt="fox " * 4000), grpc.StatusCode.INVALID_ARGUMENT, "max_seq_len"),  # long text
    (orch_pb2.GenerateRequest(prompt="x" * (5 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(server, stub, req, code, words):
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == code
        assert words in e.value.details()
    assert len(stub.Generate(greedy([5, 6, 7], 2)).token_ids) == 2


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    h = health_pb2_grpc.HealthStub(ch)
    for name in ("", "orch.v1.OrchService", "inference.GRPCInferenceService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(ch)
    services = set(db.get_services())
    assert {"orch.v1.OrchService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("orch.v1.GenerateRequest").package == "orch.v1"
    assert db.FindFileContainingSymbol("inference.ModelInferRequest").package == "inference"
    ch.close()


def test_orch_serve_with_tp2_ranks_and_orch_generate(shards, stub):
    """`orch serve` in its own process, tensor parallel over two local rank processes (gloo),
    answers `orch generate` with the same greedy tokens as the in-process tp1 server."""
    import json
    import signal
    import subprocess
    import sys

    from orchestrator.client import OrchClient
    from workers.convert import convert_checkpoint
    from workers.server import free_port

    tp2 = shards.parent / "shards-tp2"
    convert_checkpoint(shards.parent / "model", tp2, 2, 1)
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--shards", str(tp2),
           "--port", str(port), "--metrics-port", str(mport), "--num-kv-blocks", "32", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with OrchClient(f"127.0.0.1:{port}") as c:
            c.wait_ready(60)
            assert c.model_info()["tp_size"] == 2
        want = list(stub.Generate(orch_pb2.GenerateRequest(prompt="The quick brown fox", sampling=orch_pb2.SamplingParams(
            max_tokens=10, ignore_eos=True))).token_ids)
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", "--endpoint", f"127.0.0.1:{port}",
                              "--prompt", "The quick brown fox", "--max-tokens", "10", "--ignore-eos", "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["token_ids"] == want and got["finish_reason"] == "length" and got["completion_tokens"] == 10
        streamed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", "--endpoint",
                                   f"127.0.0.1:{port}", "--prompt", "The quick brown fox", "--max-tokens", "10",
                                   "--ignore-eos", "--stream"], capture_output=True, text=True, timeout=60)
        assert streamed.returncode == 0 and streamed.stdout == got["text"] + "\n"
        bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", "--endpoint", f"127.0.0.1:{port}",
                              "--prompt-ids", "1,2", "--top-p", "1.5"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log


def test_an_engine_failure_fails_requests_and_health_but_not_the_server(shards):
    """A step that raises fails the running requests with INTERNAL and marks health NOT_SERVING;
    the server keeps answering."""
    from workers.engine import Engine

    class Breakable:
        """The real engine, with a switch that makes its next step raise."""

        def __init__(self, engine):
            self.engine, self.broken = engine, False

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def step(self, step):
            if self.broken:
                raise RuntimeError("rank 1 went away")
            return self.engine.step(step)

    eng = Breakable(Engine(shards / "tp1-pp1", num_kv_blocks=32, block_size=16))
    srv = start_server(shards, engine=eng, num_kv_blocks=32)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        st, h = orch_pb2_grpc.OrchServiceStub(ch), health_pb2_grpc.HealthStub(ch)
        assert len(st.Generate(greedy([5, 6], 3)).token_ids) == 3
        eng.broken = True
        with pytest.raises(grpc.RpcError) as e:
            st.Generate(greedy([5, 6], 3))
        assert e.value.code() == grpc.StatusCode.INTERNAL and "rank 1 went away" in e.value.details()
        end = time.monotonic() + 5
        while h.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < end
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as e:
            st.Generate(greedy([5, 6], 3))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert st.ModelInfo(orch_pb2.ModelInfoRequest()).vocab_size == VOCAB
        ch.close()
    finally:
        srv.stop()


def test_a_second_server_on_a_busy_port_fails_clearly(server, shards):
    from orchestrator.errors import RuntimeFailure

    with pytest.raises(RuntimeFailure, match=f"cannot listen on 127.0.0.1:{server.port}"):
        start_server(shards, port=server.port, num_kv_blocks=8)


def test_a_dead_front_end_marks_the_server_unhealthy_and_frees_its_sequences(shards):
    """The gRPC front end is a child process: if it dies, the server says so (the controller's health
    check reads this) and the engine drops the sequences nobody can read any more."""
    srv = start_server(shards, num_kv_blocks=32)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        st = orch_pb2_grpc.OrchServiceStub(ch)
        assert srv.healthy and len(st.Generate(greedy([5, 6], 3)).token_ids) == 3
        stream = st.GenerateStream(orch_pb2.GenerateRequest(
            prompt_token_ids=[5, 6, 7], sampling=orch_pb2.SamplingParams(max_tokens=500, ignore_eos=True)))
        next(stream)                                   # a long request is running
        srv.server._frontend.kill()
        end = time.monotonic() + 10
        while srv.healthy or srv.server.loop.scheduler.has_work():
            assert time.monotonic() < end, "still healthy, or the orphaned sequence still runs"
            time.sleep(0.05)
        assert srv.server.loop.healthy                 # the engine itself is fine
        m = scrape(srv.metrics_port)
        assert m['orch_requests_total{outcome="cancelled"}'] == 1      # aborted, not run to its end
        assert m['orch_requests_total{outcome="completed"}'] == 1      # the first request
        ch.close()
    finally:
        srv.stop()


def test_ctrl_c_stops_orch_serve_and_its_front_end_cleanly(shards):
    """Ctrl-C goes to the whole process group (the front-end process too): exit 0, no traceback, and the
    port is closed afterwards."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from orchestrator.client import OrchClient
    from workers.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--shards", str(shards), "--port",
                             str(port), "--num-kv-blocks", "32", "--device", "cpu", "--no-metrics"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with OrchClient(f"127.0.0.1:{port}") as c:
            c.wait_ready(60)
            assert len(c.generate(prompt_ids=[5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in log, log
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
