"""Prometheus metrics of one server, in their own registry so several apps (tests) never collide."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def resident_bytes() -> float:
    """This process's resident memory, from ``/proc/self/statm`` (Linux; no extra dependency); NaN where
    there is no procfs, which Prometheus shows as a gap rather than a false zero."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


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

    def watch_memory(self, cache_bytes: Callable[[], float]) -> None:
        """Memory gauges read at scrape time: process RSS, the model cache, and CUDA's allocator."""
        r = self.registry
        Gauge("eri_process_resident_bytes", "Resident memory of the server process", registry=r).set_function(
            resident_bytes
        )
        self.cache_bytes.set_function(cache_bytes)
        if torch.cuda.is_available():
            Gauge("eri_cuda_allocated_bytes", "CUDA memory held by tensors", registry=r).set_function(
                lambda: float(torch.cuda.memory_allocated())
            )
            Gauge(
                "eri_cuda_reserved_bytes", "CUDA memory reserved by the caching allocator", registry=r
            ).set_function(lambda: float(torch.cuda.memory_reserved()))
