"""The region's tracker: which peer holds which chunk of which version, and the origin leases.

One tracker serves one region. Agents announce the chunks they hold; an agent missing a chunk
asks who holds it, and for a chunk nobody holds asks for a *lease*: the right to fetch it from
the origin. A chunk is leased to one peer at a time (until it is held or the lease expires after
``lease_s``, so a dead fetcher's chunks go to someone else), which keeps what the origin sends
to about one copy of each version per region. The tracker holds no data and no state on disk:
a restarted tracker learns the holdings again from the agents' next announcements.

HTTP endpoints (JSON bodies and answers; a malformed body is a 400 ``{"error": message}``):

``POST /v1/announce`` ``{"peer", "url", "model", "version", "chunks": [indices]}``
    -> ``{"ok": true}``. Replaces that peer's holding of that version; also its heartbeat.
``GET /v1/swarm/{model}/{version}``
    -> ``{"peers": {peer: url}, "holders": {"<chunk>": [peers]}}`` (peers holding something).
``POST /v1/lease`` ``{"peer", "model", "version", "chunks": [wanted], "max": k}``
    -> ``{"lease": [indices], "lease_s": seconds}``: at most ``k`` of the wanted chunks that
    nobody holds and nobody else has leased, in the order asked, each for ``lease_s`` seconds
    (asking again for a chunk leased to the asker renews the lease).
``POST /v1/leave`` ``{"peer"}`` -> ``{"ok": true}``: forget the peer, its holdings and leases.
``GET /v1/status`` -> counts of peers, swarms, live leases, and leases granted so far.

Peers silent (no announce, lease or leave) for ``peer_ttl_s`` are forgotten with their holdings
and leases.

``python -m minutely.fleet.tracker --host 127.0.0.1 --port 0 --port-file tracker.port``

>>> t = Tracker(lease_s=10.0, peer_ttl_s=30.0, clock=lambda: 0.0)
>>> t.announce(Announce("a", "http://a:1", "ctr", "v00000001", [0, 2]))
>>> t.lease(LeaseRequest("b", "ctr", "v00000001", [0, 1, 2, 3], 4))
[1, 3]
>>> t.lease(LeaseRequest("c", "ctr", "v00000001", [1, 3], 4))
[]
>>> t.swarm("ctr", "v00000001")
{'peers': {'a': 'http://a:1'}, 'holders': {'0': ['a'], '2': ['a']}}
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from minutely.errors import ConfigError
from minutely.fleet.web import (
    BadRequestError,
    bad_request,
    http_exception,
    json_response,
    read_json,
    serve_forever,
)

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 10.0
DEFAULT_PEER_TTL_S = 30.0

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^/\s]+$")]
_Url = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^https?://[^/\s]+$")]
_Index = Annotated[int, msgspec.Meta(ge=0)]
_Max = Annotated[int, msgspec.Meta(ge=1)]


class Announce(msgspec.Struct):
    """A peer's holding of one version (``url``: where its agent serves chunks)."""

    peer: _Name
    url: _Url
    model: _Name
    version: _Name
    chunks: list[_Index]


class LeaseRequest(msgspec.Struct):
    """Wanted chunks of one version, in the asker's order of preference; at most ``max``."""

    peer: _Name
    model: _Name
    version: _Name
    chunks: list[_Index]
    max: _Max


class Leave(msgspec.Struct):
    peer: _Name


_ANNOUNCE_DOC = (
    '{"peer": str, "url": "http://host:port", "model": str, "version": str, "chunks": [int >= 0]}'
)
_LEASE_DOC = '{"peer": str, "model": str, "version": str, "chunks": [int >= 0], "max": int >= 1}'
_LEAVE_DOC = '{"peer": str}'


@dataclass
class _Peer:
    url: str
    seen: float
    holdings: dict[tuple[str, str], frozenset[int]] = field(default_factory=dict)


@dataclass
class _Lease:
    peer: str
    expires: float


