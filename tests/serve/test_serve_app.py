"""The inference app with a stand-in predictor: endpoints, errors, polling, hot swap, refusals."""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from serve_helpers import OTHER_SCHEMA, SCHEMA, Factory, publish
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from minutely.clock import ReplayClock
from minutely.data.tensors import FeatureColumns
from minutely.errors import ConfigError
from minutely.registry import WEIGHTS_FILE, Registry, Signer
from minutely.serve import ServingState, create_app

with warnings.catch_warnings():
    # Starlette asks for its httpx fork; the TestClient works the same on httpx, which the
    # project already depends on.
    warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PREDICT = "/v1/models/ctr:predict"


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def factory() -> Factory:
    return Factory()


def make_app(
    reg: Registry, factory: Factory, models: Sequence[str] = ("ctr",), **kw: Any
) -> Starlette:
    args: dict[str, Any] = {"poll_interval_s": 3600.0, "factory": factory, **kw}
    return create_app(reg.root, models, SCHEMA, **args)


def serving(app: Starlette) -> ServingState:
    state: ServingState = app.state.serving
    return state


@pytest.fixture
def client(reg: Registry, factory: Factory) -> Iterator[TestClient]:
    publish(reg, 0.5)
    app = make_app(reg, factory, clock=ReplayClock(start_ms=123))
    with TestClient(app) as c:
        yield c


def poll(client: TestClient) -> None:
    app = client.app
    assert isinstance(app, Starlette)
    serving(app).poller.poll_once()


# --- predict ---------------------------------------------------------------------------------


def test_predict_answers_with_model_version_and_predictions(client: TestClient) -> None:
    r = client.post(PREDICT, json={"instances": [{"x": 1}, {"x": 3.0}]})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"model": "ctr", "version": "v00000001", "predictions": [0.5, 1.5]}


def test_predict_response_keys_are_frozen(client: TestClient) -> None:
    assert list(client.post(PREDICT, json={"instances": [{"x": 1}]}).json()) == [
        "model",
        "version",
        "predictions",
    ]


