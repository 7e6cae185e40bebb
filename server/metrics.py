"""Prometheus metrics of one server (its own CollectorRegistry, so several apps in one process, as
in tests, do not share counters)."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

ACCEPTANCE_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@attrs.define
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    prompt_tokens: Counter
    generated_tokens: Counter
    cancelled: Counter
    queue_depth: Gauge
    running: Gauge
    acceptance_length: Histogram
    tokens_per_second: Histogram
    time_to_first_token: Histogram
    queue_seconds: Histogram

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry(auto_describe=True)
        return cls(
            registry=r,
            requests=Counter("specrun_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                             registry=r),
            prompt_tokens=Counter("specrun_prompt_tokens", "Prompt tokens of the generations run", registry=r),
            generated_tokens=Counter("specrun_generated_tokens", "Tokens generated (all requests)", registry=r),
            cancelled=Counter("specrun_requests_cancelled", "Generations stopped early because the client went away",
                              registry=r),
            queue_depth=Gauge("specrun_queue_depth", "Requests waiting for the engine", registry=r),
            running=Gauge("specrun_requests_running", "Requests the engine is generating for (0 or 1)", registry=r),
            acceptance_length=Histogram("specrun_acceptance_length",
                                        "Tokens per target call (speculative acceptance length) of each request",
                                        buckets=ACCEPTANCE_BUCKETS, registry=r),
            tokens_per_second=Histogram("specrun_tokens_per_second", "Decode throughput of each request (tokens/s)",
                                        buckets=TPS_BUCKETS, registry=r),
            time_to_first_token=Histogram("specrun_time_to_first_token_seconds", "Prefill time of each request",
                                          buckets=SECONDS_BUCKETS, registry=r),
            queue_seconds=Histogram("specrun_queue_wait_seconds", "Time each request waited for the engine",
                                    buckets=SECONDS_BUCKETS, registry=r),
        )

    @staticmethod
    def endpoint(path: str) -> str:
        return path if path in ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
