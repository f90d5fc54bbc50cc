"""orch bench: statistics and workload (pure), and runs against a real orch server on loopback (tiny
random model, CPU engine): token counts agree with the request log and the server's own counters,
errors are counted by status, sweeps give a table and a PNG, KServe v2 streaming."""
import json
import math
import random
import socket
from pathlib import Path

import numpy as np
import pytest

from orchestrator.bench import (BenchConfig, BenchConfigError, Workload, parse_sweep, poisson_arrivals,
                                run_bench, sample_lengths, sweep_configs, text_prompt, token_prompt)
from orchestrator.bench_stats import (Dist, RequestRecord, max_overlap, percentile, plot_sweep, summarize,
                                      sweep_table)
from orchestrator.cli import build_parser, main
from tests.fixtures.serving import scrape, start_server, tiny_shards

MAX_SEQ = 256


# ---------------------------------------------------------------------------------------------- pure


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(1)
    for n in (1, 2, 7, 100, 1001):
        vals = sorted(rng.uniform(0, 1000) for _ in range(n))
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)), rel=1e-12, abs=1e-9)
    assert math.isnan(percentile([], 50))


def test_dist_summarizes_and_is_nan_when_empty():
    vals = [random.Random(2).expovariate(0.1) for _ in range(501)]
    d = Dist.of(vals)
    assert (d.n, d.min, d.max) == (501, min(vals), max(vals))
    assert d.mean == pytest.approx(sum(vals) / len(vals))
    assert d.p50 == pytest.approx(float(np.median(vals)))
    assert d.p90 <= d.p99 <= d.max
    e = Dist.of([])
    assert e.n == 0 and math.isnan(e.p99) and math.isnan(e.mean)


