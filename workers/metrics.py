"""Prometheus metrics of one server (own registry, so several servers can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

OUTCOMES = ("completed", "cancelled", "rejected", "failed")


class ServerMetrics:
    """The counters, gauges and histograms a server exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("orch_requests", "Requests by outcome (completed, cancelled, rejected, failed)",
                                ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.queue_length = Gauge("orch_queue_length", "Sequences waiting to be scheduled", registry=r)
        self.running = Gauge("orch_running_sequences", "Sequences holding KV blocks and being stepped", registry=r)
        self.kv_used = Gauge("orch_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("orch_kv_blocks_free", "KV cache blocks free (cached prefixes included)", registry=r)
        self.prefix_hit_rate = Gauge("orch_prefix_cache_hit_rate",
                                     "Fraction of prompt tokens served from the prefix cache", registry=r)
        self.prefix_queried = Counter("orch_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("orch_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                   registry=r)
        self.preemptions = Counter("orch_preemptions", "Sequences preempted for lack of KV blocks", registry=r)
        self.prompt_tokens = Counter("orch_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("orch_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("orch_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("orch_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("orch_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step_tokens = Histogram("orch_step_tokens", "Tokens run per engine step",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                                     registry=r)
        self._http = None

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Export the metrics over HTTP on host:port (0 = any free port); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        """Stop the HTTP exporter."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
