"""The HTTP plumbing shared by the tracker and the agent."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette

from minutely.fleet.tracker import Tracker, create_app
from minutely.fleet.web import MAX_BODY_BYTES, BackgroundServer


def test_a_server_not_started_has_no_url() -> None:
    with pytest.raises(RuntimeError, match=r"BackgroundServer\.url: expected a started server"):
        _ = BackgroundServer(Starlette()).url


def test_a_port_in_use_fails_the_start() -> None:
    with BackgroundServer(Starlette()) as first:
        port = int(first.url.rsplit(":", 1)[1])
        second = BackgroundServer(Starlette(), port=port)
        with pytest.raises(RuntimeError, match=r"on 127\.0\.0\.1 within 10 s, got an exit with"):
            second.start(timeout_s=10)


def test_a_body_too_large_is_a_400() -> None:
    with BackgroundServer(create_app(Tracker())) as server:
        response = httpx.post(f"{server.url}/v1/leave", content=b" " * (MAX_BODY_BYTES + 10))
    assert response.status_code == 400
    assert response.json() == {
        "error": f"POST /v1/leave: expected a body of at most {MAX_BODY_BYTES} bytes"
    }
