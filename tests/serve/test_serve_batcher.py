"""Batching: concurrent requests share forward passes, one version each, same predictions."""

from __future__ import annotations

import asyncio
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from starlette.exceptions import StarletteDeprecationWarning

from minutely.config import ModelConfig
from minutely.data.tensors import FeatureColumns
from minutely.errors import ConfigError
from minutely.model import build_model
from minutely.model.artifact import model_config_doc
from minutely.registry import FileEntry, Manifest, Registry
from minutely.schema import default_schema
from minutely.serve import BatchSettings, create_app
from minutely.serve.batcher import Batcher, PredictionCountError
from minutely.serve.holder import LoadedModel

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

SCHEMA = default_schema()


def instances(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        inst: dict[str, Any] = {}
        for f in SCHEMA.features:
            if f.kind == "sparse":
                inst[f.name] = rng.randrange(10**9)
            elif f.kind == "multi_sparse":
                inst[f.name] = [rng.randrange(1000) for _ in range(rng.randrange(4))]
            else:
                inst[f.name] = rng.random() * 10
        out.append(inst)
    return out


class RowSum:
    """Predicts ``scale * (first dense value)`` per row; records the rows of every call."""

    def __init__(self, scale: float, gate: threading.Event | None = None) -> None:
        self.scale = scale
        self.gate = gate
        self.calls: list[int] = []
        self.entered = threading.Event()

    def predict_columns(self, columns: FeatureColumns) -> np.ndarray[Any, Any]:
        self.calls.append(len(columns))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        out: np.ndarray[Any, Any] = self.scale * columns.dense[:, 0].astype(np.float64)
        return out

    def warm_up(self) -> None:
        pass


def loaded(version: str, predictor: Any) -> LoadedModel:
    manifest = Manifest(
        manifest_version=1,
        model="ctr",
        version=version,
        parent=None,
        base=None,
        created_ms=0,
        arch="x",
        model_config={},
        feature_schema={},
        schema_fingerprint="",
        metrics={},
        samples_seen=0,
        files={"weights.safetensors": FileEntry("", 0)},
    )
    return LoadedModel(manifest, predictor, 0)


def rows(values: list[float]) -> FeatureColumns:
    return FeatureColumns(len(values), (), np.array(values, np.float32).reshape(-1, 1))


def run_batcher(settings: BatchSettings, body: Any) -> Any:
    """Run ``body(batcher, observed)`` on a fresh event loop with a one-thread executor."""
    observed: list[tuple[int, int]] = []

    async def main() -> Any:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(settings, pool, lambda r, q: observed.append((r, q)))
            return await body(batcher, observed)

    return asyncio.run(main())


def test_requests_waiting_during_a_forward_pass_share_the_next() -> None:
    gate = threading.Event()
    model = RowSum(2.0, gate)
    v1 = loaded("v00000001", model)

    async def body(batcher: Batcher, observed: list[tuple[int, int]]) -> Any:
        first = asyncio.ensure_future(batcher.predict(v1, rows([1.0])))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)
        rest = [asyncio.ensure_future(batcher.predict(v1, rows([i, i + 0.5]))) for i in range(5)]
        await asyncio.sleep(0.01)
        gate.set()
        return await first, await asyncio.gather(*rest), observed

    first, rest, observed = run_batcher(BatchSettings(max_rows=100), body)
    assert first == [2.0]
    assert rest == [[2.0 * i, 2.0 * i + 1.0] for i in range(5)]
    assert model.calls == [1, 10]  # the five that queued shared one pass
    assert observed == [(1, 1), (10, 5)]


def test_a_wait_window_gathers_requests_and_max_rows_bounds_a_batch() -> None:
    model = RowSum(1.0)
    v1 = loaded("v00000001", model)

    async def body(batcher: Batcher, observed: list[tuple[int, int]]) -> Any:
        futures = [
            asyncio.ensure_future(batcher.predict(v1, rows([float(i)] * 3))) for i in range(5)
        ]
        return await asyncio.gather(*futures)

    out = run_batcher(BatchSettings(max_rows=7, max_wait_ms=200.0), body)
    assert out == [[float(i)] * 3 for i in range(5)]
    assert model.calls == [6, 6, 3]  # 7 rows at most: two requests of 3 per pass


def test_a_request_larger_than_max_rows_is_scored_alone() -> None:
    model = RowSum(1.0)
    v1 = loaded("v00000001", model)

    async def body(batcher: Batcher, observed: list[tuple[int, int]]) -> Any:
        return await batcher.predict(v1, rows([1.0] * 10))

    assert run_batcher(BatchSettings(max_rows=4), body) == [1.0] * 10
    assert model.calls == [10]


