"""KServe v2 front end driven by the real tritonclient[grpc] with TensorRT-LLM ensemble tensor names."""
import queue

import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from protos.kserve import grpc_predict_v2_pb2 as ours
from protos.orch.v1 import orch_pb2, orch_pb2_grpc
from tests.fixtures.serving import start_server, tiny_shards

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from workers.engine import Engine

    shards = tiny_shards(tmp_path_factory.mktemp("kserve"))
    # an engine made by the caller, as a Ray rank actor does; the server derives the model facts from it
    engine = Engine(shards / "tp1-pp1", num_kv_blocks=64, block_size=16)
    srv = start_server(shards, engine=engine, max_seq_len=256)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def orch_text(server, n, **kw):
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        r = orch_pb2_grpc.OrchServiceStub(ch).Generate(orch_pb2.GenerateRequest(
            prompt=PROMPT, sampling=orch_pb2.SamplingParams(max_tokens=n, ignore_eos=True, **kw)))
    return r.text


def inputs(prompt=PROMPT, max_tokens=12, stream=None, **extra):
    def t(name, arr, dtype):
        i = tg.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        return i

    out = [t("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
           t("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
           t("min_length", np.array([[max_tokens]], dtype=np.int32), "INT32")]  # = ignore EOS
    if stream is not None:
        out.append(t("stream", np.array([[stream]], dtype=bool), "BOOL"))
    types = {"temperature": (np.float32, "FP32"), "top_k": (np.int32, "INT32"), "top_p": (np.float32, "FP32"),
             "random_seed": (np.uint64, "UINT64")}
    for k, v in extra.items():
        np_t, dt = types[k]
        out.append(t(k, np.array([[v]], dtype=np_t), dt))
    return out


def test_our_messages_match_tritonclients_on_the_wire():
    from tritonclient.grpc import service_pb2 as theirs

    def fields(d):
        return {f.name: (f.number, f.type, f.is_repeated) for f in d.fields}

    def same(a, b):
        assert fields(a).items() <= fields(b).items(), a.full_name
        for n in a.nested_types:
            same(n, b.nested_types_by_name[n.name])

    for name, d in ours.DESCRIPTOR.message_types_by_name.items():
        same(d, theirs.DESCRIPTOR.message_types_by_name[name])
    for m in ours.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        t = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming) == \
               (t.input_type.full_name, t.output_type.full_name, t.client_streaming, t.server_streaming)


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("ensemble")
    assert not client.is_model_ready("other")
    md = client.get_model_metadata("tiny")
    assert {i.name for i in md.inputs} >= {"text_input", "max_tokens", "stream"}
    assert [o.name for o in md.outputs] == ["text_output"]
    assert client.get_server_metadata().name == "orch"


def test_infer_returns_prompt_and_completion(server, client):
    r = client.infer("ensemble", inputs(max_tokens=12))
    text = r.as_numpy("text_output").reshape(-1)[0].decode()
    assert text == PROMPT + orch_text(server, 12)
    ex = tg.InferInput("exclude_input_in_output", [1, 1], "BOOL")
    ex.set_data_from_numpy(np.array([[True]]))
    r = client.infer("tiny", inputs(max_tokens=12) + [ex])
    assert r.as_numpy("text_output").reshape(-1)[0].decode() == orch_text(server, 12)


def test_streaming_deltas_add_up_and_seeded_sampling_repeats(server, client):
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for rid, kw in (("greedy", {}), ("s1", dict(temperature=1.0, random_seed=7)),
                        ("s2", dict(temperature=1.0, random_seed=7))):
            client.async_stream_infer("ensemble", inputs(max_tokens=10, stream=True, **kw), request_id=rid)
        client.async_stream_infer("ensemble", inputs(max_tokens=10, stream=True), request_id="empty-final",
                                  enable_empty_final_response=True)
        parts: dict[str, list[str]] = {"greedy": [], "s1": [], "s2": [], "empty-final": []}
        finals = set()
        while len(finals) < 4:
            result, error = got.get(timeout=30)
            assert error is None
            resp = result.get_response()
            out = result.as_numpy("text_output")
            if resp.parameters["triton_final_response"].bool_param:
                finals.add(resp.id)
                if resp.id == "empty-final":
                    assert out is None  # the extra, empty last response
                    continue
            parts[resp.id].append(out.reshape(-1)[0].decode())
    finally:
        client.stop_stream()
    assert len(parts["greedy"]) == 10 and "".join(parts["greedy"]) == orch_text(server, 10)
    assert "".join(parts["s1"]) == "".join(parts["s2"])
    assert parts["empty-final"] == parts["greedy"]


def test_non_streamed_request_on_the_stream_and_errors(server, client):
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("tiny", inputs(max_tokens=6, stream=False), request_id="whole")
        result, error = got.get(timeout=30)
        assert error is None
        assert result.as_numpy("text_output").reshape(-1)[0].decode() == PROMPT + orch_text(server, 6)
        client.async_stream_infer("tiny", inputs(max_tokens=6, top_p=1.5), request_id="bad")
        result, error = got.get(timeout=30)
        assert isinstance(error, InferenceServerException) and "top_p" in str(error)
    finally:
        client.stop_stream()


def test_bad_requests_get_clear_errors(client):
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", inputs())
    bogus = tg.InferInput("not_an_input", [1, 1], "INT32")
    bogus.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="unknown input 'not_an_input'"):
        client.infer("tiny", inputs() + [bogus])
    with pytest.raises(InferenceServerException, match="max_seq_len"):
        client.infer("tiny", inputs(max_tokens=10_000))
    with pytest.raises(InferenceServerException, match="temperature"):
        client.infer("tiny", inputs(temperature=float("nan")))
    assert client.infer("tiny", inputs(max_tokens=2)).as_numpy("text_output") is not None


def test_cancelling_the_stream_frees_the_blocks(server, client):
    import time

    from tests.fixtures.serving import scrape

    got: queue.Queue = queue.Queue()
    before = scrape(server.metrics_port)['orch_requests_total{outcome="cancelled"}']
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("tiny", inputs(max_tokens=200, stream=True), request_id="long")
    for _ in range(3):
        assert got.get(timeout=30)[1] is None
    assert scrape(server.metrics_port)["orch_kv_blocks_used"] > 0
    client.stop_stream(cancel_requests=True)
    end = time.monotonic() + 5
    while scrape(server.metrics_port)["orch_kv_blocks_used"] > 0:
        assert time.monotonic() < end, "blocks not freed after the stream was cancelled"
        time.sleep(0.02)
    assert scrape(server.metrics_port)['orch_requests_total{outcome="cancelled"}'] == before + 1