def test_empty_instances_answer_empty_predictions(client: TestClient, factory: Factory) -> None:
    r = client.post(PREDICT, json={"instances": []})
    assert r.status_code == 200
    assert r.json()["predictions"] == []
    assert factory.built[0][1].calls == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"instances": [',
            r"^request body: expected JSON, got malformed data \(Input data was truncated\)$",
        ),
        (b"", r"^request body: expected JSON, got malformed data"),
        (b"{nope}", r"^request body: expected JSON, got malformed data \(JSON is malformed"),
        (b"[]", r"^request body: Expected `object`, got `array`$"),
        (
            b'{"inputs": []}',
            r"^request body: expected a field `instances` or `columns`, got neither$",
        ),
        (b'{"instances": "x"}', r"^request body: Expected `array`, got `str` - at `\$.instances`$"),
        (
            b'{"instances": [{"x": 1}, 5]}',
            r"^request body: Expected `object`, got `int` - at `\$.instances\[1\]`$",
        ),
        (
            b'{"instances": [{"x": 1}, {"y": 2}]}',
            r"^instance 1: missing feature 'x'; unknown feature 'y'$",
        ),
        (
            b'{"instances": [{"x": 1}, {"x": "2"}]}',
            r"^instance 1: feature 'x': expected a finite number, got '2' \(str\)$",
        ),
    ],
)
def test_bad_requests_are_400_with_a_message(client: TestClient, body: bytes, message: str) -> None:
    r = client.post(PREDICT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert list(r.json()) == ["error"]
    assert re.search(message, r.json()["error"]), r.json()["error"]


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v1/models/nope:predict", json={"instances": []})
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'nope': expected one of ['ctr']"}
    r = client.get("/v1/models/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'nope': expected one of ['ctr']"}


def test_unknown_path_and_wrong_method_are_json_errors(client: TestClient) -> None:
    r = client.get("/v2/whatever")
    assert r.status_code == 404
    assert r.json() == {"error": "GET /v2/whatever: Not Found"}
    r = client.get(PREDICT)
    assert r.status_code == 405
    assert r.json() == {"error": f"GET {PREDICT}: Method Not Allowed"}


def test_too_many_instances_is_413(reg: Registry, factory: Factory) -> None:
    publish(reg, 1.0)
    with TestClient(make_app(reg, factory, max_instances=3)) as c:
        assert c.post(PREDICT, json={"instances": [{"x": 1}] * 3}).status_code == 200
        r = c.post(PREDICT, json={"instances": [{"x": 1}] * 4})
    assert r.status_code == 413
    assert r.json() == {"error": "'instances': expected at most 3 per request, got 4"}


def test_default_instance_limit_is_ten_thousand(client: TestClient) -> None:
    assert client.post(PREDICT, json={"instances": [{"x": 1}] * 10_000}).status_code == 200
    r = client.post(PREDICT, json={"instances": [{"x": 1}] * 10_001})
    assert r.status_code == 413
    assert r.json()["error"] == "'instances': expected at most 10000 per request, got 10001"


def test_too_large_body_is_413(reg: Registry, factory: Factory) -> None:
    publish(reg, 1.0)
    with TestClient(make_app(reg, factory, max_body_bytes=64)) as c:
        r = c.post(PREDICT, json={"instances": [{"x": 1}] * 20})
        assert r.status_code == 413
        assert r.json() == {"error": "request body: expected at most 64 bytes"}

        def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while reading
            yield b'{"instances": ['
            yield b'{"x": 1},' * 10
            yield b'{"x": 1}]}'

        r = c.post(PREDICT, content=chunks())
        assert r.status_code == 413


def test_no_version_yet_is_503(reg: Registry, factory: Factory) -> None:
    with TestClient(make_app(reg, factory)) as c:
        r = c.post(PREDICT, json={"instances": [{"x": 1}]})
        assert r.status_code == 503
        assert r.json() == {"error": "model 'ctr': no version loaded yet"}
        h = c.get("/healthz")
        assert h.status_code == 503
        assert h.json() == {"status": "loading", "models": {"ctr": None}}
        meta = c.get("/v1/models/ctr").json()
        assert (meta["version"], meta["loaded_ms"], meta["swaps"]) == (None, None, 0)
        # The first version is picked up by the next poll.
        publish(reg, 2.0)
        poll(c)
        assert c.post(PREDICT, json={"instances": [{"x": 1}]}).json()["predictions"] == [2.0]
        assert c.get("/healthz").status_code == 200


def test_predictor_failure_is_500_and_logged(
    reg: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def predict_columns(self, columns: FeatureColumns) -> list[float]:
            raise RuntimeError("tensor shape blew up")

        def warm_up(self) -> None:
            pass

    publish(reg, 1.0)
    app = create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600, factory=lambda m, t: Broken())
    with TestClient(app) as c:
        r = c.post(PREDICT, json={"instances": [{"x": 1}]})
    assert r.status_code == 500
    assert r.json() == {"error": "model 'ctr' v00000001: predict failed: tensor shape blew up"}
    assert "predict failed" in caplog.text


def test_wrong_number_of_predictions_is_500(reg: Registry) -> None:
    class Short:
        def predict_columns(self, columns: FeatureColumns) -> list[float]:
            return [0.5]

        def warm_up(self) -> None:
            pass

    publish(reg, 1.0)
    app = create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600, factory=lambda m, t: Short())
    with TestClient(app) as c:
        r = c.post(PREDICT, json={"instances": [{"x": 1}, {"x": 2}]})
    assert r.status_code == 500
    assert r.json() == {"error": "model 'ctr' v00000001: expected 2 predictions, got 1"}


# --- metadata and health -----------------------------------------------------------------------


def test_metadata_document(client: TestClient) -> None:
    r = client.get("/v1/models/ctr")
    assert r.status_code == 200
    assert r.json() == {
        "model": "ctr",
        "version": "v00000001",
        "loaded_ms": 123,
        "swaps": 1,
        "refused": [],
        "refused_total": 0,
        "poll_errors": 0,
        "versions": [{"version": "v00000001", "live": True, "why": "latest"}],
    }


