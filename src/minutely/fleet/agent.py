"""The agent on each server host: fetch new versions chunk by chunk, verify, serve, install.

An agent watches some models of an origin registry (a folder, or ``s3://...``): every
``poll_interval_s`` it reads the origin's serving version of each model (the pinned one, else
the latest), and for one its local registry lacks it

1. reads the raw ``manifest.json`` and ``manifest.sig`` from the origin and verifies them
   (:meth:`Registry.verify_manifest`: signature when a public key is configured, parse, model
   and version) before it fetches anything; a refused manifest is logged with the version and
   the reason, counted, listed in the status, and not retried by the poller;
2. for a delta version, fetches its parent chain first (unless the local registry has it);
3. fetches the missing chunks, at most ``max_transfers`` at a time, rarest first (fewest
   holders, random ties): a chunk some peer holds from that peer (``GET
   <peer>/v1/chunks/{model}/{version}/{i}``), a chunk nobody holds from the origin once the
   region's tracker grants a lease for it (``read_range``; the lease is renewed while the read
   lasts), and otherwise waits for a holder.
   Without a tracker, or while it does not answer, chunks come from the origin directly. A peer
   that errors, times out or sends a chunk that fails its sha256 is dropped for that version;
   the chunk is fetched elsewhere (from the origin when no other peer holds it);
4. writes every verified chunk at its offset of ``<cache>/<model>/<version>/<file>.part`` (a
   file of the version's size), so a restarted agent resumes with the chunks on disk (each
   hashed again, those that do not match fetched again), and announces its holding to the
   tracker as chunks arrive;
5. once every chunk is verified, installs the version into the local registry from those files
   (:meth:`Registry.install`, which checks the signature and every file's size, sha256 and chunk
   digests again, reading in chunks, and links the files in: no version is ever held in memory
   whole); then the chunks are served from the installed files and the cache is removed.
   Peers are served the newest ``announce_versions`` installed versions of each model.

Chunks are numbered globally over the manifest's ``files`` in sorted file-name order, each file
cut in ``chunk_bytes`` slices (a manifest without chunk digests: one chunk per file).

The agent serves ``GET /v1/chunks/{model}/{version}/{i}`` (verified chunks only; 404
otherwise) and ``GET /v1/status``: per model the versions installed, those in progress with
chunks held and total, when each fetch started and finished (epoch seconds), the refusals and
the counters (chunks and bytes from peers and from the origin, chunks resumed from the cache,
chunks and bytes served, peers dropped, refusals, fetch errors); ``POST /v1/sync`` makes it
check the origin at once (what a follower of the announcement topic calls). It mirrors the
origin's rollback pointer into the local registry when that pointer changes (a pin set on the
server itself holds until then), and keeps the newest ``announce_versions`` versions of each
model there (and what they need: pinned, bases, delta parents). The agent handles bytes only:
it never loads a model.
Stopping the agent (SIGTERM) cuts a fetch short between chunks; the next start resumes it.
Transfers in flight get ``stop_grace_s`` to end; the process then exits without the ones still
running (a read from an origin that stopped answering), which the next start fetches again.

``python -m minutely.fleet.agent --origin s3://bucket/registry --origin-option
endpoint_url=http://... --cache DIR --local-registry DIR --tracker http://tracker:8700
--region eu-1 --model ctr --public-key key.pub --port 0 --port-file agent.port``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from minutely.errors import ArtifactError, ConfigError, MinutelyError, StorageError
from minutely.fleet.web import error_response, http_exception, json_response, serve_forever
from minutely.registry import Manifest, Registry, check_model_name, parse_version
from minutely.registry.signing import Verifier

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_MAX_TRANSFERS = 4
ORIGIN = "origin"  # the source of a chunk fetched from the origin registry
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COUNTERS = (
    "chunks_from_peers",
    "bytes_from_peers",
    "chunks_from_origin",
    "bytes_from_origin",
    "chunks_resumed",
    "chunks_served",
    "bytes_served",
    "peers_dropped",
    "refusals",
    "fetch_errors",
    "versions_installed",
)


@dataclass(frozen=True)
class AgentSettings:
    """What an agent fetches, from where, and how (validated by :meth:`check`).

    ``origin`` is a registry root (folder or fsspec URL) read with ``origin_options`` (fsspec
    storage options);
    ``local_registry`` the folder the inference workers load from; ``public_key`` a PEM
    Ed25519 key every manifest must be signed with (``None``: signatures are not checked).
    ``tracker`` is the region's tracker URL (``None``: origin only). ``max_bytes_per_s`` caps
    the agent's download rate (``None``: no cap); ``announce_versions`` is how many of the
    newest installed versions of each model it keeps serving to peers.
    """

    origin: str
    cache: Path
    local_registry: Path
    models: tuple[str, ...]
    tracker: str | None = None
    region: str = "default"
    origin_options: Mapping[str, Any] = field(default_factory=dict)
    public_key: Path | None = None
    peer_id: str | None = None
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    max_transfers: int = DEFAULT_MAX_TRANSFERS
    transfer_timeout_s: float = 30.0
    tracker_timeout_s: float = 5.0
    tracker_retry_s: float = 5.0
    heartbeat_s: float = 5.0
    wait_s: float = 0.1
    origin_attempts: int = 3
    stop_grace_s: float = 10.0
    max_bytes_per_s: float | None = None
    announce_versions: int = 16

    def check(self) -> None:
        """:class:`ConfigError` naming the first field out of range."""
        if not self.models:
            raise ConfigError("agent.models", "at least one model name", list(self.models))
        if len(set(self.models)) != len(self.models):
            raise ConfigError("agent.models", "unique model names", list(self.models))
        for model in self.models:
            try:
                check_model_name(model)
            except ArtifactError as exc:
                raise ConfigError(
                    "agent.models",
                    "names of letters, digits, '_', '.' or '-' (not starting with '.', '_' or '-')",
                    model,
                ) from exc
        if not self.origin:
            raise ConfigError("agent.origin", "a registry folder or URL", self.origin)
        if self.tracker is not None and not re.match(r"^https?://[^/\s]+/?$", self.tracker):
            raise ConfigError("agent.tracker", "a URL http://host:port", self.tracker)
        if not self.region or not re.match(r"^[^/\s]+$", self.region):
            raise ConfigError("agent.region", "a name without '/' or spaces", self.region)
        if self.peer_id is not None and not re.match(r"^[^/\s]+$", self.peer_id):
            raise ConfigError("agent.peer_id", "a name without '/' or spaces", self.peer_id)
        for name in (
            "poll_interval_s",
            "transfer_timeout_s",
            "tracker_timeout_s",
            "tracker_retry_s",
            "heartbeat_s",
            "wait_s",
            "stop_grace_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"agent.{name}", "a number of seconds > 0", value)
        for name in ("max_transfers", "origin_attempts", "announce_versions"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"agent.{name}", "an int >= 1", value)
        if self.max_bytes_per_s is not None and not self.max_bytes_per_s > 0:
            raise ConfigError("agent.max_bytes_per_s", "a number > 0 or none", self.max_bytes_per_s)


@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` of a version: ``length`` bytes of ``file`` from ``start``."""

    index: int
    file: str
    start: int
    length: int
    sha256: str


