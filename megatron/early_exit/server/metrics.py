"""GET /metrics: the server's state and latencies in Prometheus' text format.

vLLM's metric names (https://docs.vllm.ai/en/latest/usage/metrics.html) under our own
prefix, so that dashboards built for vLLM need only the prefix changed, plus what early
exit adds: the tokens that left at each exit.

    early_exit:num_requests_running          gauge      sequences decoding now
    early_exit:num_requests_waiting          gauge      sequences (and lane jobs) waiting
    early_exit:prompt_tokens_total           counter    prompt tokens of generation requests
    early_exit:generation_tokens_total       counter    tokens generated
    early_exit:time_to_first_token_seconds   histogram  request in to a prompt's first token
    early_exit:inter_token_latency_seconds   histogram  between a prompt's consecutive tokens
    early_exit:e2e_request_latency_seconds   histogram  request in to its last token
    early_exit:exit_tokens_total{exit_layer} counter    tokens by the layer they left at
                                                        (the number of layers: full depth)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from megatron.early_exit.server.jobs import Job

PREFIX = "early_exit"
# vLLM's buckets for these histograms.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class ServingMetrics:
    """The server's metrics, in a registry of its own; `track(job)` times a job's tokens."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, worker):
        self.registry = registry = CollectorRegistry()
        Gauge(f"{PREFIX}:num_requests_running", "Sequences decoding now.", registry=registry).set_function(
            lambda: worker.running
        )
        Gauge(
            f"{PREFIX}:num_requests_waiting",
            "Sequences waiting for a slot (and jobs for their own lane).",
            registry=registry,
        ).set_function(lambda: worker.queued)
        self.prompt_tokens = Counter(
            f"{PREFIX}:prompt_tokens", "Prompt tokens of generation requests.", registry=registry
        )
        self.generation_tokens = Counter(f"{PREFIX}:generation_tokens", "Tokens generated.", registry=registry)
        self.ttft = Histogram(
            f"{PREFIX}:time_to_first_token_seconds",
            "Request in to a prompt's first token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            f"{PREFIX}:inter_token_latency_seconds",
            "Between a prompt's consecutive tokens.",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            f"{PREFIX}:e2e_request_latency_seconds",
            "Request in to its last token.",
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.exit_tokens = Counter(
            f"{PREFIX}:exit_tokens",
            "Tokens by the layer they left at (all layers: full depth).",
            ["exit_layer"],
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, job: Optional[Job]):
        """The job with a listener that records its tokens' times and exits (then calls the
        job's own); `done()` of the returned tracker records the request's end."""
        if not isinstance(job, Job):
            return job, lambda *_: None
        start, last, lock = time.perf_counter(), {}, threading.Lock()
        self.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        listener = job.listener

        def hear(event) -> None:
            now = time.perf_counter()
            n = len(event.tokens)
            if n:
                with lock:
                    before = last.get(event.row)
                    last[event.row] = now
                if before is None:
                    self.ttft.observe(now - start)
                    n_gaps, gap = n - 1, 0.0
                else:
                    n_gaps, gap = n, (now - before) / n
                for _ in range(n_gaps):  # tokens that arrive together share the wait
                    self.itl.observe(gap)
                self.generation_tokens.inc(n)
                for depth in event.exit_layers:
                    self.exit_tokens.labels(str(depth)).inc()
            if listener is not None:
                listener(event)

        def done(*_) -> None:
            self.e2e.observe(time.perf_counter() - start)

        return dataclasses.replace(job, listener=hear), done
