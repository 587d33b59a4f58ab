"""Prometheus metrics for one server, in their own registry (several apps can live in one process).

The engine thread reports each step and each output; the HTTP layer reports rejections. All
prometheus-client objects are thread-safe, so no locking here.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.request import RequestOutput

TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("blockdiff_requests_running", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge("blockdiff_requests_waiting", "Requests queued for a KV slot", registry=r)
        self.tokens = Counter("blockdiff_committed_tokens", "Output tokens committed", registry=r)
        self.canvases = Counter("blockdiff_canvases", "Canvases committed", registry=r)
        self.steps = Histogram("blockdiff_denoising_steps_per_canvas", "Denoising steps per committed canvas",
                               buckets=STEP_BUCKETS, registry=r)
        self.ttft = Histogram("blockdiff_time_to_first_token_seconds", "Arrival to first committed canvas",
                              buckets=TIME_BUCKETS, registry=r)
        self.latency = Histogram("blockdiff_request_latency_seconds", "Arrival to finish", buckets=TIME_BUCKETS,
                                 registry=r)
        self.finished = Counter("blockdiff_requests_finished", "Finished engine requests by reason",
                                ["reason"], registry=r)
        self.rejected = Counter("blockdiff_http_errors", "HTTP requests answered with an error, by status",
                                ["status"], registry=r)

    def on_step(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def on_output(self, out: RequestOutput) -> None:
        """One output = one committed canvas (its tokens may be cut by EOS, stop or max_tokens), or a
        request the engine failed."""
        if out.finish_reason == "error":
            self.finished.labels("error").inc()
            return
        self.tokens.inc(len(out.delta_token_ids))
        self.canvases.inc()
        if out.stats.steps_per_canvas:
            self.steps.observe(out.stats.steps_per_canvas[-1])
        if out.stats.canvases == 1 and out.stats.time_to_first_token is not None:
            self.ttft.observe(out.stats.time_to_first_token)
        if out.finished:
            self.finished.labels(out.finish_reason).inc()
            if out.stats.latency is not None:
                self.latency.observe(out.stats.latency)

    def on_abort(self) -> None:
        self.finished.labels("abort").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