def chunk_layout(manifest: Manifest) -> list[Chunk]:
    """The chunks of a version: global indices over ``files`` in sorted file-name order.

    A manifest without chunk digests (version 1 or 2) has one chunk per non-empty file.
    """
    chunks: list[Chunk] = []
    for name in sorted(manifest.files):
        if not _FILE_RE.match(name):
            raise ArtifactError(
                f"{manifest.model} {manifest.version}: files: expected plain file names, "
                f"got {name!r}"
            )
        entry = manifest.files[name]
        if manifest.chunk_bytes <= 0 or not entry.chunks:
            if entry.bytes > 0:
                chunks.append(Chunk(len(chunks), name, 0, entry.bytes, entry.sha256))
            continue
        for j, digest in enumerate(entry.chunks):
            start = j * manifest.chunk_bytes
            length = min(manifest.chunk_bytes, entry.bytes - start)
            if length <= 0:
                raise ArtifactError(
                    f"{manifest.model} {manifest.version}: files[{name!r}].chunks: expected "
                    f"{-(-entry.bytes // manifest.chunk_bytes)} digests for {entry.bytes} "
                    f"bytes, got {len(entry.chunks)}"
                )
            chunks.append(Chunk(len(chunks), name, start, length, digest))
    return chunks


class TransferError(Exception):
    """A chunk that could not be fetched from one source (the reason in the message);
    ``corrupt`` when bytes came but did not match the manifest."""

    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class _TrackerDownError(Exception):
    pass


_UNSEEN = "<not seen yet>"  # no version has this name


class _StoppedError(Exception):
    """A fetch cut short because the agent is stopping (its chunks stay in the cache)."""


@dataclass
class _Holding:
    """The chunks of one version this agent holds (verified), and where their bytes are."""

    model: str
    version: str
    chunks: list[Chunk]
    held: set[int] = field(default_factory=set)
    installed: bool = False
    cache_dir: Path | None = None

    @property
    def total(self) -> int:
        return len(self.chunks)


@dataclass
class _ModelState:
    counters: Counter[str] = field(default_factory=Counter)
    refused: dict[str, str] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    installed_at: dict[str, float] = field(default_factory=dict)


