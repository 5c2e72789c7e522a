"""Prometheus metrics of one server, in their own registry so several apps (tests) never collide."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.latency = Histogram(
            "eri_request_latency_seconds",
            "Time from request to response of generation endpoints",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.queue_depth = Gauge("eri_queue_depth", "Jobs waiting for the worker", registry=r)
        self.batch_size = Histogram(
            "eri_batch_size", "Images per forward batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.errors = Counter("eri_errors_total", "Failed requests by kind", ["kind"], registry=r)
        self.cache_bytes = Gauge("eri_model_cache_bytes", "Bytes of weights in the model cache", registry=r)
