"""The server's Prometheus metrics, served at ``GET /metrics``.

====================================  ========================================================
``minutely_serve_requests_total``     predict requests answered, by ``model`` and HTTP ``code``
                                      (``model="-"`` for a name the server does not serve)
``minutely_serve_request_seconds``    predict latency inside the server (body read to answer
                                      ready), a histogram by ``model``
``minutely_serve_live_version``       the number of the live version (``v00000012``: 12);
                                      with several workers the lowest any of them serves
``minutely_serve_model_age_seconds``  now minus the live version's ``created_ms``; with
                                      several workers the largest
``minutely_serve_swaps_total``        versions made live
``minutely_serve_refusals_total``     versions refused (checksum, schema, build, warm-up)
``minutely_serve_poll_errors_total``  registry polls that failed and are retried
``minutely_serve_batch_rows``         rows per forward pass, a histogram
``minutely_serve_batch_requests``     requests merged into one forward pass, a histogram
====================================  ========================================================

With several worker processes the parent sets ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode) before they start: each worker writes its values there, and a scrape, which
any worker may answer, sums the counters and histograms of all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from minutely.registry import parse_version

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
ROW_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1_000, 2_000, 5_000, 10_000, 20_000)
REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
UNKNOWN_MODEL = "-"


class ServeMetrics:
    """The metrics of one application (a registry of its own, so several apps can coexist)."""

    def __init__(self, models: Sequence[str]) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        reg = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "minutely_serve_requests",
            "Predict requests answered, by model and HTTP status code.",
            ["model", "code"],
            registry=reg,
        )
        self.latency = Histogram(
            "minutely_serve_request_seconds",
            "Predict latency inside the server, from the body read to the answer ready.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.live_version = Gauge(
            "minutely_serve_live_version",
            "Number of the live version (the lowest among the workers).",
            ["model"],
            multiprocess_mode="livemin",
            registry=reg,
        )
        self.model_age = Gauge(
            "minutely_serve_model_age_seconds",
            "Now minus the live version's created_ms, in seconds (the largest among the workers).",
            ["model"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.swaps = Counter("minutely_serve_swaps", "Versions made live.", ["model"], registry=reg)
        self.refusals = Counter(
            "minutely_serve_refusals", "Versions refused.", ["model"], registry=reg
        )
        self.poll_errors = Counter(
            "minutely_serve_poll_errors",
            "Registry polls that failed (retried).",
            ["model"],
            registry=reg,
        )
        self.batch_rows = Histogram(
            "minutely_serve_batch_rows",
            "Rows per forward pass.",
            ["model"],
            buckets=ROW_BUCKETS,
            registry=reg,
        )
        self.batch_requests = Histogram(
            "minutely_serve_batch_requests",
            "Requests merged into one forward pass.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self._created_ms: dict[str, int] = {}
        for name in models:  # every series of a served model exists from the start
            for counter in (self.swaps, self.refusals, self.poll_errors):
                counter.labels(name)

    def went_live(self, model: str, version: str, created_ms: int, now_ms: int) -> None:
        """Record a swap to ``version`` (made at ``created_ms``)."""
        self.swaps.labels(model).inc()
        self.live_version.labels(model).set(parse_version(version))
        self._created_ms[model] = created_ms
        self.refresh_age(model, now_ms)

    def refresh_age(self, model: str, now_ms: int) -> None:
        """Set the age of ``model``'s live version (nothing before its first version)."""
        created = self._created_ms.get(model)
        if created is not None:
            self.model_age.labels(model).set((now_ms - created) / 1_000.0)

    def scrape(self) -> bytes:
        """The exposition text: this process's metrics, or every worker's in multiprocess
        mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