class Agent:
    """One host's agent (thread-safe): see the module. Serve :attr:`app` over HTTP, then call
    :meth:`start` with the URL peers reach it at; :meth:`fetch` and :meth:`sync_once` also work
    without the background threads."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        origin: Registry | None = None,
        local: Registry | None = None,
    ) -> None:
        settings.check()
        self.settings = settings
        self.peer_id = settings.peer_id or (
            f"{settings.region}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        )
        if origin is None:
            origin = Registry(settings.origin, storage_options=dict(settings.origin_options))
        if local is None:
            verifier = (
                None if settings.public_key is None else Verifier.from_pem_file(settings.public_key)
            )
            local = Registry(settings.local_registry, verifier=verifier)
        self.origin = origin
        self.local = local
        self.cache = Path(settings.cache)
        self.url: str | None = None
        self._lock = threading.Lock()
        self._version_locks: dict[tuple[str, str], threading.Lock] = {}
        self._holdings: dict[tuple[str, str], _Holding] = {}
        self._models = {m: _ModelState() for m in settings.models}
        self._dropped: dict[tuple[str, str], set[str]] = {}
        self._pool = ThreadPoolExecutor(settings.max_transfers, thread_name_prefix="transfer")
        self._running: set[Future[int]] = set()  # transfers submitted and not done
        self._http = httpx.Client(
            timeout=settings.transfer_timeout_s,
            limits=httpx.Limits(max_connections=4 * settings.max_transfers),
        )
        self._tracker = (
            None
            if settings.tracker is None
            else httpx.Client(
                base_url=settings.tracker.rstrip("/"), timeout=settings.tracker_timeout_s
            )
        )
        self._tracker_down_until = 0.0
        self._lease_s = 10.0  # the tracker's lease time, as its answers tell
        self._rate_lock = threading.Lock()
        self._rate_next = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        # The origin's pin as the last sync saw it: mirrored when it changes, so a pin an
        # operator sets on this server (admin endpoint) holds until the origin's pin moves.
        self._origin_pins: dict[str, str | None] = {}
        self._threads: list[threading.Thread] = []
        self.app = self._create_app()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, url: str, *, background: bool = True) -> None:
        """Set the URL peers reach this agent at; with ``background``, start polling the origin
        every ``poll_interval_s`` and announcing the holdings every ``heartbeat_s``."""
        self.url = url.rstrip("/")
        self._register_installed()
        if background:
            for name, target in (("poll", self._poll_loop), ("heartbeat", self._heartbeat_loop)):
                thread = threading.Thread(target=target, name=f"agent-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self) -> None:
        """Stop the background threads, tell the tracker this peer leaves, release clients.

        Transfers in flight get ``stop_grace_s`` in all to end; those still running then are
        left to the pool (:meth:`transfers_running` counts them)."""
        deadline = time.monotonic() + self.settings.stop_grace_s
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)  # no transfer starts from now on
        with self._lock:
            running = list(self._running)
        wait(running, timeout=max(0.0, deadline - time.monotonic()))
        if self._tracker is not None:
            try:
                self._tracker.post("/v1/leave", json={"peer": self.peer_id})
            except httpx.HTTPError as exc:
                logger.info("could not tell the tracker %s leaves: %s", self.peer_id, exc)
            self._tracker.close()
        self._http.close()

    def transfers_running(self) -> int:
        """How many chunk transfers are still in flight (after :meth:`close`: those that did
        not end within ``stop_grace_s``)."""
        with self._lock:
            return len(self._running)

    # --- the poller ---------------------------------------------------------------------------

    def sync_once(self) -> list[tuple[str, str]]:
        """Fetch and install the origin's serving version of every model the local registry
        lacks, and mirror the origin's pin; the (model, version) pairs installed now.

        A refused version is skipped (it was logged and counted when refused); other failures
        are logged, counted as fetch errors and retried on the next call.
        """
        installed: list[tuple[str, str]] = []
        for model in self.settings.models:
            try:
                # the origin's serving_version, its pin read once: what the pin mirrors too
                pinned = self.origin.pinned(model)
                if pinned is not None:
                    version: str | None = pinned
                else:
                    latest = self.origin.latest(model)
                    version = None if latest is None else latest.version
                if version is None:
                    continue
                with self._lock:
                    refused = version in self._models[model].refused
                if refused:
                    continue
                if version not in self.local.versions(model):
                    self.fetch(model, version)
                    installed.append((model, version))
                if self._origin_pins.get(model, _UNSEEN) != pinned:
                    if self.local.pinned(model) != pinned:
                        if pinned is None:
                            self.local.unpin(model)
                        else:
                            self.local.pin(model, pinned)
                    self._origin_pins[model] = pinned
            except ArtifactError:
                continue  # a refusal: logged and counted where it happened
            except (MinutelyError, OSError) as exc:
                self._count(model, "fetch_errors")
                logger.warning("sync of %s failed (retried next poll): %s", model, exc)
        return installed

    def wake(self) -> None:
        """Check the origin now instead of at the next poll (an announcement came)."""
        self._wake.set()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.sync_once()
            except _StoppedError:
                return
            self._wake.wait(self.settings.poll_interval_s)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            with self._lock:
                holdings = list(self._holdings.values())
            for holding in holdings:
                try:
                    self._announce(holding)
                except _TrackerDownError:
                    break

    # --- fetching one version -----------------------------------------------------------------

    def fetch(self, model: str, version: str) -> Manifest:
        """Fetch, verify and install one version (its parent chain first for a delta); the
        installed manifest. :class:`ArtifactError` for a version that must not be installed
        (refused: logged, counted, in the status); :class:`OSError` or
        :class:`StorageError` for one that could not be fetched now."""
        check_model_name(model)
        parse_version(version)
        if model not in self._models:
            raise ConfigError("agent.models", f"one of {list(self.settings.models)}", model)
        with self._lock:
            vlock = self._version_locks.setdefault((model, version), threading.Lock())
        with vlock:
            if version in self.local.versions(model):
                manifest = self.local.manifest(model, version)
                self._register(model, version, manifest, installed=True)
                return manifest
            with self._lock:
                self._models[model].started.setdefault(version, time.time())
            manifest_json, signature = self.origin.manifest_bytes(model, version)
            try:
                manifest = self.local.verify_manifest(model, version, manifest_json, signature)
                chunk_layout(manifest)  # refuses file names that are not plain
            except ArtifactError as exc:
                self._refuse(model, version, str(exc))
                raise
            if manifest.delta_of is not None and manifest.delta_of not in self.local.versions(
                model
            ):
                logger.info(
                    "%s %s is a delta on %s: fetching that first", model, version, manifest.delta_of
                )
                try:
                    self.fetch(model, manifest.delta_of)
                except ArtifactError as exc:
                    reason = f"a delta on {manifest.delta_of}, which was refused: {exc}"
                    self._refuse(model, version, reason)
                    raise ArtifactError(f"{model} {version}: {reason}") from exc
            holding = self._open_cache(model, version, manifest)
            self._transfer(holding)
            assert holding.cache_dir is not None
            files = {name: _part_path(holding.cache_dir, name) for name in manifest.files}
            try:
                installed = self.local.install(model, version, manifest_json, signature, files)
            except ArtifactError as exc:
                self._refuse(model, version, str(exc))
                self._drop_cache(holding)
                raise
            with self._lock:
                holding.installed = True
                state = self._models[model]
                state.installed_at[version] = time.time()
                state.counters["versions_installed"] += 1
            self._drop_cache(holding)
            self._retire_old(model)
            logger.info(
                "installed %s %s (%d chunks, %.1f s)",
                model,
                version,
                holding.total,
                state.installed_at[version] - state.started[version],
            )
            self._try_announce(holding)
            return installed

    def _open_cache(self, model: str, version: str, manifest: Manifest) -> _Holding:
        """The holding of a version being fetched, with the verified chunks already on disk.

        The cache holds one file per file of the version (``<name>.part``, its full size, each
        chunk written at its offset): a resumed fetch re-hashes every chunk of the part files a
        cut-short fetch left and keeps those that match (a new part file holds nothing to
        hash), and the install links the files into the local registry (no copy).
        """
        cache_dir = self.cache / model / version
        chunks = chunk_layout(manifest)
        holding = _Holding(model, version, chunks, cache_dir=cache_dir)
        left: set[str] = set()  # files whose part a cut-short fetch left
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for name, entry in manifest.files.items():
                path = _part_path(cache_dir, name)
                if path.exists():
                    left.add(name)
                with open(path, "ab"):
                    pass  # created if missing, kept if a fetch cut short left it
                os.truncate(path, entry.bytes)
        except OSError as exc:
            raise StorageError(f"{cache_dir}: expected a writable cache folder, got {exc}") from exc
        resumed = 0
        for chunk in chunks:
            if chunk.file not in left:
                continue
            try:
                data = _read_part(cache_dir, chunk)
            except OSError:
                continue
            if hashlib.sha256(data).hexdigest() == chunk.sha256:
                holding.held.add(chunk.index)
                resumed += 1
        with self._lock:
            self._holdings[(model, version)] = holding
            self._models[model].counters["chunks_resumed"] += resumed
        if resumed:
            logger.info(
                "%s %s: resumed %d of %d chunks from %s",
                model,
                version,
                resumed,
                len(chunks),
                cache_dir,
            )
        return holding

    def _transfer(self, holding: _Holding) -> None:
        """Fetch every chunk ``holding`` lacks (see the module for the order and the sources)."""
        model, version = holding.model, holding.version
        key = (model, version)
        with self._lock:
            dropped = self._dropped.setdefault(key, set())
        by_index = {c.index: c for c in holding.chunks}
        missing = set(by_index) - holding.held
        inflight: dict[Future[int], tuple[int, str]] = {}
        origin_failures: Counter[int] = Counter()
        view: dict[str, Any] | None = None
        leases: dict[int, float] = {}  # chunk -> when its origin lease was granted or renewed
        announce = True
        limit = self.settings.max_transfers
        while missing:
            if self._stop.is_set():  # transfers in flight end on their own (see close)
                raise _StoppedError(f"{model} {version}: the agent is stopping")
            if announce and self._tracker_usable():
                announce = not self._try_announce(holding)
            if leases:
                self._renew_leases(holding, leases)
            busy = {i for i, _ in inflight.values()}
            wanted = [i for i in missing if i not in busy]
            if wanted and len(inflight) < limit:
                if self._tracker_usable():
                    with contextlib.suppress(_TrackerDownError):
                        view = self._swarm(model, version)
                plan = self._plan(
                    holding, wanted, limit - len(inflight), view, dropped, inflight, leases
                )
                for index, source in plan:
                    chunk = by_index[index]
                    try:
                        fut = self._pool.submit(self._fetch_chunk, holding, chunk, source, view)
                    except RuntimeError as exc:  # the pool is shut down: close() ran
                        raise _StoppedError(f"{model} {version}: the agent is stopping") from exc
                    with self._lock:
                        self._running.add(fut)
                    fut.add_done_callback(self._transfer_done)
                    inflight[fut] = (index, source)
            if not inflight:
                time.sleep(self.settings.wait_s * (0.5 + random.random()))
                continue
            done, _ = wait(
                list(inflight), timeout=self.settings.wait_s, return_when=FIRST_COMPLETED
            )
            for fut in done:
                index, source = inflight.pop(fut)
                leases.pop(index, None)
                try:
                    fut.result()
                except TransferError as exc:
                    if source == ORIGIN:
                        origin_failures[index] += 1
                        logger.warning(
                            "%s %s chunk %d from the origin: %s", model, version, index, exc
                        )
                        if origin_failures[index] >= self.settings.origin_attempts:
                            self._wait_all(inflight)
                            raise self._origin_failure(holding, by_index[index], exc) from exc
                    else:
                        self._drop_peer(holding, source, index, exc, dropped)
                    continue
                with self._lock:
                    holding.held.add(index)
                missing.discard(index)
                announce = True
        if announce:
            self._try_announce(holding)

    def _plan(
        self,
        holding: _Holding,
        wanted: list[int],
        slots: int,
        view: dict[str, Any] | None,
        dropped: set[str],
        inflight: Mapping[Future[int], tuple[int, str]],
        leases: dict[int, float],
    ) -> list[tuple[int, str]]:
        """Up to ``slots`` (chunk, source) pairs: rarest first, random ties, a holding peer
        when there is one, else the origin under a lease (recorded in ``leases``), or directly
        without a tracker."""
        random.shuffle(wanted)
        if view is None:  # no tracker, or it is down and nothing is known: the origin
            return [(i, ORIGIN) for i in sorted(wanted)[:slots]]
        peers: dict[str, str] = view["peers"]
        holders_of: dict[int, list[str]] = {}
        orphans: list[int] = []  # held only by peers this agent dropped: the origin directly
        for i in wanted:
            listed = view["holders"].get(str(i), [])
            usable = [p for p in listed if p != self.peer_id and p not in dropped and p in peers]
            holders_of[i] = usable
            if listed and not usable:
                orphans.append(i)
        wanted.sort(key=lambda i: len(holders_of[i]))  # stable: random among equals
        load: Counter[str] = Counter(src for _, src in inflight.values())
        plan: list[tuple[int, str]] = []
        unheld: list[int] = []
        for i in wanted:
            if len(plan) >= slots:
                break
            if holders_of[i]:
                peer = min(holders_of[i], key=lambda p: (load[p], random.random()))
                load[peer] += 1
                plan.append((i, peer))
            elif i in orphans:
                plan.append((i, ORIGIN))
            else:
                unheld.append(i)
        if len(plan) < slots and unheld:
            try:
                leased = self._lease(holding, unheld, slots - len(plan))
                now = time.monotonic()
                leases.update((i, now) for i in leased)
            except _TrackerDownError:
                leased = unheld[: slots - len(plan)]  # nobody to coordinate with: the origin
            plan.extend((i, ORIGIN) for i in leased)
        return plan

    def _renew_leases(self, holding: _Holding, leases: dict[int, float]) -> None:
        """Renew the origin leases of chunks still in transfer once a third of the lease time
        has passed, so a slow origin read does not send the chunk to a second fetcher."""
        now = time.monotonic()
        due = [i for i, t in leases.items() if now - t > self._lease_s / 3]
        if not due or not self._tracker_usable():
            return
        try:
            renewed = set(self._lease(holding, due, len(due)))
        except _TrackerDownError:
            return
        for i in due:
            if i in renewed:
                leases[i] = now
            else:
                del leases[i]  # held by someone now, or leased on: this transfer goes on

    def _fetch_chunk(
        self, holding: _Holding, chunk: Chunk, source: str, view: dict[str, Any] | None
    ) -> int:
        """One chunk from ``source`` (a peer id or :data:`ORIGIN`), verified, into the cache;
        its size."""
        model, version = holding.model, holding.version
        if source == ORIGIN:
            try:
                data = self.origin.read_range(model, version, chunk.file, chunk.start, chunk.length)
            except (OSError, MinutelyError) as exc:
                raise TransferError(f"read_range failed: {exc}") from exc
        else:
            assert view is not None
            url = f"{view['peers'][source]}/v1/chunks/{model}/{version}/{chunk.index}"
            try:
                response = self._http.get(url)
            except httpx.HTTPError as exc:
                raise TransferError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
            if response.status_code != 200:
                raise TransferError(
                    f"GET {url}: expected 200, got {response.status_code} {response.text[:200]!r}"
                )
            data = response.content
        if len(data) != chunk.length:
            raise TransferError(
                f"chunk {chunk.index} ({chunk.file} from byte {chunk.start}): expected "
                f"{chunk.length} bytes, got {len(data)}",
                corrupt=True,
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != chunk.sha256:
            raise TransferError(
                f"chunk {chunk.index} ({chunk.file} from byte {chunk.start}): expected sha256 "
                f"{chunk.sha256}, got {digest}",
                corrupt=True,
            )
        self._throttle(len(data))
        assert holding.cache_dir is not None
        _write_part(holding.cache_dir, chunk, data)
        kind = "origin" if source == ORIGIN else "peers"
        with self._lock:
            counters = self._models[model].counters
            counters[f"chunks_from_{kind}"] += 1
            counters[f"bytes_from_{kind}"] += len(data)
        return len(data)

    def _throttle(self, size: int) -> None:
        rate = self.settings.max_bytes_per_s
        if rate is None:
            return
        with self._rate_lock:
            now = time.monotonic()
            start = max(now, self._rate_next)
            self._rate_next = start + size / rate
            delay = self._rate_next - now
        time.sleep(delay)

    def _drop_peer(
        self, holding: _Holding, peer: str, index: int, exc: Exception, dropped: set[str]
    ) -> None:
        if peer in dropped:
            return
        dropped.add(peer)
        self._count(holding.model, "peers_dropped")
        logger.warning(
            "dropped peer %s for %s %s after chunk %d: %s",
            peer,
            holding.model,
            holding.version,
            index,
            exc,
        )

    def _origin_failure(self, holding: _Holding, chunk: Chunk, exc: TransferError) -> Exception:
        """A chunk the origin failed to deliver ``origin_attempts`` times: corrupt data (a
        refusal, :class:`ArtifactError`) or an origin that does not answer (``OSError``)."""
        attempts = self.settings.origin_attempts
        where = f"{holding.model} {holding.version} chunk {chunk.index} ({chunk.file})"
        if not exc.corrupt:
            return OSError(f"{where}: the origin failed {attempts} times, last: {exc}")
        reason = f"{where}: the origin's bytes do not match the manifest {attempts} times: {exc}"
        self._refuse(holding.model, holding.version, reason)
        return ArtifactError(reason)

    def _transfer_done(self, fut: Future[int]) -> None:
        with self._lock:
            self._running.discard(fut)

    @staticmethod
    def _wait_all(inflight: Mapping[Future[int], tuple[int, str]]) -> None:
        wait(list(inflight))

    def _drop_cache(self, holding: _Holding) -> None:
        if holding.cache_dir is not None:
            shutil.rmtree(holding.cache_dir, ignore_errors=True)
        if not holding.installed:
            with self._lock:
                self._holdings.pop((holding.model, holding.version), None)

    def _refuse(self, model: str, version: str, reason: str) -> None:
        with self._lock:
            state = self._models[model]
            state.refused[version] = reason
            state.counters["refusals"] += 1
        logger.error("refused %s %s: %s", model, version, reason)

    def _count(self, model: str, name: str, n: int = 1) -> None:
        with self._lock:
            self._models[model].counters[name] += n

    # --- what this agent serves ---------------------------------------------------------------

    def _register(self, model: str, version: str, manifest: Manifest, *, installed: bool) -> None:
        chunks = chunk_layout(manifest)
        with self._lock:
            if (model, version) not in self._holdings:
                self._holdings[(model, version)] = _Holding(
                    model, version, chunks, held={c.index for c in chunks}, installed=installed
                )

    def _register_installed(self) -> None:
        """Serve the newest ``announce_versions`` installed versions of every model."""
        for model in self.settings.models:
            for version in self.local.versions(model)[-self.settings.announce_versions :]:
                try:
                    self._register(
                        model, version, self.local.manifest(model, version), installed=True
                    )
                except ArtifactError as exc:
                    logger.warning("not serving %s %s: %s", model, version, exc)

    def _retire_old(self, model: str) -> None:
        """Stop serving installed versions of ``model`` older than the newest
        ``announce_versions`` (the tracker is told they are no longer held here) and remove
        them from the local registry (what a kept version needs stays)."""
        try:
            self.local.prune(model, keep=self.settings.announce_versions)
        except (MinutelyError, OSError) as exc:
            logger.warning("pruning the local registry of %s failed: %s", model, exc)
        with self._lock:
            installed = sorted(
                (h for h in self._holdings.values() if h.model == model and h.installed),
                key=lambda h: parse_version(h.version),
            )
            old = installed[: -self.settings.announce_versions]
            for h in old:
                del self._holdings[(model, h.version)]
        for h in old:
            if self.url is not None and self._tracker_usable():
                with contextlib.suppress(_TrackerDownError):
                    self._tracker_call(
                        "POST",
                        "/v1/announce",
                        {
                            "peer": self.peer_id,
                            "url": self.url,
                            "model": model,
                            "version": h.version,
                            "chunks": [],
                        },
                    )

    def read_chunk(self, model: str, version: str, index: int) -> bytes | None:
        """The bytes of a verified chunk this agent holds, or ``None``."""
        with self._lock:
            holding = self._holdings.get((model, version))
            if holding is None or index not in holding.held:
                return None
            chunk = holding.chunks[index]
            installed = holding.installed
        data: bytes | None = None
        if not installed and holding.cache_dir is not None:
            try:
                data = _read_part(holding.cache_dir, chunk)
            except FileNotFoundError:
                data = None  # installed meanwhile: the cache is gone
        if data is None:
            try:
                data = self.local.read_range(model, version, chunk.file, chunk.start, chunk.length)
            except (OSError, MinutelyError) as exc:
                logger.warning("cannot read %s %s chunk %d: %s", model, version, index, exc)
                return None
        with self._lock:
            counters = self._models[model].counters
            counters["chunks_served"] += 1
            counters["bytes_served"] += len(data)
        return data

    # --- the tracker --------------------------------------------------------------------------

    def _tracker_usable(self) -> bool:
        return self._tracker is not None and time.monotonic() >= self._tracker_down_until

    def _tracker_call(self, method: str, path: str, body: object | None = None) -> Any:
        if self._tracker is None or time.monotonic() < self._tracker_down_until:
            raise _TrackerDownError(path)
        try:
            response = self._tracker.request(method, path, json=body)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            if time.monotonic() >= self._tracker_down_until:
                logger.warning(
                    "tracker %s does not answer (%s: %s): the origin directly for %.0f s",
                    self.settings.tracker,
                    type(exc).__name__,
                    exc,
                    self.settings.tracker_retry_s,
                )
            self._tracker_down_until = time.monotonic() + self.settings.tracker_retry_s
            raise _TrackerDownError(path) from exc

    def _announce(self, holding: _Holding) -> None:
        if self.url is None:
            return
        with self._lock:
            held = sorted(holding.held)
        self._tracker_call(
            "POST",
            "/v1/announce",
            {
                "peer": self.peer_id,
                "url": self.url,
                "model": holding.model,
                "version": holding.version,
                "chunks": held,
            },
        )

    def _try_announce(self, holding: _Holding) -> bool:
        try:
            self._announce(holding)
        except _TrackerDownError:
            return False
        return True

    def _swarm(self, model: str, version: str) -> dict[str, Any]:
        doc = self._tracker_call("GET", f"/v1/swarm/{model}/{version}")
        if not isinstance(doc, dict):
            raise _TrackerDownError("swarm")
        return doc

    def _lease(self, holding: _Holding, chunks: list[int], k: int) -> list[int]:
        doc = self._tracker_call(
            "POST",
            "/v1/lease",
            {
                "peer": self.peer_id,
                "model": holding.model,
                "version": holding.version,
                "chunks": chunks,
                "max": k,
            },
        )
        lease_s = doc.get("lease_s")
        if isinstance(lease_s, int | float) and lease_s > 0:
            self._lease_s = float(lease_s)
        wanted = set(chunks)
        return [i for i in doc.get("lease", []) if i in wanted][:k]

    # --- status and HTTP ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/status`` answers (see the module)."""
        models: dict[str, Any] = {}
        with self._lock:
            holdings = list(self._holdings.values())
            snapshot = {
                m: (dict(s.counters), dict(s.refused), dict(s.started), dict(s.installed_at))
                for m, s in self._models.items()
            }
        for model, (counters, refused, started, installed_at) in snapshot.items():
            try:
                installed = self.local.versions(model)
            except OSError:
                installed = []
            models[model] = {
                "installed": installed,
                "in_progress": {
                    h.version: {"held": len(h.held), "total": h.total}
                    for h in holdings
                    if h.model == model and not h.installed
                },
                "fetches": {
                    v: {"started": t, "installed": installed_at.get(v)} for v, t in started.items()
                },
                "refused": [{"version": v, "reason": r} for v, r in refused.items()],
                "counters": {name: counters.get(name, 0) for name in _COUNTERS},
            }
        totals = {name: sum(m["counters"][name] for m in models.values()) for name in _COUNTERS}
        return {
            "peer": self.peer_id,
            "region": self.settings.region,
            "url": self.url,
            "tracker": self.settings.tracker,
            "models": models,
            "counters": totals,
        }

    def _create_app(self) -> Starlette:
        async def status(request: Request) -> Response:
            return json_response(200, self.status())

        def chunk(request: Request) -> Response:
            model = request.path_params["model"]
            version = request.path_params["version"]
            index = request.path_params["index"]
            data = self.read_chunk(model, version, index)
            if data is None:
                return error_response(
                    404,
                    f"chunk {index} of {model} {version}: expected a verified chunk held "
                    "here, got none",
                )
            return Response(data, media_type="application/octet-stream")

        async def sync(request: Request) -> Response:
            self.wake()
            return json_response(202, {"sync": "scheduled"})

        return Starlette(
            routes=[
                Route("/v1/status", status, methods=["GET"]),
                Route("/v1/sync", sync, methods=["POST"]),
                Route("/v1/chunks/{model}/{version}/{index:int}", chunk, methods=["GET"]),
            ],
            exception_handlers={HTTPException: http_exception},
        )