def test_requests_on_different_versions_are_never_merged() -> None:
    old, new = RowSum(1.0), RowSum(10.0)
    v1, v2 = loaded("v00000001", old), loaded("v00000002", new)

    async def body(batcher: Batcher, observed: list[tuple[int, int]]) -> Any:
        order = [v1, v1, v2, v1, v2]
        futures = [
            asyncio.ensure_future(batcher.predict(v, rows([float(i)]))) for i, v in enumerate(order)
        ]
        return await asyncio.gather(*futures)

    out = run_batcher(BatchSettings(max_rows=100, max_wait_ms=100.0), body)
    assert out == [[0.0], [1.0], [20.0], [3.0], [40.0]]  # each answered by its own version
    # in arrival order, one version a pass
    assert old.calls == [2, 1]
    assert new.calls == [1, 1]


def test_a_cancelled_request_is_dropped_from_the_queue() -> None:
    model = RowSum(1.0)
    v1 = loaded("v00000001", model)

    async def body(batcher: Batcher, observed: list[tuple[int, int]]) -> Any:
        gone = asyncio.ensure_future(batcher.predict(v1, rows([5.0, 5.0])))
        kept = asyncio.ensure_future(batcher.predict(v1, rows([1.0])))
        await asyncio.sleep(0)
        gone.cancel()
        return await kept

    assert run_batcher(BatchSettings(max_rows=100, max_wait_ms=50.0), body) == [1.0]
    assert model.calls == [1]


def test_a_model_failure_reaches_every_request_of_the_pass() -> None:
    class Broken(RowSum):
        def predict_columns(self, columns: FeatureColumns) -> np.ndarray[Any, Any]:
            raise RuntimeError("boom")

    v1 = loaded("v00000001", Broken(1.0))

    async def body(batcher: Batcher, observed: list[tuple[int, int]]) -> Any:
        futures = [asyncio.ensure_future(batcher.predict(v1, rows([1.0]))) for _ in range(3)]
        return await asyncio.gather(*futures, return_exceptions=True)

    out = run_batcher(BatchSettings(max_rows=100, max_wait_ms=50.0), body)
    assert [str(e) for e in out] == ["boom"] * 3


def test_a_wrong_number_of_predictions_is_an_error() -> None:
    class Short(RowSum):
        def predict_columns(self, columns: FeatureColumns) -> np.ndarray[Any, Any]:
            return np.zeros(len(columns) - 1)

    v1 = loaded("v00000001", Short(1.0))

    async def body(batcher: Batcher, observed: list[tuple[int, int]]) -> Any:
        return await batcher.predict(v1, rows([1.0, 2.0]))

    with pytest.raises(PredictionCountError, match=r"^expected 2 predictions, got 1$"):
        run_batcher(BatchSettings(max_rows=10), body)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_rows": -1}, r"'serve.batch_max_rows': expected an int >= 0, got -1"),
        ({"max_rows": 1.5}, r"'serve.batch_max_rows': expected an int >= 0, got 1.5"),
        ({"max_wait_ms": -1.0}, r"'serve.batch_max_wait_ms': expected a float in \[0, 1000\]"),
        ({"max_wait_ms": 5000.0}, r"'serve.batch_max_wait_ms': expected a float in \[0, 1000\]"),
    ],
)
def test_bad_batch_settings_are_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BatchSettings(**kw)


def test_a_batcher_needs_batching_settings() -> None:
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="expected batching"):
        Batcher(BatchSettings(max_rows=0), pool, lambda r, q: None)


# --- through the application, with the real model ------------------------------------------------


def publish_deepfm(reg: Registry, seed: int) -> Manifest:
    cfg = ModelConfig(arch="deepfm", buckets=512, embedding_dim=4, hidden=(8,))
    torch.manual_seed(seed)
    model = build_model(cfg, SCHEMA)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return reg.publish(
        "ctr",
        model.flat_state_dict(),
        created_ms=0,
        arch=cfg.arch,
        model_config=model_config_doc(cfg),
        schema=SCHEMA,
        metrics={},
        samples_seen=0,
    )


def test_batched_answers_equal_unbatched_answers(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    publish_deepfm(reg, seed=3)
    requests = [instances(1 + i % 5, seed=i) for i in range(24)]

    def answers(batch: BatchSettings) -> tuple[list[list[float]], Any]:
        app = create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600, batch=batch)
        with TestClient(app) as c:
            results: list[list[float]] = [[] for _ in requests]

            def send(i: int) -> None:
                r = c.post("/v1/models/ctr:predict", json={"instances": requests[i]})
                assert r.status_code == 200, r.text
                results[i] = r.json()["predictions"]

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            metrics = c.get("/metrics").text
        return results, metrics

    plain, _ = answers(BatchSettings())
    batched, metrics = answers(BatchSettings(max_rows=64, max_wait_ms=50.0))
    assert [len(p) for p in plain] == [len(r) for r in requests]
    # float32 arithmetic over a different batch may round differently in the last bit
    for a, b in zip(plain, batched, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    # the 24 concurrent requests shared passes: fewer passes than requests
    passes = float(metrics.split('minutely_serve_batch_requests_count{model="ctr"} ')[1].split()[0])
    assert passes < len(requests)
