"""Prometheus metrics of the cloud service: sessions, steps, bytes, errors by code, latency, sealing failures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """One registry per server (tests run several in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tandem_requests_total", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "tandem_request_seconds",
            "RPC latency",
            ["method"],
            registry=r,
            buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.bytes_in = Counter("tandem_request_bytes_total", "Serialized request bytes", ["method"], registry=r)
        self.bytes_out = Counter("tandem_response_bytes_total", "Serialized response bytes", ["method"], registry=r)
        self.steps = Counter("tandem_steps_total", "Completed backward passes (training steps)", registry=r)
        self.sessions = Gauge("tandem_sessions", "Open sessions", registry=r)
        self.seal_failures = Counter("tandem_seal_failures_total", "Rejected sealed payloads", ["kind"], registry=r)
        self.state_bytes = Gauge("tandem_forward_state_bytes", "Forward state held for backward", registry=r)
        self.batch_passes = Gauge("tandem_batched_passes", "Passes of the middle run by the batcher", registry=r)
        self.batch_requests = Gauge(
            "tandem_batched_requests", "Requests those passes served (ratio: mean batch)", registry=r
        )
        self.batch_compute = Gauge(
            "tandem_batched_compute_seconds",
            "Seconds the batcher's worker spent computing passes (over wall time: its busy share)",
            registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Exposes /metrics over HTTP on addr:port."""
        start_http_server(port, addr=addr, registry=self.registry)