def _part_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.part"


def _write_part(cache_dir: Path, chunk: Chunk, data: bytes) -> None:
    """Write a verified chunk at its offset of its file's part (no fsync: a restart re-hashes
    every chunk, so a write lost in a crash is fetched again)."""
    path = _part_path(cache_dir, chunk.file)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.pwrite(fd, data, chunk.start)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TransferError(f"{path}: expected to write the chunk to the cache, got {exc}") from exc
    if written != len(data):
        raise TransferError(
            f"{path}: expected to write {len(data)} bytes at {chunk.start}, wrote {written}"
        )


def _read_part(cache_dir: Path, chunk: Chunk) -> bytes:
    fd = os.open(_part_path(cache_dir, chunk.file), os.O_RDONLY)
    try:
        return os.pread(fd, chunk.length, chunk.start)
    finally:
        os.close(fd)


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` pairs as storage options: dotted keys nest, values are TOML literals
    (``true``, ``3``) or else strings.

    >>> parse_options(["endpoint_url=http://127.0.0.1:9000", "client_kwargs.region_name=eu",
    ...                "anon=false"])
    {'endpoint_url': 'http://127.0.0.1:9000', 'client_kwargs': {'region_name': 'eu'}, 'anon': False}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(keys):
            raise ConfigError("--origin-option", "key=value", item)
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError("--origin-option", f"{k} as a table (it has a value)", item)
            node = child
        node[keys[-1]] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minutely.fleet.agent",
        description="Fetch new model versions from peers and the origin into a local registry.",
    )
    p.add_argument("--origin", required=True, help="origin registry: a folder or s3://bucket/...")
    p.add_argument(
        "--origin-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option of the origin (repeatable; dotted keys nest)",
    )
    p.add_argument("--cache", required=True, type=Path, help="chunk cache folder")
    p.add_argument("--local-registry", required=True, type=Path, help="registry folder to fill")
    p.add_argument("--tracker", help="the region's tracker URL (none: the origin only)")
    p.add_argument("--region", default="default")
    p.add_argument("--model", required=True, action="append", help="model to fetch (repeatable)")
    p.add_argument("--public-key", type=Path, help="PEM Ed25519 key manifests must be signed by")
    p.add_argument("--peer-id", help="this agent's name at the tracker (default: a fresh one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8710, help="0 picks a free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--advertise-url", help="URL peers reach this agent at (default from --host)")
    p.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S)
    p.add_argument("--max-transfers", type=int, default=DEFAULT_MAX_TRANSFERS)
    p.add_argument("--max-bytes-per-s", type=float, help="download rate cap (default: none)")
    p.add_argument(
        "--stop-grace",
        type=float,
        default=AgentSettings.stop_grace_s,
        help="seconds transfers in flight get to end at a stop (default: %(default)s)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; the exit status (0 after a clean stop, 2 for a bad
    configuration)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        settings = AgentSettings(
            origin=args.origin,
            origin_options=parse_options(args.origin_option),
            cache=args.cache,
            local_registry=args.local_registry,
            tracker=args.tracker,
            region=args.region,
            models=tuple(args.model),
            public_key=args.public_key,
            peer_id=args.peer_id,
            poll_interval_s=args.poll_interval,
            max_transfers=args.max_transfers,
            max_bytes_per_s=args.max_bytes_per_s,
            stop_grace_s=args.stop_grace,
        )
        agent = Agent(settings)
    except MinutelyError as exc:
        print(f"minutely.fleet.agent: {exc}", file=sys.stderr)
        return 2

    def started(port: int) -> None:
        agent.start(args.advertise_url or f"http://{args.host}:{port}")

    try:
        code = serve_forever(
            agent.app,
            host=args.host,
            port=args.port,
            port_file=args.port_file,
            log_level=args.log_level,
            on_started=started,
        )
    finally:
        agent.close()
    left = agent.transfers_running()
    if left:
        # The pool's threads would hold the interpreter's exit until their reads end.
        logger.warning(
            "%d transfers still running %.1f s after the stop: exiting without them (the next "
            "start fetches those chunks again)",
            left,
            settings.stop_grace_s,
        )
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
