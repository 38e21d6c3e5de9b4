"""Admin endpoints (pin, unpin, rollback), tokens, and the versions in the model document."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import SCHEMA, Factory, publish
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from minutely.errors import ConfigError
from minutely.registry import WEIGHTS_FILE, Registry
from minutely.serve import ServingState, create_app

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

TOKEN = "s3cret-admin"
ADMIN = "/v1/admin/models/ctr"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREDICT = "/v1/models/ctr:predict"


def app_for(reg: Registry, **kw: Any) -> Starlette:
    return create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600, factory=Factory(), **kw)


def poll(c: TestClient) -> None:
    assert isinstance(c.app, Starlette)
    state: ServingState = c.app.state.serving
    state.poller.poll_once()


def pointer(reg: Registry) -> bytes | None:
    path = Path(reg.root) / "ctr" / "serving.json"
    return path.read_bytes() if path.exists() else None


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    for w in (1.0, 2.0, 3.0):
        publish(reg, w)
    return reg


@pytest.fixture
def admin(reg: Registry) -> Iterator[TestClient]:
    with TestClient(app_for(reg, admin_token=TOKEN)) as c:
        yield c


def live(c: TestClient) -> str:
    version: str = c.get("/v1/models/ctr").json()["version"]
    return version


# --- authorization --------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["pin", "unpin", "rollback"])
def test_admin_without_a_token_file_is_403(reg: Registry, action: str) -> None:
    with TestClient(app_for(reg)) as c:
        r = c.post(f"{ADMIN}/{action}", json={"version": "v00000001"}, headers=AUTH)
    assert r.status_code == 403
    assert r.json() == {"error": "admin disabled: the server was started without an admin token"}
    assert pointer(reg) is None


@pytest.mark.parametrize("action", ["pin", "unpin", "rollback"])
@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "admin: expected an 'Authorization: Bearer <token>' header, got none"),
        (
            {"Authorization": f"Basic {TOKEN}"},
            "admin: expected an 'Authorization: Bearer <token>' header, got another",
        ),
        ({"Authorization": "Bearer nope"}, "admin: wrong bearer token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "admin: wrong bearer token"),
    ],
)
def test_a_missing_or_wrong_token_is_401_and_changes_nothing(
    reg: Registry, admin: TestClient, action: str, headers: dict[str, str], message: str
) -> None:
    reg.pin("ctr", "v00000002")
    poll(admin)
    before = pointer(reg)
    r = admin.post(f"{ADMIN}/{action}", json={"version": "v00000001"}, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": message}
    assert r.headers["www-authenticate"] == "Bearer"
    assert pointer(reg) == before
    assert reg.pinned("ctr") == "v00000002"


def test_predict_is_open_unless_a_predict_token_is_set(reg: Registry) -> None:
    body = {"instances": [{"x": 1}]}
    with TestClient(app_for(reg, admin_token=TOKEN)) as c:
        assert c.post(PREDICT, json=body).status_code == 200
    with TestClient(app_for(reg, predict_token="reader")) as c:
        r = c.post(PREDICT, json=body)
        assert r.status_code == 401
        assert r.json() == {
            "error": "predict: expected an 'Authorization: Bearer <token>' header, got none"
        }
        r = c.post(PREDICT, json=body, headers={"Authorization": "Bearer writer"})
        assert (r.status_code, r.json()) == (401, {"error": "predict: wrong bearer token"})
        r = c.post(PREDICT, json=body, headers={"Authorization": "Bearer reader"})
        assert (r.status_code, r.json()["predictions"]) == (200, [3.0])
        assert c.get("/healthz").status_code == 200  # only predict needs it
        metrics = c.get("/metrics").text
    assert 'minutely_serve_requests_total{code="401",model="ctr"} 2.0' in metrics


def test_an_empty_token_is_a_config_error(reg: Registry) -> None:
    with pytest.raises(ConfigError, match=r"'serve.admin_token': expected a non-empty token"):
        app_for(reg, admin_token="  ")


# --- pin, unpin, rollback ---------------------------------------------------------------------


def test_pin_then_unpin(reg: Registry, admin: TestClient) -> None:
    assert live(admin) == "v00000003"
    r = admin.post(f"{ADMIN}/pin", json={"version": "v00000001"}, headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"model": "ctr", "pinned": "v00000001", "live": "v00000003"}
    assert reg.pinned("ctr") == "v00000001"
    poll(admin)
    assert live(admin) == "v00000001"
    r = admin.post(f"{ADMIN}/unpin", headers=AUTH)
    assert r.json() == {"model": "ctr", "pinned": None, "live": "v00000001"}
    assert reg.pinned("ctr") is None
    poll(admin)
    assert live(admin) == "v00000003"


def test_rollback_pins_the_version_live_before(reg: Registry, admin: TestClient) -> None:
    r = admin.post(f"{ADMIN}/rollback", headers=AUTH)
    assert r.status_code == 409
    assert r.json() == {
        "error": "model 'ctr': expected an earlier live version to roll back to, got none "
        "(live: v00000003, history: ['v00000003'])"
    }
    assert pointer(reg) is None
    publish(reg, 4.0)
    poll(admin)
    assert live(admin) == "v00000004"
    r = admin.post(f"{ADMIN}/rollback", headers=AUTH)
    assert r.json() == {"model": "ctr", "pinned": "v00000003", "live": "v00000004"}
    poll(admin)
    assert live(admin) == "v00000003"
    assert admin.post(PREDICT, json={"instances": [{"x": 1}]}).json()["predictions"] == [3.0]
    meta = admin.get("/v1/models/ctr").json()
    assert [v for v in meta["versions"] if v["live"]] == [
        {"version": "v00000003", "live": True, "why": "pinned"}
    ]


def test_pin_of_an_unknown_version_is_404(reg: Registry, admin: TestClient) -> None:
    r = admin.post(f"{ADMIN}/pin", json={"version": "v00000009"}, headers=AUTH)
    assert r.status_code == 404
    assert r.json() == {
        "error": "model 'ctr': expected a version of the registry, got 'v00000009' "
        "(versions: ['v00000001', 'v00000002', 'v00000003'])"
    }
    assert pointer(reg) is None


def test_pin_of_a_refused_version_is_409(reg: Registry, admin: TestClient) -> None:
    bad = publish(reg, 4.0)
    weights = Path(reg.root) / "ctr" / bad.version / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    poll(admin)
    r = admin.post(f"{ADMIN}/pin", json={"version": bad.version}, headers=AUTH)
    assert r.status_code == 409
    assert r.json()["error"].startswith(f"model 'ctr': {bad.version} was refused by this server: ")
    assert pointer(reg) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", r"^request body: expected JSON, got malformed data"),
        (b"{}", r'^request body: expected \{"version": <version>\}: Object missing required'),
        (b'{"version": 3}', r'^request body: expected \{"version": <version>\}: Expected `str`'),
        (b'{"version": "v1", "x": 1}', r"Object contains unknown field `x`"),
    ],
)
def test_a_bad_pin_body_is_400(reg: Registry, admin: TestClient, body: bytes, message: str) -> None:
    import re

    r = admin.post(f"{ADMIN}/pin", content=body, headers=AUTH)
    assert r.status_code == 400
    assert re.search(message, r.json()["error"]), r.json()
    assert pointer(reg) is None


def test_admin_of_an_unknown_model_is_404(admin: TestClient) -> None:
    r = admin.post("/v1/admin/models/cvr/unpin", headers=AUTH)
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'cvr': expected one of ['ctr']"}


# --- the versions in the model document --------------------------------------------------------


def test_versions_say_which_is_live_and_why(reg: Registry, admin: TestClient) -> None:
    meta = admin.get("/v1/models/ctr").json()
    assert meta["versions"] == [
        {"version": "v00000001", "live": False},
        {"version": "v00000002", "live": False},
        {"version": "v00000003", "live": True, "why": "latest"},
    ]
    publish(reg, 4.0)  # published, not polled yet: the live one is stale
    meta = admin.get("/v1/models/ctr").json()
    assert meta["versions"][2] == {"version": "v00000003", "live": True, "why": "stale"}
    assert meta["versions"][3] == {"version": "v00000004", "live": False}
    poll(admin)
    bad = publish(reg, 5.0)
    weights = Path(reg.root) / "ctr" / bad.version / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    poll(admin)
    meta = admin.get("/v1/models/ctr").json()
    assert meta["version"] == "v00000004"
    live_entry, refused_entry = meta["versions"][3], meta["versions"][4]
    assert live_entry == {"version": "v00000004", "live": True, "why": "latest"}
    assert refused_entry["live"] is False
    assert "weights.safetensors: expected sha256" in refused_entry["refused"]
    assert meta["refused"][0]["version"] == bad.version


def test_an_unreadable_registry_is_reported_in_the_document(
    reg: Registry, admin: TestClient
) -> None:
    (Path(reg.root) / "ctr" / "serving.json").write_text("garbage")
    meta = admin.get("/v1/models/ctr").json()
    assert meta["versions"] is None
    assert "serving.json" in meta["registry_error"]
    assert meta["version"] == "v00000003"
