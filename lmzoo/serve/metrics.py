"""Prometheus metrics of the server: requests, tokens, queue, rows, time to first token and per token.

Each server has its own registry (tests start several in one process). prometheus-client is part
of the `serve` extra; without it /metrics answers 404 and the rest works.
"""

from __future__ import annotations


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.counters = {
            "requests": Counter("lmzoo_requests", "Engine requests (one per choice)", ["model"], registry=r),
            "tokens": Counter("lmzoo_generated_tokens", "Tokens generated", ["model"], registry=r),
            "prompt_tokens": Counter("lmzoo_prompt_tokens", "Prompt tokens prefilled", registry=r),
            "errors": Counter("lmzoo_errors", "Error responses", ["status"], registry=r),
        }
        self.queue = Gauge("lmzoo_queue_length", "Requests waiting or prefilling", registry=r)
        self.rows = Gauge("lmzoo_batch_rows", "Rows decoding in the batch", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.histograms = {
            "ttft": Histogram("lmzoo_time_to_first_token_seconds", "From submission to the first token",
                              buckets=buckets, registry=r),
            "tpot": Histogram("lmzoo_time_per_output_token_seconds", "Mean time between a request's tokens",
                              buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=r),
        }

    def count(self, what: str, n: int = 1, **labels) -> None:
        counter = self.counters[what]
        (counter.labels(**labels) if labels else counter).inc(n)

    def observe(self, what: str, seconds: float) -> None:
        self.histograms[what].observe(seconds)

    def gauge(self, engine) -> None:
        self.queue.set(engine.queue_length())
        self.rows.set(engine.running())

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
