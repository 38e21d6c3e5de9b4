"""The tracker: holdings, origin leases, expiry, and its HTTP surface."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from minutely.errors import ConfigError
from minutely.fleet.tracker import Announce, LeaseRequest, Tracker, create_app
from minutely.fleet.web import BackgroundServer

V = ("ctr", "v00000001")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def announce(t: Tracker, peer: str, chunks: list[int], version: str = V[1]) -> None:
    t.announce(Announce(peer, f"http://{peer}:1", V[0], version, chunks))


def lease(t: Tracker, peer: str, chunks: list[int], k: int = 100) -> list[int]:
    return t.lease(LeaseRequest(peer, V[0], V[1], chunks, k))


def test_swarm_lists_holders_per_chunk_and_announce_replaces_a_holding() -> None:
    t = Tracker(clock=FakeClock())
    announce(t, "a", [0, 1])
    announce(t, "b", [1, 2])
    assert t.swarm(*V) == {
        "peers": {"a": "http://a:1", "b": "http://b:1"},
        "holders": {"0": ["a"], "1": ["a", "b"], "2": ["b"]},
    }
    announce(t, "a", [3])
    assert t.swarm(*V)["holders"] == {"1": ["b"], "2": ["b"], "3": ["a"]}
    announce(t, "b", [])
    assert t.swarm(*V) == {"peers": {"a": "http://a:1"}, "holders": {"3": ["a"]}}
    assert t.swarm("ctr", "v00000002") == {"peers": {}, "holders": {}}


def test_a_chunk_is_leased_to_one_peer_until_it_expires() -> None:
    clock = FakeClock()
    t = Tracker(lease_s=10.0, clock=clock)
    assert lease(t, "a", [0, 1, 2, 3], k=2) == [0, 1]
    assert lease(t, "b", [0, 1, 2, 3]) == [2, 3]
    assert lease(t, "c", [0, 1, 2, 3]) == []
    assert lease(t, "a", [1, 0]) == [1, 0]  # a peer's own lease is renewed
    clock.now = 10.0
    assert lease(t, "c", [0, 1, 2, 3]) == [0, 1, 2, 3]  # every lease expired
    assert t.status()["leases_granted"] == 10


def test_held_chunks_are_never_leased_and_announcing_ends_the_lease() -> None:
    t = Tracker(clock=FakeClock())
    assert lease(t, "a", [0, 1]) == [0, 1]
    announce(t, "a", [0])
    assert t.status()["leases_live"] == 1
    assert lease(t, "b", [0, 1, 2]) == [2]
    announce(t, "a", [])  # gave the chunk up again: nobody holds it, nobody leases it
    assert lease(t, "b", [0]) == [0]


def test_silent_peers_are_forgotten_with_their_holdings_and_leases() -> None:
    clock = FakeClock()
    t = Tracker(lease_s=100.0, peer_ttl_s=30.0, clock=clock)
    announce(t, "a", [0])
    announce(t, "b", [1])
    assert lease(t, "a", [5]) == [5]
    clock.now = 20.0
    announce(t, "b", [1])  # b's heartbeat
    clock.now = 31.0
    assert t.swarm(*V) == {"peers": {"b": "http://b:1"}, "holders": {"1": ["b"]}}
    assert lease(t, "c", [0, 5]) == [0, 5]
    assert t.status() == {
        "peers": 1,
        "swarms": 1,
        "leases_live": 2,
        "leases_granted": 3,
        "peers_expired": 1,
    }


def test_leave_forgets_the_peer_everywhere() -> None:
    t = Tracker(clock=FakeClock())
    announce(t, "a", [0])
    announce(t, "a", [0], version="v00000002")
    assert lease(t, "a", [1]) == [1]
    t.leave("a")
    assert t.swarm(*V) == {"peers": {}, "holders": {}}
    assert t.status()["peers"] == 0
    assert lease(t, "b", [0, 1]) == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"lease_s": 0}, "tracker.lease_s"), ({"peer_ttl_s": -1.0}, "tracker.peer_ttl_s")],
)
def test_bad_settings_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{field}': expected a number of seconds > 0"):
        Tracker(**kwargs)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A real HTTP client of a tracker served on a thread of this process."""
    with (
        BackgroundServer(create_app(Tracker())) as server,
        httpx.Client(base_url=server.url, timeout=10) as c,
    ):
        yield c


def test_http_endpoints_round_trip(client: httpx.Client) -> None:
    body = {"peer": "a", "url": "http://127.0.0.1:9", "model": "ctr", "version": "v1"}
    assert client.post("/v1/announce", json={**body, "chunks": [0, 2]}).json() == {"ok": True}
    assert client.get("/v1/swarm/ctr/v1").json() == {
        "peers": {"a": "http://127.0.0.1:9"},
        "holders": {"0": ["a"], "2": ["a"]},
    }
    req = {"peer": "b", "model": "ctr", "version": "v1", "chunks": [0, 1, 2, 3], "max": 1}
    assert client.post("/v1/lease", json=req).json() == {"lease": [1], "lease_s": 10.0}
    assert client.post("/v1/leave", json={"peer": "a"}).json() == {"ok": True}
    assert client.get("/v1/swarm/ctr/v1").json() == {"peers": {}, "holders": {}}
    assert client.get("/v1/status").json()["leases_granted"] == 1


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/announce", b"{", "POST /v1/announce: expected a JSON body {"),
        ("/v1/announce", b"[]", "got Expected `object`, got `array`"),
        (
            "/v1/announce",
            b'{"peer": "a", "url": "ftp://x", "model": "m", "version": "v", "chunks": []}',
            "at `$.url`",
        ),
        (
            "/v1/announce",
            b'{"peer": "a", "url": "http://x:1", "model": "m", "version": "v", "chunks": [-1]}',
            "Expected `int` >= 0 - at `$.chunks[0]`",
        ),
        (
            "/v1/lease",
            b'{"peer": "a", "model": "m", "version": "v", "chunks": [1], "max": 0}',
            'POST /v1/lease: expected {"peer": str, "model": str, "version": str',
        ),
        ("/v1/leave", b"{}", "Object missing required field `peer`"),
    ],
)
def test_malformed_bodies_are_a_400_naming_what_was_expected(
    client: httpx.Client, path: str, body: bytes, message: str
) -> None:
    response = client.post(path, content=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_unknown_paths_and_methods_answer_json(client: httpx.Client) -> None:
    assert client.get("/v1/nothing").json() == {"error": "GET /v1/nothing: Not Found"}
    response = client.get("/v1/lease")
    assert response.status_code == 405
    assert response.json() == {"error": "GET /v1/lease: Method Not Allowed"}


@pytest.mark.integration
def test_tracker_process_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port_file = tmp_path / "tracker.port"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "minutely.fleet.tracker", "--port", "0"),
            *("--port-file", str(port_file), "--log-level", "warning"),
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "the tracker exited before listening"
            assert time.monotonic() < deadline, "the tracker did not write its port file"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        status = httpx.get(f"{url}/v1/status", timeout=5).json()
        assert status["peers"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_bad_tracker_settings_exit_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    from minutely.fleet.tracker import main

    assert main(["--lease-s", "0"]) == 2
    assert "'tracker.lease_s': expected a number of seconds > 0, got 0.0" in capsys.readouterr().err
