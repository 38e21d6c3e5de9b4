"""Agents on threads of the test process: sharing, bad peers, refusals, fallbacks, deltas."""

from __future__ import annotations

import logging
import random
import re
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fleet_helpers import (
    CHUNK_BYTES,
    MODEL,
    Fleet,
    InProcessAgent,
    Origin,
    model_status,
    publish,
    tensors,
    version_bytes,
    wait_for,
)

from minutely.errors import ArtifactError, ConfigError, StorageError
from minutely.fleet.agent import AgentSettings, chunk_layout, parse_options
from minutely.registry import FileEntry, Manifest, Registry, Signer
from minutely.schema import default_schema


@pytest.mark.integration
def test_agents_share_a_version_and_the_origin_sends_about_one_copy(
    origin: Origin, fleet: Fleet
) -> None:
    manifest = publish(origin.registry, tensors(1024, seed=1))  # 256 KiB: 17 chunks
    size = sum(e.bytes for e in manifest.files.values())
    _, tracker_url = fleet.tracker()
    agents = [
        fleet.agent(
            str(origin.root),
            name=f"a{i}",
            tracker=tracker_url,
            public_key=origin.public_key,
            max_transfers=2,
        )
        for i in range(4)
    ]
    errors: list[BaseException] = []

    def fetch(i: int) -> None:
        try:
            agents[i].agent.fetch(MODEL, manifest.version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    want = version_bytes(origin.registry, manifest.version, manifest)
    for a in agents:
        assert a.local.versions(MODEL) == [manifest.version]
        assert version_bytes(a.local, manifest.version, manifest) == want
        assert model_status(a.agent.status())["in_progress"] == {}
    counters = [a.counters() for a in agents]
    from_origin = sum(c["bytes_from_origin"] for c in counters)
    assert size <= from_origin <= 1.5 * size, counters
    assert sum(c["chunks_from_peers"] for c in counters) > 0
    assert sum(c["chunks_served"] for c in counters) == sum(
        c["chunks_from_peers"] for c in counters
    )
    assert all(c["peers_dropped"] == 0 for c in counters)
    # each agent's cache is gone once the version is installed; the chunks are still served
    assert not (fleet.tmp / "a0" / "cache" / MODEL / manifest.version).exists()
    chunk = chunk_layout(manifest)[3]
    got = httpx.get(f"{agents[0].server.url}/v1/chunks/{MODEL}/{manifest.version}/3").content
    assert got == want[chunk.file][chunk.start : chunk.start + chunk.length]


class BadPeer:
    """A real HTTP server that answers every chunk request wrongly, in one of several ways."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.release = threading.Event()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                outer.requests += 1
                body = b"x" * CHUNK_BYTES
                if outer.mode == "wrong-bytes":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                    self.wfile.write(body)
                elif outer.mode == "short-body":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body[:100])
                elif outer.mode == "dies-mid-body":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                    self.wfile.write(body[:1000])
                    self.wfile.flush()
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                elif outer.mode == "hangs":
                    outer.release.wait(30)
                elif outer.mode == "error":
                    self.wfile.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["wrong-bytes", "short-body", "dies-mid-body", "error", "hangs"])
def test_a_bad_peer_is_dropped_and_its_chunks_come_from_a_good_one(
    origin: Origin, fleet: Fleet, mode: str
) -> None:
    manifest = publish(origin.registry, tensors(1024, seed=2))
    total = len(chunk_layout(manifest))
    _, tracker_url = fleet.tracker()
    good = fleet.agent(str(origin.root), name="good", tracker=tracker_url)
    good.agent.fetch(MODEL, manifest.version)
    bad = BadPeer(mode)
    try:
        httpx.post(
            f"{tracker_url}/v1/announce",
            json={
                "peer": "bad",
                "url": bad.url,
                "model": MODEL,
                "version": manifest.version,
                "chunks": list(range(total)),
            },
        ).raise_for_status()
        random.seed(7)
        fresh = fleet.agent(
            str(origin.root),
            name="fresh",
            tracker=tracker_url,
            public_key=origin.public_key,
            max_transfers=1,
            transfer_timeout_s=0.5,
        )
        fresh.agent.fetch(MODEL, manifest.version)
    finally:
        bad.close()
    assert bad.requests == 1  # dropped after its first answer, never asked again
    counters = fresh.counters()
    assert counters["peers_dropped"] == 1
    assert counters["chunks_from_peers"] == total
    assert counters["bytes_from_origin"] == 0
    assert version_bytes(fresh.local, manifest.version, manifest) == version_bytes(
        origin.registry, manifest.version, manifest
    )


@pytest.mark.integration
def test_a_chunk_held_only_by_a_dropped_peer_comes_from_the_origin(
    origin: Origin, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = publish(origin.registry, tensors(256, seed=3))
    size = sum(e.bytes for e in manifest.files.values())
    total = len(chunk_layout(manifest))
    _, tracker_url = fleet.tracker()
    bad = BadPeer("wrong-bytes")
    try:
        httpx.post(
            f"{tracker_url}/v1/announce",
            json={
                "peer": "bad",
                "url": bad.url,
                "model": MODEL,
                "version": manifest.version,
                "chunks": list(range(total)),
            },
        ).raise_for_status()
        a = fleet.agent(str(origin.root), name="a", tracker=tracker_url, max_transfers=1)
        with caplog.at_level(logging.WARNING, logger="minutely.fleet.agent"):
            a.agent.fetch(MODEL, manifest.version)
    finally:
        bad.close()
    assert bad.requests == 1
    assert a.counters()["bytes_from_origin"] == size
    assert a.local.versions(MODEL) == [manifest.version]
    dropped = [r.getMessage() for r in caplog.records if "dropped peer bad" in r.getMessage()]
    assert len(dropped) == 1
    assert f"for {MODEL} {manifest.version} after chunk" in dropped[0]
    assert "expected sha256" in dropped[0]


def _sign_raw(origin: Origin, version: str, manifest_json: bytes, signer: Signer | None) -> None:
    vdir = origin.root / MODEL / version
    (vdir / "manifest.json").write_bytes(manifest_json)
    sig = vdir / "manifest.sig"
    if signer is None:
        sig.unlink(missing_ok=True)
    else:
        sig.write_bytes(signer.sign(manifest_json))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unsigned", "unsigned: expected manifest.sig signed by key"),
        ("other-key", "wrong signature: expected one by key"),
        ("tampered", "wrong signature: the ed25519 signature by key"),
        ("manifest-version", "unsupported manifest_version: expected one of [1, 2, 3], got 99"),
        ("malformed", "malformed manifest: Expected `int`, got `str` - at `$.samples_seen`"),
    ],
)
def test_a_refused_manifest_is_logged_and_nothing_is_fetched_or_installed(
    origin: Origin, fleet: Fleet, caplog: pytest.LogCaptureFixture, case: str, reason: str
) -> None:
    manifest = publish(origin.registry, tensors(256, seed=4))
    v = manifest.version
    raw = (origin.root / MODEL / v / "manifest.json").read_bytes()
    if case == "unsigned":
        _sign_raw(origin, v, raw, None)
    elif case == "other-key":
        _sign_raw(origin, v, raw, Signer.generate())
    elif case == "tampered":
        sig = (origin.root / MODEL / v / "manifest.sig").read_bytes()
        (origin.root / MODEL / v / "manifest.json").write_bytes(raw.replace(b'"auc"', b'"AUC"'))
        assert (origin.root / MODEL / v / "manifest.sig").read_bytes() == sig
    elif case == "manifest-version":
        _sign_raw(
            origin,
            v,
            raw.replace(b'"manifest_version": 3', b'"manifest_version": 99'),
            origin.signer,
        )
    else:
        _sign_raw(
            origin, v, raw.replace(b'"samples_seen": 10', b'"samples_seen": "10"'), origin.signer
        )
    a = fleet.agent(str(origin.root), name="a", public_key=origin.public_key)
    with (
        caplog.at_level(logging.ERROR, logger="minutely.fleet.agent"),
        pytest.raises(ArtifactError, match=re.escape(reason)),
    ):
        a.agent.fetch(MODEL, v)
    assert a.agent.sync_once() == []  # refused once, not retried by the poller
    assert a.agent.sync_once() == []
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 1
    assert refused[0].startswith(f"refused {MODEL} {v}: ")
    assert reason in refused[0]
    status = model_status(a.agent.status())
    assert status["refused"] == [{"version": v, "reason": refused[0].split(": ", 1)[1]}]
    assert status["installed"] == []
    assert status["counters"]["refusals"] == 1
    assert status["counters"]["bytes_from_origin"] == 0
    assert a.local.versions(MODEL) == []
    assert not (fleet.tmp / "a" / "cache" / MODEL / v).exists()


def test_corrupt_bytes_at_the_origin_are_refused_after_retries(
    origin: Origin, fleet: Fleet
) -> None:
    manifest = publish(origin.registry, tensors(256, seed=5))
    weights = origin.root / MODEL / manifest.version / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # the last chunk no longer matches its digest
    weights.write_bytes(bytes(data))
    a = fleet.agent(str(origin.root), name="a", public_key=origin.public_key, origin_attempts=2)
    with pytest.raises(ArtifactError, match="the origin's bytes do not match the manifest 2 times"):
        a.agent.fetch(MODEL, manifest.version)
    assert a.local.versions(MODEL) == []
    status = model_status(a.agent.status())
    assert status["counters"]["refusals"] == 1
    assert "expected sha256" in status["refused"][0]["reason"]


@pytest.mark.integration
def test_with_the_tracker_down_agents_fetch_from_the_origin(
    origin: Origin, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = publish(origin.registry, tensors(512, seed=6))
    size = sum(e.bytes for e in manifest.files.values())
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    agents = [fleet.agent(str(origin.root), name=f"a{i}", tracker=dead) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="minutely.fleet.agent"):
        for a in agents:
            assert a.agent.sync_once() == [(MODEL, manifest.version)]
    for a in agents:
        assert a.local.versions(MODEL) == [manifest.version]
        assert a.counters()["bytes_from_origin"] == size
        assert version_bytes(a.local, manifest.version, manifest) == version_bytes(
            origin.registry, manifest.version, manifest
        )
    assert any(f"tracker {dead} does not answer" in r.getMessage() for r in caplog.records)


def test_a_delta_brings_its_parent_and_loads_as_the_full_weights(
    origin: Origin, fleet: Fleet
) -> None:
    first = tensors(1024, seed=7)
    full = publish(origin.registry, first)
    second = {k: v.clone() for k, v in first.items()}
    second["emb"][:10] += 1.0
    delta = publish(origin.registry, second, delta_from=(full.version, first))
    assert delta.delta_of == full.version
    a = fleet.agent(str(origin.root), name="a", public_key=origin.public_key)
    assert a.agent.sync_once() == [(MODEL, delta.version)]
    assert a.local.versions(MODEL) == [full.version, delta.version]
    _, loaded = a.local.load(MODEL, delta.version, expected_fingerprint=None)
    assert all(torch.equal(loaded[k], second[k]) for k in second)
    c = a.counters()
    assert c["versions_installed"] == 2
    assert c["bytes_from_origin"] == sum(e.bytes for m in (full, delta) for e in m.files.values())
    assert a.agent.sync_once() == []  # nothing new


def test_the_origin_pin_is_mirrored(origin: Origin, fleet: Fleet) -> None:
    v1 = publish(origin.registry, tensors(64, seed=8)).version
    v2 = publish(origin.registry, tensors(64, seed=9)).version
    a = fleet.agent(str(origin.root), name="a")
    assert a.agent.sync_once() == [(MODEL, v2)]
    origin.registry.pin(MODEL, v1)
    assert a.agent.sync_once() == [(MODEL, v1)]
    assert a.local.serving_version(MODEL) == v1
    origin.registry.unpin(MODEL)
    assert a.agent.sync_once() == []
    assert a.local.pinned(MODEL) is None
    assert a.local.serving_version(MODEL) == v2


def test_verified_chunks_on_disk_are_reused_and_bad_ones_fetched_again(
    origin: Origin, fleet: Fleet
) -> None:
    manifest = publish(origin.registry, tensors(256, seed=10))
    chunks = chunk_layout(manifest)
    blob = (origin.root / MODEL / manifest.version / chunks[0].file).read_bytes()
    cache = fleet.tmp / "a" / "cache" / MODEL / manifest.version
    cache.mkdir(parents=True)
    assert len({c.file for c in chunks}) == 1
    assert len(chunks) > 3
    # chunks 0 and 1 arrived; chunk 2 was cut short by a crash (garbage in its first bytes);
    # the part file is longer than the version (to be cut back)
    part = bytearray(blob[: chunks[2].start + chunks[2].length])
    part[chunks[2].start : chunks[2].start + 7] = b"garbage"
    (cache / f"{chunks[0].file}.part").write_bytes(bytes(part) + b"\0" * len(blob))
    a = fleet.agent(str(origin.root), name="a")
    a.agent.fetch(MODEL, manifest.version)
    counters = a.counters()
    assert counters["chunks_resumed"] == 2
    assert counters["chunks_from_origin"] == len(chunks) - 2
    assert counters["bytes_from_origin"] == len(blob) - chunks[0].length - chunks[1].length
    installed = fleet.tmp / "a" / "registry" / MODEL / manifest.version / chunks[0].file
    assert installed.read_bytes() == blob
    assert not cache.exists()


def test_a_new_fetch_fetches_every_chunk_even_one_of_zeros(origin: Origin, fleet: Fleet) -> None:
    # A new part file reads as zeros: only a part file a cut-short fetch left is re-hashed.
    weights = tensors(256, seed=13)
    weights["emb"][:128] = 0.0  # 32 KiB of zeros: whole chunks of zero bytes
    manifest = publish(origin.registry, weights)
    a = fleet.agent(str(origin.root), name="a")
    a.agent.fetch(MODEL, manifest.version)
    counters = a.counters()
    assert counters["chunks_resumed"] == 0
    assert counters["chunks_from_origin"] == len(chunk_layout(manifest))


def test_status_and_chunk_endpoints(origin: Origin, fleet: Fleet) -> None:
    manifest = publish(origin.registry, tensors(64, seed=11))
    a = fleet.agent(str(origin.root), name="a", region="eu-1")
    url = a.server.url
    missing = httpx.get(f"{url}/v1/chunks/{MODEL}/{manifest.version}/0")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": f"chunk 0 of {MODEL} {manifest.version}: expected a verified chunk held here, "
        "got none"
    }
    assert httpx.get(f"{url}/v1/chunks/{MODEL}/{manifest.version}/x").status_code == 404
    a.agent.sync_once()
    doc = httpx.get(f"{url}/v1/status").json()
    assert doc["peer"] == "a"
    assert doc["region"] == "eu-1"
    assert doc["url"] == url
    status = model_status(doc)
    assert status["installed"] == [manifest.version]
    fetch = status["fetches"][manifest.version]
    assert fetch["installed"] >= fetch["started"] > 0
    assert doc["counters"] == status["counters"]
    assert httpx.get(f"{url}/v1/chunks/{MODEL}/{manifest.version}/0").status_code == 200


def test_a_version_1_manifest_is_one_chunk_per_file() -> None:
    m = Manifest(
        manifest_version=2,
        model=MODEL,
        version="v00000001",
        parent=None,
        base=None,
        created_ms=0,
        arch="lr",
        model_config={},
        feature_schema=default_schema().to_dict(),
        schema_fingerprint=default_schema().fingerprint(),
        metrics={},
        samples_seen=0,
        files={"weights.safetensors": FileEntry("ab", 10), "extra": FileEntry("cd", 0)},
    )
    assert [(c.index, c.file, c.start, c.length, c.sha256) for c in chunk_layout(m)] == [
        (0, "weights.safetensors", 0, 10, "ab")
    ]


def test_chunks_are_numbered_over_files_in_name_order(tmp_path: Path) -> None:
    reg = Registry(tmp_path, chunk_bytes=1000)
    m = publish(reg, tensors(8, seed=12), resume={"state.bin": b"s" * 10})
    assert "state.bin" not in m.files  # trainer state is never distributed
    layout = chunk_layout(m)
    assert [c.index for c in layout] == list(range(len(layout)))
    assert {c.file for c in layout} == {"weights.safetensors"}
    assert [c.start for c in layout] == [i * 1000 for i in range(len(layout))]
    assert sum(c.length for c in layout) == m.files["weights.safetensors"].bytes


def _settings(tmp_path: Path, **kw: Any) -> AgentSettings:
    base: dict[str, Any] = {
        "origin": str(tmp_path / "origin"),
        "cache": tmp_path / "cache",
        "local_registry": tmp_path / "local",
        "models": (MODEL,),
    }
    return AgentSettings(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"models": ()}, "'agent.models': expected at least one model name, got []"),
        ({"models": ("a", "a")}, "'agent.models': expected unique model names"),
        (
            {"models": ("../x",)},
            "'agent.models': expected names of letters, digits, '_', '.' or '-' (not starting "
            "with '.', '_' or '-'), got '../x'",
        ),
        ({"origin": ""}, "'agent.origin': expected a registry folder or URL"),
        ({"tracker": "tracker:8700"}, "'agent.tracker': expected a URL http://host:port"),
        ({"region": "a b"}, "'agent.region': expected a name without '/' or spaces"),
        ({"peer_id": "a/b"}, "'agent.peer_id': expected a name without '/' or spaces"),
        ({"poll_interval_s": 0}, "'agent.poll_interval_s': expected a number of seconds > 0"),
        ({"stop_grace_s": 0}, "'agent.stop_grace_s': expected a number of seconds > 0, got 0"),
        ({"max_transfers": 0}, "'agent.max_transfers': expected an int >= 1, got 0"),
        ({"max_bytes_per_s": -1.0}, "'agent.max_bytes_per_s': expected a number > 0 or none"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _settings(tmp_path, **kw).check()


def fetch_in_thread(
    a: InProcessAgent, version: str
) -> tuple[threading.Thread, list[BaseException]]:
    """``a`` fetching ``version`` on a thread of its own, and what the fetch raised."""
    raised: list[BaseException] = []

    def fetch() -> None:
        try:
            a.agent.fetch(MODEL, version)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    return thread, raised


def test_a_stop_waits_for_transfers_stuck_on_the_origin_only_its_grace(
    origin: Origin, fleet: Fleet
) -> None:
    manifest = publish(origin.registry, tensors(256, seed=12))
    a = fleet.agent(str(origin.root), name="a", stop_grace_s=0.5, max_transfers=2)
    release = threading.Event()
    started = threading.Semaphore(0)
    read_range = a.agent.origin.read_range

    def stuck(*args: Any) -> bytes:  # an origin that stopped answering mid-read
        started.release()
        release.wait(30)
        return read_range(*args)

    a.agent.origin.read_range = stuck  # type: ignore[method-assign]
    thread, errors = fetch_in_thread(a, manifest.version)
    try:
        assert started.acquire(timeout=10)
        t = time.monotonic()
        a.agent.close()
        assert time.monotonic() - t < 3.0
        assert a.agent.transfers_running() >= 1
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert [type(e).__name__ for e in errors] == ["_StoppedError"]
        assert a.local.versions(MODEL) == []
    finally:
        release.set()
        thread.join(timeout=10)
    # The stuck reads end on their own once the origin answers; nothing is left running.
    wait_for("the transfers to end", lambda: a.agent.transfers_running() == 0)


def test_fetch_of_a_model_not_watched_is_refused(origin: Origin, fleet: Fleet) -> None:
    a = fleet.agent(str(origin.root), name="a")
    with pytest.raises(ConfigError, match=r"'agent.models': expected one of \['ctr'\], got 'cvr'"):
        a.agent.fetch("cvr", "v00000001")


def test_origin_options_parse_nested_typed_values() -> None:
    assert parse_options(["a.b.c=1", "a.b.d=x y", "e=true"]) == {
        "a": {"b": {"c": 1, "d": "x y"}},
        "e": True,
    }
    with pytest.raises(ConfigError, match="'--origin-option': expected key=value, got 'novalue'"):
        parse_options(["novalue"])
    with pytest.raises(ConfigError, match="expected a as a table"):
        parse_options(["a=1", "a.b=2"])


def test_agent_cli_reports_bad_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from minutely.fleet.agent import main

    args = ["--origin", str(tmp_path), "--cache", str(tmp_path / "c")]
    args += ["--local-registry", str(tmp_path / "l"), "--model", MODEL]
    assert main([*args, "--max-transfers", "0"]) == 2
    assert "'agent.max_transfers': expected an int >= 1, got 0" in capsys.readouterr().err
    assert main([*args, "--public-key", str(tmp_path / "missing.pem")]) == 2
    assert "missing.pem: expected an Ed25519 public key file in PEM, got no such file" in (
        capsys.readouterr().err
    )


def test_a_delta_on_a_refused_parent_is_refused_too(
    origin: Origin, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    first = tensors(256, seed=13)
    full = publish(origin.registry, first)
    second = {k: v.clone() for k, v in first.items()}
    second["emb"][:3] += 1.0
    delta = publish(origin.registry, second, delta_from=(full.version, first))
    assert delta.delta_of == full.version
    raw = (origin.root / MODEL / full.version / "manifest.json").read_bytes()
    _sign_raw(origin, full.version, raw, None)  # the parent is unsigned now
    a = fleet.agent(str(origin.root), name="a", public_key=origin.public_key)
    with caplog.at_level(logging.ERROR, logger="minutely.fleet.agent"):
        assert a.agent.sync_once() == []
        assert a.agent.sync_once() == []
    refused = {r["version"]: r["reason"] for r in model_status(a.agent.status())["refused"]}
    assert sorted(refused) == [full.version, delta.version]
    assert "unsigned" in refused[full.version]
    assert refused[delta.version].startswith(f"a delta on {full.version}, which was refused: ")
    assert len([r for r in caplog.records if r.getMessage().startswith("refused")]) == 2
    assert a.local.versions(MODEL) == []


@pytest.mark.integration
def test_only_the_newest_installed_versions_are_served(origin: Origin, fleet: Fleet) -> None:
    tracker, tracker_url = fleet.tracker()
    a = fleet.agent(str(origin.root), name="a", tracker=tracker_url, announce_versions=1)
    v1 = publish(origin.registry, tensors(64, seed=14)).version
    a.agent.sync_once()
    assert sorted(tracker.swarm(MODEL, v1)["peers"]) == ["a"]
    v2 = publish(origin.registry, tensors(64, seed=15)).version
    a.agent.sync_once()
    assert tracker.swarm(MODEL, v1) == {"peers": {}, "holders": {}}
    assert sorted(tracker.swarm(MODEL, v2)["peers"]) == ["a"]
    assert a.agent.read_chunk(MODEL, v1, 0) is None
    assert a.agent.read_chunk(MODEL, v2, 0) is not None
    assert a.local.versions(MODEL) == [v2]  # and removed from the local registry


def test_a_pin_set_on_the_server_holds_until_the_origin_pin_moves(
    origin: Origin, fleet: Fleet
) -> None:
    v1 = publish(origin.registry, tensors(64, seed=21)).version
    v2 = publish(origin.registry, tensors(64, seed=22)).version
    a = fleet.agent(str(origin.root), name="a")
    a.agent.fetch(MODEL, v1)
    a.agent.sync_once()
    a.local.pin(MODEL, v1)  # what the server's admin endpoint does
    a.agent.sync_once()
    assert a.local.serving_version(MODEL) == v1  # the origin's pointer did not move
    origin.registry.pin(MODEL, v2)
    a.agent.sync_once()
    assert a.local.pinned(MODEL) == v2  # it moved: mirrored


def test_a_sync_request_makes_the_agent_check_the_origin_at_once(
    origin: Origin, fleet: Fleet
) -> None:
    v0 = publish(origin.registry, tensors(64, seed=24)).version
    a = fleet.agent(str(origin.root), name="a", poll_interval_s=3_600.0)
    a.agent.start(a.server.url)  # background polling, next check in an hour
    wait_for("the first check", lambda: v0 in a.local.versions(MODEL), 10)
    v1 = publish(origin.registry, tensors(64, seed=23)).version
    time.sleep(0.3)
    assert v1 not in a.local.versions(MODEL)
    r = httpx.post(f"{a.server.url}/v1/sync")
    assert (r.status_code, r.json()) == (202, {"sync": "scheduled"})
    wait_for("the announced version", lambda: v1 in a.local.versions(MODEL), 10)


def test_closing_the_agent_cuts_a_fetch_short_and_keeps_its_chunks(
    origin: Origin, fleet: Fleet
) -> None:
    manifest = publish(origin.registry, tensors(256, seed=16))  # 5 chunks of 16 KiB
    a = fleet.agent(str(origin.root), name="a", max_transfers=1, max_bytes_per_s=float(CHUNK_BYTES))
    thread, outcome = fetch_in_thread(a, manifest.version)
    wait_for(
        "a chunk",
        lambda: (
            model_status(a.agent.status())["in_progress"].get(manifest.version, {}).get("held", 0)
            >= 1
        ),
        timeout_s=10,
    )
    a.agent.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert "the agent is stopping" in str(outcome[0])
    assert a.local.versions(MODEL) == []
    # The verified chunks stay in the cache: an agent started on it resumes with them.
    again = fleet.agent(str(origin.root), name="a", max_transfers=1)
    again.agent.fetch(MODEL, manifest.version)
    assert 1 <= again.counters()["chunks_resumed"] < len(chunk_layout(manifest))


@pytest.mark.integration
def test_a_tracker_that_dies_during_a_fetch_leaves_the_origin(
    origin: Origin, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = publish(origin.registry, tensors(256, seed=17))  # 5 chunks of 16 KiB
    size = sum(e.bytes for e in manifest.files.values())
    _, tracker_url = fleet.tracker()
    a = fleet.agent(
        str(origin.root),
        name="a",
        tracker=tracker_url,
        max_transfers=1,
        max_bytes_per_s=4.0 * CHUNK_BYTES,
    )
    thread = threading.Thread(target=a.agent.fetch, args=(MODEL, manifest.version))
    with caplog.at_level(logging.WARNING, logger="minutely.fleet.agent"):
        thread.start()
        wait_for(
            "a chunk",
            lambda: (
                model_status(a.agent.status())["in_progress"]
                .get(manifest.version, {})
                .get("held", 0)
                >= 1
            ),
            timeout_s=10,
        )
        fleet.servers[0].stop()  # the tracker
        thread.join(timeout=20)
    assert a.local.versions(MODEL) == [manifest.version]
    assert a.counters()["bytes_from_origin"] == size
    assert any(f"tracker {tracker_url} does not answer" in r.getMessage() for r in caplog.records)


def test_an_origin_that_fails_to_read_is_a_fetch_error_retried_later(
    origin: Origin, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = publish(origin.registry, tensors(64, seed=18))
    weights = origin.root / MODEL / manifest.version / "weights.safetensors"
    saved = weights.read_bytes()
    weights.unlink()
    a = fleet.agent(str(origin.root), name="a", origin_attempts=2)
    with pytest.raises(
        OSError, match=r"chunk \d+ \(weights.safetensors\): the origin failed 2 times"
    ):
        a.agent.fetch(MODEL, manifest.version)
    with caplog.at_level(logging.WARNING, logger="minutely.fleet.agent"):
        assert a.agent.sync_once() == []
    assert any("sync of ctr failed (retried next poll)" in r.getMessage() for r in caplog.records)
    status = model_status(a.agent.status())
    assert status["counters"]["fetch_errors"] == 1
    assert status["refused"] == []
    weights.write_bytes(saved)
    assert a.agent.sync_once() == [(MODEL, manifest.version)]


def test_a_cache_folder_that_cannot_be_made_is_a_storage_error(
    origin: Origin, fleet: Fleet
) -> None:
    manifest = publish(origin.registry, tensors(64, seed=19))
    blocker = fleet.tmp / "a" / "cache" / MODEL
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the model's cache folder goes")
    a = fleet.agent(str(origin.root), name="a")
    with pytest.raises(StorageError, match=r"expected a writable cache folder, got"):
        a.agent.fetch(MODEL, manifest.version)


def _manifest(files: dict[str, FileEntry], chunk_bytes: int) -> Manifest:
    return Manifest(
        manifest_version=3,
        model=MODEL,
        version="v00000001",
        parent=None,
        base=None,
        created_ms=0,
        arch="lr",
        model_config={},
        feature_schema={},
        schema_fingerprint="",
        metrics={},
        samples_seen=0,
        files=files,
        chunk_bytes=chunk_bytes,
    )


def test_chunk_layout_refuses_bad_names_and_digest_counts() -> None:
    with pytest.raises(ArtifactError, match=r"files: expected plain file names, got '\.\./x'"):
        chunk_layout(_manifest({"../x": FileEntry("ab", 4, ["c"])}, 4))
    too_many = _manifest({"w": FileEntry("ab", 4, ["c", "d"])}, 4)
    with pytest.raises(ArtifactError, match=r"files\['w'\].chunks: expected 1 digests for 4 bytes"):
        chunk_layout(too_many)


@pytest.mark.integration
@pytest.mark.slow
def test_a_slow_origin_read_keeps_its_lease(origin: Origin, fleet: Fleet) -> None:
    manifest = publish(origin.registry, tensors(256, seed=20))  # 5 chunks of 16 KiB
    size = sum(e.bytes for e in manifest.files.values())
    # leases of 2 s, renewed every 0.67 s: a busy machine delays a renewal by well under 1.3 s
    tracker, tracker_url = fleet.tracker(lease_s=2.0)
    slow = fleet.agent(
        str(origin.root),
        name="slow",
        tracker=tracker_url,
        max_transfers=5,
        max_bytes_per_s=0.4 * CHUNK_BYTES,  # 12.5 s for the five chunks: six lease times
    )
    thread = threading.Thread(target=slow.agent.fetch, args=(MODEL, manifest.version))
    thread.start()
    wait_for("the slow agent's leases", lambda: tracker.status()["leases_live"] == 5, 30)
    fast = fleet.agent(str(origin.root), name="fast", tracker=tracker_url)
    fast.agent.fetch(MODEL, manifest.version)
    thread.join(timeout=60)
    assert slow.local.versions(MODEL) == fast.local.versions(MODEL) == [manifest.version]
    assert slow.counters()["bytes_from_origin"] == size
    assert fast.counters()["bytes_from_origin"] == 0
    assert fast.counters()["chunks_from_peers"] == len(chunk_layout(manifest))