def test_healthz_lists_versions(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": {"ctr": "v00000001"}}


def test_several_models_are_served_independently(reg: Registry, factory: Factory) -> None:
    publish(reg, 1.0, name="ctr")
    publish(reg, 1.0, name="cvr")
    publish(reg, 3.0, name="cvr")
    with TestClient(make_app(reg, factory, models=["ctr", "cvr"])) as c:
        a = c.post(PREDICT, json={"instances": [{"x": 1}]}).json()
        b = c.post("/v1/models/cvr:predict", json={"instances": [{"x": 1}]}).json()
        assert c.get("/healthz").json()["models"] == {"ctr": "v00000001", "cvr": "v00000002"}
    assert (a["version"], a["predictions"]) == ("v00000001", [1.0])
    assert (b["model"], b["version"], b["predictions"]) == ("cvr", "v00000002", [3.0])


# --- hot swap -------------------------------------------------------------------------------------


def test_new_version_is_swapped_in_by_a_poll(client: TestClient, reg: Registry) -> None:
    publish(reg, 2.0)
    poll(client)
    r = client.post(PREDICT, json={"instances": [{"x": 1}]}).json()
    assert (r["version"], r["predictions"]) == ("v00000002", [2.0])
    assert client.get("/v1/models/ctr").json()["swaps"] == 2
    poll(client)  # nothing new: no swap
    assert client.get("/v1/models/ctr").json()["swaps"] == 2


def test_background_poller_swaps_while_running(reg: Registry, factory: Factory) -> None:
    publish(reg, 1.0)
    with TestClient(make_app(reg, factory, poll_interval_s=0.01)) as c:
        assert c.get("/v1/models/ctr").json()["version"] == "v00000001"
        publish(reg, 2.0)
        deadline = time.monotonic() + 10
        while c.get("/v1/models/ctr").json()["version"] != "v00000002":
            assert time.monotonic() < deadline, "the poller did not pick up v00000002"
            time.sleep(0.01)
        assert c.post(PREDICT, json={"instances": [{"x": 1}]}).json()["predictions"] == [2.0]
    assert not [t for t in threading.enumerate() if t.name == "registry-poller"]


def test_in_flight_request_finishes_on_the_old_version(
    client: TestClient, reg: Registry, factory: Factory
) -> None:
    old = factory.built[0][1]
    old.gate = threading.Event()
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(client.post(PREDICT, json={"instances": [{"x": 1}]}).json())
    )
    t.start()
    assert old.entered.wait(10)
    publish(reg, 2.0)
    poll(client)  # swaps while the first request is inside the old predictor
    new = client.post(PREDICT, json={"instances": [{"x": 1}]}).json()
    assert (new["version"], new["predictions"]) == ("v00000002", [2.0])
    old.gate.set()
    t.join(10)
    assert (result["version"], result["predictions"]) == ("v00000001", [0.5])


def test_pin_rolls_back_and_unpin_rolls_forward(client: TestClient, reg: Registry) -> None:
    publish(reg, 2.0)
    poll(client)
    reg.pin("ctr", "v00000001")
    poll(client)
    assert client.post(PREDICT, json={"instances": [{"x": 1}]}).json()["version"] == "v00000001"
    reg.unpin("ctr")
    poll(client)
    assert client.post(PREDICT, json={"instances": [{"x": 1}]}).json()["version"] == "v00000002"
    assert client.get("/v1/models/ctr").json()["swaps"] == 4


# --- refusals -------------------------------------------------------------------------------------


def test_corrupted_version_is_refused_once_and_old_keeps_serving(
    client: TestClient, reg: Registry, factory: Factory
) -> None:
    bad = publish(reg, 2.0)
    path = reg.root / "ctr" / bad.version / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    for _ in range(3):  # remembered: not retried on later polls
        poll(client)
    r = client.post(PREDICT, json={"instances": [{"x": 1}]}).json()
    assert (r["version"], r["predictions"]) == ("v00000001", [0.5])
    meta = client.get("/v1/models/ctr").json()
    assert meta["refused_total"] == 1
    assert meta["swaps"] == 1
    [refusal] = meta["refused"]
    assert refusal["version"] == "v00000002"
    assert "weights.safetensors: expected sha256" in refusal["reason"]
    assert [v for v, _ in factory.built] == ["v00000001"]
    # A good version after the bad one is served.
    publish(reg, 3.0)
    poll(client)
    assert client.post(PREDICT, json={"instances": [{"x": 1}]}).json()["version"] == "v00000003"