class Tracker:
    """The tracker's state (thread-safe); ``clock`` gives seconds (monotonic by default)."""

    def __init__(
        self,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        peer_ttl_s: float = DEFAULT_PEER_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not lease_s > 0:
            raise ConfigError("tracker.lease_s", "a number of seconds > 0", lease_s)
        if not peer_ttl_s > 0:
            raise ConfigError("tracker.peer_ttl_s", "a number of seconds > 0", peer_ttl_s)
        self.lease_s = float(lease_s)
        self.peer_ttl_s = float(peer_ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        # (model, version) -> peer -> chunks; the same sets as the peers' holdings.
        self._swarms: dict[tuple[str, str], dict[str, frozenset[int]]] = {}
        self._leases: dict[tuple[str, str], dict[int, _Lease]] = {}
        self.leases_granted = 0
        self.peers_expired = 0

    def announce(self, req: Announce) -> None:
        """Record that ``req.peer`` holds exactly ``req.chunks`` of the version (a heartbeat)."""
        key = (req.model, req.version)
        chunks = frozenset(req.chunks)
        with self._lock:
            now = self._clock()
            self._expire(now)
            peer = self._peers.get(req.peer)
            if peer is None:
                peer = self._peers[req.peer] = _Peer(req.url, now)
                logger.info("peer %s joined at %s", req.peer, req.url)
            peer.url, peer.seen = req.url, now
            swarm = self._swarms.setdefault(key, {})
            if chunks:
                peer.holdings[key] = chunks
                swarm[req.peer] = chunks
            else:
                peer.holdings.pop(key, None)
                swarm.pop(req.peer, None)
                if not swarm:
                    del self._swarms[key]
            leases = self._leases.get(key)
            if leases:
                for index in chunks & leases.keys():
                    del leases[index]  # held now: others fetch it from the holder

    def swarm(self, model: str, version: str) -> dict[str, Any]:
        """The peers holding chunks of a version and, per chunk, who holds it."""
        with self._lock:
            self._expire(self._clock())
            swarm = self._swarms.get((model, version), {})
            holders: dict[int, list[str]] = {}
            for peer in sorted(swarm):
                for index in swarm[peer]:
                    holders.setdefault(index, []).append(peer)
            return {
                "peers": {peer: self._peers[peer].url for peer in sorted(swarm)},
                "holders": {str(i): holders[i] for i in sorted(holders)},
            }

    def lease(self, req: LeaseRequest) -> list[int]:
        """Origin leases for up to ``req.max`` wanted chunks nobody holds or has leased."""
        key = (req.model, req.version)
        with self._lock:
            now = self._clock()
            self._expire(now)
            peer = self._peers.get(req.peer)
            if peer is not None:
                peer.seen = now
            held: set[int] = set()
            for chunks in self._swarms.get(key, {}).values():
                held |= chunks
            leases = self._leases.setdefault(key, {})
            granted: list[int] = []
            for index in dict.fromkeys(req.chunks):
                if len(granted) >= req.max:
                    break
                if index in held:
                    continue
                current = leases.get(index)
                if current is not None and current.peer != req.peer and current.expires > now:
                    continue
                leases[index] = _Lease(req.peer, now + self.lease_s)
                granted.append(index)
            if not leases:
                del self._leases[key]
            self.leases_granted += len(granted)
            return granted

    def leave(self, peer_id: str) -> None:
        """Forget ``peer_id``: its holdings and its leases (a clean shutdown of its agent)."""
        with self._lock:
            self._forget(peer_id)
        logger.info("peer %s left", peer_id)

    def status(self) -> dict[str, int]:
        with self._lock:
            now = self._clock()
            self._expire(now)
            live = sum(
                1 for leases in self._leases.values() for x in leases.values() if x.expires > now
            )
            return {
                "peers": len(self._peers),
                "swarms": len(self._swarms),
                "leases_live": live,
                "leases_granted": self.leases_granted,
                "peers_expired": self.peers_expired,
            }

    def _expire(self, now: float) -> None:
        cutoff = now - self.peer_ttl_s
        for peer_id in [p for p, peer in self._peers.items() if peer.seen < cutoff]:
            self._forget(peer_id)
            self.peers_expired += 1
            logger.info("peer %s forgotten: silent for more than %.1f s", peer_id, self.peer_ttl_s)
        for key in [k for k, leases in self._leases.items() if leases]:
            leases = self._leases[key]
            for index in [i for i, x in leases.items() if x.expires <= now]:
                del leases[index]
            if not leases:
                del self._leases[key]

    def _forget(self, peer_id: str) -> None:
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            for key in peer.holdings:
                swarm = self._swarms.get(key)
                if swarm is not None:
                    swarm.pop(peer_id, None)
                    if not swarm:
                        del self._swarms[key]
        for key in list(self._leases):
            leases = self._leases[key]
            for index in [i for i, x in leases.items() if x.peer == peer_id]:
                del leases[index]
            if not leases:
                del self._leases[key]


def create_app(tracker: Tracker) -> Starlette:
    """The tracker's HTTP application over ``tracker`` (reachable as ``app.state.tracker``)."""

    async def announce(request: Request) -> Response:
        tracker.announce(await read_json(request, Announce, _ANNOUNCE_DOC))
        return json_response(200, {"ok": True})

    async def swarm(request: Request) -> Response:
        return json_response(
            200, tracker.swarm(request.path_params["model"], request.path_params["version"])
        )

    async def lease(request: Request) -> Response:
        granted = tracker.lease(await read_json(request, LeaseRequest, _LEASE_DOC))
        return json_response(200, {"lease": granted, "lease_s": tracker.lease_s})

    async def leave(request: Request) -> Response:
        tracker.leave((await read_json(request, Leave, _LEAVE_DOC)).peer)
        return json_response(200, {"ok": True})

    async def status(request: Request) -> Response:
        return json_response(200, tracker.status())

    app = Starlette(
        routes=[
            Route("/v1/announce", announce, methods=["POST"]),
            Route("/v1/swarm/{model}/{version}", swarm, methods=["GET"]),
            Route("/v1/lease", lease, methods=["POST"]),
            Route("/v1/leave", leave, methods=["POST"]),
            Route("/v1/status", status, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_exception, BadRequestError: bad_request},
    )
    app.state.tracker = tracker
    return app


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minutely.fleet.tracker",
        description="Run a region's tracker: chunk holdings of the agents and origin leases.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700, help="0 picks a free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S, help="origin lease, seconds")
    p.add_argument(
        "--peer-ttl-s", type=float, default=DEFAULT_PEER_TTL_S, help="forget silent peers after"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tracker until SIGTERM/SIGINT; the exit status (0 after a clean stop)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        tracker = Tracker(lease_s=args.lease_s, peer_ttl_s=args.peer_ttl_s)
    except ConfigError as exc:
        print(f"minutely.fleet.tracker: {exc}", file=sys.stderr)
        return 2
    return serve_forever(
        create_app(tracker),
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