def test_length_distributions():
    rng = random.Random(3)
    assert sample_lengths(100, 5, "fixed", 0.5, rng) == [100] * 5
    u = sample_lengths(200, 4000, "uniform", 0.25, rng)
    assert min(u) >= 150 and max(u) <= 250 and len(set(u)) > 50
    assert sum(u) / len(u) == pytest.approx(200, rel=0.02)
    nrm = sample_lengths(200, 4000, "normal", 0.1, rng)
    assert sum(nrm) / len(nrm) == pytest.approx(200, rel=0.02)
    assert float(np.std(nrm)) == pytest.approx(20, rel=0.1)
    assert min(sample_lengths(3, 1000, "normal", 0.9, rng)) >= 1
    assert sample_lengths(64, 20, "uniform", 0.3, random.Random(9)) == \
        sample_lengths(64, 20, "uniform", 0.3, random.Random(9))


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    rate = 7.5
    t = poisson_arrivals(rate, random.Random(4), n=20000)
    assert len(t) == 20000 and all(b > a for a, b in zip(t, t[1:]))
    gaps = np.diff([0.0] + t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert (gaps < 1 / rate).mean() == pytest.approx(1 - math.exp(-1), abs=0.015)  # exponential CDF at the mean
    assert t[:50] == poisson_arrivals(rate, random.Random(4), n=50)
    d = poisson_arrivals(rate, random.Random(5), duration_s=30.0)
    assert d[-1] < 30.0 and len(d) == pytest.approx(rate * 30, rel=0.2)


def test_token_prompts_stay_in_vocab_and_avoid_special_ids():
    rng = np.random.default_rng(6)
    ids = token_prompt(5000, 10, {0, 1, 9}, rng)
    assert len(ids) == 5000 and set(ids) <= set(range(2, 9)) and len(set(ids)) == 7


def test_workload_is_seeded_and_prompts_are_unique():
    cfg = BenchConfig("h:1", input_len=32, output_len=8, input_len_dist="uniform")
    a, b = Workload(cfg, 1000, {1}).take(20), Workload(cfg, 1000, {1}).take(20)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert all(len(r.prompt) == r.input_len for r in a) and len({tuple(r.prompt) for r in a}) == 20
    assert len({r.input_len for r in a}) > 1
    c = Workload(cfg, 1000, {1}, seed_offset=1).take(20)
    assert [r.prompt for r in c] != [r.prompt for r in a]


def test_text_prompts_have_exact_token_counts_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    from workers.models.tiny import write_tokenizer

    write_tokenizer(tmp_path, 512)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(7)
    for n in (1, 17, 200):
        text = text_prompt(n, rng, tok)
        assert len(tok.encode(text, add_special_tokens=False).ids) == n
        assert len(text_prompt(n, rng).split()) == n


def _record(rng, index, start, osl, status="OK"):
    r = RequestRecord(index, 16, osl, start_ns=start)
    t = start + rng.randrange(1_000_000, 50_000_000)
    for _ in range(osl if status == "OK" else osl // 2):
        r.chunk_ns.append(t)
        r.chunk_tokens.append(1)
        t += rng.randrange(100_000, 5_000_000)
    r.end_ns = t
    r.status = status
    return r


def test_record_latencies():
    rng = random.Random(8)
    r = _record(rng, 0, 10_000, 9)
    assert r.ttft_ms() == (r.chunk_ns[0] - 10_000) / 1e6
    assert r.tpot_ms() == pytest.approx((r.chunk_ns[-1] - r.chunk_ns[0]) / 1e6 / 8)
    itl = r.itls_ms()
    assert len(itl) == 8 and sum(itl) == pytest.approx((r.chunk_ns[-1] - r.chunk_ns[0]) / 1e6)
    assert r.e2e_ms() >= r.ttft_ms()
    r.chunk_tokens[3] = 3  # a message carrying three tokens
    assert r.output_tokens == 11 and r.tpot_ms() == pytest.approx((r.chunk_ns[-1] - r.chunk_ns[0]) / 1e6 / 10)


def test_summary_counts_errors_and_divides_by_the_span():
    rng = random.Random(9)
    recs = [_record(rng, i, rng.randrange(0, 10**9), 5) for i in range(30)]
    recs += [_record(rng, 30 + i, rng.randrange(0, 10**9), 6, "UNAVAILABLE") for i in range(3)]
    recs += [_record(rng, 40, rng.randrange(0, 10**9), 4, "INVALID_ARGUMENT")]
    recs[0].chunk_tokens.pop()  # one short answer
    recs[0].chunk_ns.pop()
    s = summarize(BenchConfig("h:1"), recs)
    span = (max(r.end_ns for r in recs) - min(r.start_ns for r in recs)) / 1e9
    assert (s.num_requests, s.completed, s.failed) == (34, 30, 4)
    assert s.errors == {"INVALID_ARGUMENT": 1, "UNAVAILABLE": 3}
    assert s.total_output_tokens == 149 and s.streamed_output_tokens == 149 + 3 * 3 + 2
    assert s.output_len_mismatches == 1 and s.requested_output_tokens == 150
    assert s.duration_s == pytest.approx(span)
    assert s.output_throughput_tok_per_s == pytest.approx(149 / span)
    assert s.request_throughput_req_per_s == pytest.approx(30 / span)
    assert s.ttft_ms.n == 30 and s.e2e_ms.n == 30 and s.itl_ms.n == 30 * 4 - 1
    assert s.max_in_flight == max_overlap([(r.start_ns, r.end_ns) for r in recs])
    m = s.flat_metrics()
    assert m["ttft_p99_ms"] == s.ttft_ms.p99 and m["output_throughput_tok_per_s"] == s.output_throughput_tok_per_s
    json.dumps(s.to_dict())


def test_max_overlap():
    assert max_overlap([(0, 10), (5, 15), (10, 20), (12, 13)]) == 3
    assert max_overlap([]) == 0


def test_sweep_parsing_and_configs():
    assert parse_sweep("concurrency=1,8,64,256") == ("concurrency", [1, 8, 64, 256])
    assert parse_sweep("rate=0.5,2") == ("request_rate", [0.5, 2.0])
    for bad in ("concurrency", "batch=1,2", "concurrency=1,x", "concurrency=0,4", "concurrency="):
        with pytest.raises(BenchConfigError):
            parse_sweep(bad)
    cfgs = sweep_configs(BenchConfig("h:1"), "concurrency", [1, 32])
    assert [c.concurrency for c in cfgs] == [1, 32] and [c.total_requests() for c in cfgs] == [64, 128]


def test_sweep_table_and_plot(tmp_path):
    rng = random.Random(10)
    sums = []
    for c in (1, 4, 16):
        recs = [_record(rng, i, rng.randrange(0, 10**8), 4) for i in range(5 * c)]
        sums.append(summarize(BenchConfig("h:1", concurrency=c), recs))
    headers, rows = sweep_table("concurrency", sums)
    assert headers[0] == "concurrency" and [r[0] for r in rows] == ["1", "4", "16"]
    assert all(len(r) == len(headers) for r in rows)
    assert rows[2][headers.index("out tok/s")] == f"{sums[2].output_throughput_tok_per_s:.1f}"
    png = plot_sweep("concurrency", sums, tmp_path / "sub" / "sweep.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_config_validation_names_the_flag():
    for kw, flag in [({"endpoint": "nohost"}, "--endpoint"), ({"input_len": 0}, "--input-len"),
                     ({"concurrency": 0}, "--concurrency"), ({"request_rate": -1.0}, "--request-rate"),
                     ({"input_len_dist": "zipf"}, "--input-len-dist"), ({"len_spread": 1.5}, "--len-spread"),
                     ({"protocol": "kserve", "stream": False}, "--no-stream"),
                     ({"concurrency": None}, "--concurrency"), ({"tokenizer": "/nonexistent"}, "--tokenizer")]:
        with pytest.raises(BenchConfigError, match=flag):
            BenchConfig(**{"endpoint": "h:1", **kw}).validate()


def test_cli_help_and_rate_without_cap(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--sweep", "--request-rate", "TTFT", "TPOT", "ITL", "kserve", "--input-len-dist", "--json"):
        assert word in out
    from orchestrator.commands.bench import config_from_args

    cfg = config_from_args(build_parser().parse_args(["bench", "--endpoint", "h:1", "--request-rate", "3"]))
    assert cfg.concurrency is None and cfg.request_rate == 3.0
    cfg = config_from_args(build_parser().parse_args(["bench", "--endpoint", "h:1"]))
    assert cfg.concurrency == 1
    assert main(["bench", "--endpoint", "h:1", "--input-len-dist", "normal", "--len-spread", "2"]) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_counts_every_request_as_unavailable(capsys):
    port = _closed_port()
    res = run_bench(BenchConfig(f"127.0.0.1:{port}", concurrency=3, num_requests=7, warmup_requests=2,
                                timeout_s=5))
    s = res.summary
    assert (s.num_requests, s.completed, s.failed) == (7, 0, 7) and s.errors == {"UNAVAILABLE": 7}
    assert len(res.warmup) == 2 and not any(r.ok for r in res.warmup)
    assert any("server info unavailable" in n for n in s.notes)
    assert main(["bench", "--endpoint", f"127.0.0.1:{port}", "-n", "3", "--warmup", "0", "--json",
                 "--no-progress"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["errors"] == {"UNAVAILABLE": 3} and out["output_throughput_tok_per_s"] == 0


# ----------------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    shards = tiny_shards(tmp_path_factory.mktemp("bench"))
    srv = start_server(shards, num_kv_blocks=96, block_size=16, max_num_seqs=16, max_num_batched_tokens=256,
                       max_seq_len=MAX_SEQ)
    srv.shards = shards
    yield srv
    srv.stop()


def _generated(srv) -> float:
    return scrape(srv.metrics_port)["orch_generated_tokens_total"]


def test_orch_figures_agree_with_the_request_log_and_the_server(server, tmp_path):
    before = _generated(server)
    cfg = BenchConfig(f"127.0.0.1:{server.port}", input_len=24, output_len=9, input_len_dist="uniform",
                      concurrency=4, num_requests=14, warmup_requests=2, seed=3)
    res = run_bench(cfg)
    s = res.summary
    assert (s.completed, s.failed, s.errors) == (14, 0, {}) and len(res.warmup) == 2
    assert _generated(server) - before == 16 * 9  # the server generated exactly what was asked, warm-up included
    assert s.total_output_tokens == s.streamed_output_tokens == 14 * 9 and s.output_len_mismatches == 0
    assert s.server_count_mismatches == 0
    assert all(r.server_output_tokens == 9 and r.server_prompt_tokens == r.input_len for r in res.records)
    assert s.total_input_tokens == sum(r.input_len for r in res.records) and len({r.input_len for r in res.records}) > 1
    assert s.max_in_flight == 4 and 0 < s.client_cpu_busy < 4
    log = tmp_path / "requests.jsonl"
    res.write_request_log(log)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(14))
    assert sum(r["output_tokens"] for r in rows) == s.total_output_tokens
    assert min(r["start_ms"] for r in rows) == 0.0
    span_ms = max(r["end_ms"] for r in rows)
    assert s.duration_s * 1000 == pytest.approx(span_ms, abs=0.01)
    assert s.output_throughput_tok_per_s == pytest.approx(14 * 9 / s.duration_s)
    ttft = sorted(r["chunk_ms"][0] - r["start_ms"] for r in rows)
    assert s.ttft_ms.p50 == pytest.approx(percentile(ttft, 50), abs=0.01)
    for r in rows:
        assert r["start_ms"] <= r["chunk_ms"][0] <= r["chunk_ms"][-1] <= r["end_ms"]
        assert r["finish_reason"] == "FINISH_REASON_LENGTH"


def test_too_long_requests_are_invalid_argument_and_counted(server):
    cfg = BenchConfig(f"127.0.0.1:{server.port}", input_len=236, output_len=16, input_len_dist="uniform",
                      len_spread=0.05, concurrency=3, num_requests=16, warmup_requests=0, seed=5)
    res = run_bench(cfg)
    too_long = [r for r in res.records if r.input_len + r.requested_output_len > MAX_SEQ]
    assert 0 < len(too_long) < 16
    s = res.summary
    assert s.errors == {"INVALID_ARGUMENT": len(too_long)} and s.failed == len(too_long)
    assert all("max_seq_len" in r.error for r in too_long)
    assert s.completed == 16 - len(too_long) and s.total_output_tokens == 16 * s.completed
    assert s.e2e_ms.n == s.completed
    assert any("exceed the server's max_seq_len" in n for n in s.notes)


def test_poisson_rate_sends_on_schedule(server):
    cfg = BenchConfig(f"127.0.0.1:{server.port}", input_len=8, output_len=4, concurrency=None, request_rate=40.0,
                      num_requests=12, warmup_requests=0, seed=2)
    res = run_bench(cfg)
    assert res.summary.completed == 12 and res.summary.total_output_tokens == 48
    due = sorted(r.scheduled_ns for r in res.records)
    want = poisson_arrivals(40.0, random.Random(2 + 7), n=12)
    offsets = [(d - due[0]) / 1e9 for d in due]
    assert offsets == pytest.approx([w - want[0] for w in want], abs=1e-6)
    assert all(r.start_ns >= r.scheduled_ns for r in res.records)


def test_sweep_cli_prints_json_and_writes_the_plot(server, tmp_path, capsys):
    png, log = tmp_path / "sweep.png", tmp_path / "log.jsonl"
    rc = main(["bench", "--endpoint", f"127.0.0.1:{server.port}", "--isl", "12", "--osl", "5", "-n", "6",
               "--warmup", "1", "--sweep", "concurrency=1,3", "--plot", str(png), "--json", "--request-log", str(log)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sweep"] == "concurrency" and [r["concurrency"] for r in out["results"]] == [1, 3]
    assert all(r["total_output_tokens"] == 30 and r["failed"] == 0 for r in out["results"])
    assert out["results"][0]["max_in_flight"] == 1
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["concurrency"] for r in rows) == [1] * 6 + [3] * 6
    rc = main(["bench", "--endpoint", f"127.0.0.1:{server.port}", "--isl", "12", "--osl", "5", "-n", "4",
               "--warmup", "0", "--sweep", "concurrency=2,4", "--plot", str(png), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "TTFT p50 ms" in text and "plot:" in text
    rc = main(["bench", "--endpoint", f"127.0.0.1:{server.port}", "--isl", "12", "--osl", "5", "-n", "6",
               "--warmup", "0", "--sweep", "request_rate=50,200", "--plot", str(png), "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["request_rate"] for r in out["results"]] == [50.0, 200.0]
    assert all(r["concurrency"] is None and r["total_output_tokens"] == 30 for r in out["results"])


def test_kserve_stream_counts_one_token_per_response(server):
    before = _generated(server)
    cfg = BenchConfig(f"127.0.0.1:{server.port}", protocol="kserve", model="tiny", input_len=20, output_len=7,
                      concurrency=3, num_requests=9, warmup_requests=1, tokenizer=str(server.shards / "tp1-pp1"
                                                                                        / "rank-0-0"))
    res = run_bench(cfg)
    s = res.summary
    assert (s.completed, s.failed) == (9, 0)
    assert _generated(server) - before == 10 * 7
    assert s.total_output_tokens == 63 and s.output_len_mismatches == 0
    assert all(r.finish_reason == "FINAL_RESPONSE" for r in res.records)
    assert any("kserve" in n for n in s.notes)
    bad = run_bench(BenchConfig(f"127.0.0.1:{server.port}", protocol="kserve", model="nope", output_len=3,
                                concurrency=2, num_requests=3, warmup_requests=0))
    assert bad.summary.failed == 3 and set(bad.summary.errors) == {"INFER_ERROR"}


def test_repeated_prompts_from_the_prefix_cache_are_reported(server):
    cfg = BenchConfig(f"127.0.0.1:{server.port}", input_len=40, output_len=3, concurrency=2, num_requests=4,
                      warmup_requests=0, seed=random.randrange(1 << 30))
    first, again = run_bench(cfg).summary, run_bench(cfg).summary
    assert first.cached_prompt_tokens == 0 and not any("prefix cache" in n for n in first.notes)
    assert again.cached_prompt_tokens == 4 * 32 and any("prefix cache" in n for n in again.notes)
    points = sweep_configs(cfg, "concurrency", [1, 2])
    assert points[0].seed != points[1].seed


def test_unary_generate_has_no_per_token_figures(server):
    res = run_bench(BenchConfig(f"127.0.0.1:{server.port}", input_len=9, output_len=5, concurrency=2, num_requests=4,
                                warmup_requests=0, stream=False))
    s = res.summary
    assert (s.completed, s.total_output_tokens, s.output_len_mismatches) == (4, 20, 0)
    assert s.tpot_ms.n == 0 and s.itl_ms.n == 0 and s.ttft_ms.n == 4
    assert all(len(r.chunk_ns) == 1 and r.server_output_tokens == 5 for r in res.records)


def test_two_client_processes_share_the_load(server):
    before = _generated(server)
    cfg = BenchConfig(f"127.0.0.1:{server.port}", input_len=10, output_len=6, concurrency=4, num_requests=10,
                      warmup_requests=2, processes=2, seed=8)
    res = run_bench(cfg)
    s = res.summary
    assert [r.index for r in res.records] == list(range(10)) and len(res.warmup) == 2
    assert (s.completed, s.total_output_tokens) == (10, 60) and _generated(server) - before == 12 * 6
    assert 2 <= s.max_in_flight <= 4 and 0 < s.client_cpu_busy < 4
    single = Workload(cfg, 512, {0, 1}).take(10)  # the same prompts as one process would send
    assert [r.input_len for r in res.records] == [r.input_len for r in single]


def test_duration_bound_run_stops_sending_at_the_deadline(server):
    cfg = BenchConfig(f"127.0.0.1:{server.port}", input_len=8, output_len=4, concurrency=2, duration_s=0.6,
                      warmup_requests=0, processes=2)
    res = run_bench(cfg)
    s = res.summary
    assert s.completed >= 4 and s.failed == 0 and s.total_output_tokens == 4 * s.completed
    assert len({r.index for r in res.records}) == len(res.records)
    t0 = min(r.scheduled_ns for r in res.records)
    assert max(r.scheduled_ns for r in res.records) - t0 < 0.6e9 + 5e7
    assert s.duration_s >= 0.5


@pytest.mark.slow
def test_bench_serving_script_writes_results_on_cpu(tmp_path):
    import subprocess
    import sys

    from workers.models.tiny import write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "tiny", seed=4)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serving.py"
    subprocess.run([sys.executable, str(script), "run", "--model", str(model), "--device", "cpu", "--dtype", "float32",
                    "--grid", "16/6", "--concurrency", "1,3", "--requests", "6", "--warmup", "2",
                    "--port", str(_closed_port()), "--max-num-seqs", "4", "--max-seq-len", "128",
                    "--num-kv-blocks", "32", "--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path),
                    "--name", "smoke"], check=True, timeout=300)
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert set(doc) == {"name", "date", "device", "command", "metrics"} and doc["name"] == "smoke"
    m = doc["metrics"]
    for c in (1, 3):
        p = f"isl16_osl6_c{c}_"
        assert m[p + "completed_requests"] == 6 and m[p + "failed_requests"] == 0
        assert m[p + "output_len_mismatches"] == 0
        assert m[p + "served_over_engine_ratio"] == pytest.approx(
            m[p + "output_throughput_tok_per_s"] / m[p + "engine_output_throughput_tok_per_s"])
    assert (tmp_path / "smoke-isl16-osl6.png").is_file()