def test_version_with_another_schema_is_refused(client: TestClient, reg: Registry) -> None:
    publish(reg, 2.0, schema=OTHER_SCHEMA)
    poll(client)
    assert client.post(PREDICT, json={"instances": [{"x": 1}]}).json()["version"] == "v00000001"
    [refusal] = client.get("/v1/models/ctr").json()["refused"]
    assert refusal["version"] == "v00000002"
    assert (
        f"expected schema fingerprint '{SCHEMA.fingerprint()}', "
        f"got '{OTHER_SCHEMA.fingerprint()}'" in refusal["reason"]
    )


def test_version_the_factory_cannot_build_is_refused(client: TestClient, reg: Registry) -> None:
    reg.publish(
        "ctr",
        {"not_w": torch.zeros(1)},
        created_ms=0,
        arch="stand-in",
        model_config={},
        schema=SCHEMA,
        metrics={},
        samples_seen=0,
    )
    poll(client)
    poll(client)
    meta = client.get("/v1/models/ctr").json()
    assert meta["version"] == "v00000001"
    assert meta["refused"] == [{"version": "v00000002", "reason": "predictor: KeyError: 'w'"}]
    assert meta["refused_total"] == 1


def test_unreadable_pointer_is_counted_and_retried(client: TestClient, reg: Registry) -> None:
    pointer = reg.root / "ctr" / "serving.json"
    pointer.write_text("garbage")
    poll(client)
    poll(client)
    meta = client.get("/v1/models/ctr").json()
    assert (meta["version"], meta["poll_errors"], meta["refused_total"]) == ("v00000001", 2, 0)
    pointer.unlink()
    publish(reg, 2.0)
    poll(client)
    assert client.get("/v1/models/ctr").json()["version"] == "v00000002"


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "kw", "message"),
    [
        ([], {}, r"config field 'serve.models': expected at least one model name, got \[\]"),
        (["a", "a"], {}, r"config field 'serve.models': expected unique model names"),
        (["../a"], {}, r"'serve.models': expected model name: expected letters, .* got '\.\./a'"),
        (
            ["a"],
            {"poll_interval_s": 0.0},
            r"'serve.poll_interval_s': expected a float > 0, got 0.0",
        ),
        (["a"], {"max_instances": 0}, r"'serve.max_instances': expected an int >= 1, got 0"),
        (["a"], {"max_body_bytes": 0}, r"'serve.max_body_bytes': expected an int >= 1, got 0"),
    ],
)
def test_bad_app_configuration_fails_at_creation(
    tmp_path: Path, models: list[str], kw: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"poll_interval_s": 1.0}
    args.update(kw)
    with pytest.raises(ConfigError, match=message):
        create_app(tmp_path, models, SCHEMA, **args)


def test_a_server_with_a_public_key_refuses_unsigned_versions(tmp_path: Path) -> None:
    signer = Signer.generate()
    signed = Registry(tmp_path / "registry", signer=signer)
    unsigned = Registry(tmp_path / "registry")
    publish(signed, 1.0)
    app = make_app(signed, Factory(), verifier=signer.verifier())
    with TestClient(app) as c:
        publish(unsigned, 2.0)
        poll(c)
        meta = c.get("/v1/models/ctr").json()
        assert meta["version"] == "v00000001"
        [refusal] = meta["refused"]
        assert refusal["version"] == "v00000002"
        assert "unsigned: expected manifest.sig signed by key" in refusal["reason"]
        publish(signed, 3.0)
        poll(c)
        assert c.post(PREDICT, json={"instances": [{"x": 1}]}).json()["predictions"] == [3.0]
