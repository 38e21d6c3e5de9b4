"""The Prometheus scrape: requests by code, latency buckets, live version, age, swaps, refusals."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import SCHEMA, Factory, publish
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from minutely.clock import ReplayClock
from minutely.registry import WEIGHTS_FILE, Registry
from minutely.serve import BatchSettings, ServingState, create_app
from minutely.serve.metrics import LATENCY_BUCKETS

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PREDICT = "/v1/models/ctr:predict"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_scrape_counts_requests_latency_versions_and_refusals(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    publish(reg, 1.0)
    clock = ReplayClock(start_ms=10_000)
    app = create_app(
        reg.root,
        ["ctr"],
        SCHEMA,
        poll_interval_s=3600,
        factory=Factory(),
        clock=clock,
        batch=BatchSettings(max_rows=16),
    )
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post(PREDICT, json={"instances": [{"x": 1}, {"x": 2}]}).status_code == 200
        assert c.post(PREDICT, json={"instances": [{"y": 1}]}).status_code == 400
        assert c.post("/v1/models/nope:predict", json={"instances": []}).status_code == 404
        bad = publish(reg, 2.0)
        weights = tmp_path / "ctr" / bad.version / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
        assert isinstance(c.app, Starlette)
        state: ServingState = c.app.state.serving
        state.poller.poll_once()
        publish(reg, 3.0)
        clock.advance_to(12_500)
        state.poller.poll_once()
        clock.advance_to(14_000)
        r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert value(text, "minutely_serve_requests_total", model="ctr", code="200") == 3
    assert value(text, "minutely_serve_requests_total", model="ctr", code="400") == 1
    assert value(text, "minutely_serve_requests_total", model="-", code="404") == 1
    assert value(text, "minutely_serve_request_seconds_count", model="ctr") == 4
    les = [
        float(dict(labels)["le"])
        for (name, labels) in samples(text)
        if name == "minutely_serve_request_seconds_bucket" and dict(labels)["le"] != "+Inf"
    ]
    assert sorted(les) == list(LATENCY_BUCKETS)
    assert len([b for b in LATENCY_BUCKETS if 0.001 <= b <= 0.05]) >= 12  # fine around 1-50 ms
    assert value(text, "minutely_serve_live_version", model="ctr") == 3
    # created_ms is 0 for these versions; the clock says 14 s at the scrape
    assert value(text, "minutely_serve_model_age_seconds", model="ctr") == 14.0
    assert value(text, "minutely_serve_swaps_total", model="ctr") == 2
    assert value(text, "minutely_serve_refusals_total", model="ctr") == 1
    assert value(text, "minutely_serve_poll_errors_total", model="ctr") == 0
    assert value(text, "minutely_serve_batch_rows_sum", model="ctr") == 6
    assert value(text, "minutely_serve_batch_requests_count", model="ctr") == 3


def test_unbatched_requests_count_as_passes_of_one(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    publish(reg, 1.0)
    app = create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600, factory=Factory())
    with TestClient(app) as c:
        c.post(PREDICT, json={"instances": [{"x": 1}] * 5})
        text = c.get("/metrics").text
    assert value(text, "minutely_serve_batch_rows_sum", model="ctr") == 5
    assert value(text, "minutely_serve_batch_requests_sum", model="ctr") == 1


def test_poll_errors_are_counted(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    publish(reg, 1.0)
    app = create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600, factory=Factory())
    with TestClient(app) as c:
        (tmp_path / "ctr" / "serving.json").write_text("garbage")
        assert isinstance(c.app, Starlette)
        c.app.state.serving.poller.poll_once()
        text = c.get("/metrics").text
    assert value(text, "minutely_serve_poll_errors_total", model="ctr") == 1


def test_two_apps_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    publish(reg, 1.0)
    texts = []
    for n in (1, 2):
        app = create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600, factory=Factory())
        with TestClient(app) as c:
            for _ in range(n):
                c.post(PREDICT, json={"instances": [{"x": 1}]})
            texts.append(c.get("/metrics").text)
    counts = [value(t, "minutely_serve_requests_total", model="ctr", code="200") for t in texts]
    assert counts == [1, 2]


@pytest.mark.parametrize(
    "name", ["minutely_serve_live_version", "minutely_serve_model_age_seconds"]
)
def test_gauges_are_absent_before_the_first_version(tmp_path: Path, name: str) -> None:
    app = create_app(tmp_path, ["ctr"], SCHEMA, poll_interval_s=3600, factory=Factory())
    with TestClient(app) as c:
        text = c.get("/metrics").text
    assert not re.search(rf"^{name}\{{", text, re.MULTILINE)
