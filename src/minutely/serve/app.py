"""The inference HTTP application (ASGI, Starlette).

Endpoints; every answer is JSON but the metrics:

``POST /v1/models/{name}:predict``
    body ``{"instances": [{feature: value, ...}, ...]}``, ``{"columns": {feature: [value, ...]}}``
    or an Arrow IPC stream (content type ``application/vnd.apache.arrow.stream``), see
    :mod:`minutely.serve.codec`; answers ``{"model", "version", "predictions": [float, ...]}``,
    one probability per instance, all from the one version that was live when the request
    arrived. Concurrent requests may share a forward pass (:mod:`minutely.serve.batcher`).
``GET /v1/models/{name}``
    ``{"model", "version", "loaded_ms", "swaps", "refused": [{"version", "reason"}],
    "refused_total", "poll_errors", "versions"}`` (``version`` and ``loaded_ms`` are null before
    the first load). ``versions`` lists the registry's versions, oldest first, each
    ``{"version", "live"}``, the live one with ``"why"``: ``"pinned"`` (the registry's pointer
    names it: a rollback or an admin pin), ``"latest"`` (the newest version this server has not
    refused) or ``"stale"`` (a newer one exists and is not loaded yet); a refused one also has
    ``"refused"`` (the reason). ``versions`` is null, and ``"registry_error"`` says why, when
    the registry cannot be read.
``GET /healthz``
    readiness: 200 ``{"status": "ok", "models": {name: version}}`` once every model has a
    version, else 503 with ``"status": "loading"``.
``GET /metrics``
    Prometheus text exposition (:mod:`minutely.serve.metrics`).
``POST /v1/admin/models/{name}/pin`` ``{"version": v}``, ``.../unpin``, ``.../rollback``
    set or clear the registry's pointer (:meth:`~minutely.registry.Registry.pin`,
    :meth:`~minutely.registry.Registry.unpin`); ``rollback`` pins the version that was live
    before the live one. Every worker (and every server on the registry) follows the pointer at
    its next poll. Answers ``{"model", "pinned", "live"}``. They need
    ``Authorization: Bearer <admin token>``: 403 when the server has no admin token, 401 for a
    missing or wrong one (and nothing changes).

Errors answer ``{"error": message}``: 400 a body that is not JSON, has neither ``instances`` nor
``columns``, or whose values do not fit the schema (the message names the instance and the
feature); 401 a missing or wrong token; 403 admin endpoints without an admin token; 404 an
unknown model, version or path; 409 a rollback with nowhere to go back to, or a pin of a version
this server refused; 413 too many instances or too large a body; 503 no version loaded yet; 500
a failure of the model itself.

>>> from minutely.schema import default_schema
>>> app = create_app(Path("registry"), ["ctr"], default_schema(), poll_interval_s=1.0)
>>> sorted(app.state.serving.holders)
['ctr']
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from minutely.clock import Clock, WallClock
from minutely.data.tensors import FeatureColumns
from minutely.errors import ArtifactError, ConfigError
from minutely.registry import Manifest, Registry, Verifier, check_model_name
from minutely.schema import Schema
from minutely.serve.batcher import Batcher, BatchSettings, PredictionCountError
from minutely.serve.codec import BodyError, decode_body
from minutely.serve.holder import LoadedModel, ModelHolder, Predictor, PredictorFactory
from minutely.serve.metrics import CONTENT_TYPE, UNKNOWN_MODEL, ServeMetrics
from minutely.serve.poller import RegistryPoller, freeze_heap

logger = logging.getLogger(__name__)

DEFAULT_MAX_INSTANCES = 10_000
DEFAULT_MAX_BODY_BYTES = 64 << 20
_MAX_ADMIN_BODY_BYTES = 64 << 10


def torch_factory(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Predictor:
    """The default :data:`PredictorFactory`: the artifact's model built by :mod:`minutely.model`.

    The model code is imported on first use, so an application given another factory never
    loads it.
    """
    from minutely.serve.torch_predictor import TorchPredictor

    return TorchPredictor.from_artifact(manifest, tensors)


class _ModelNameConvertor(StringConvertor):
    """A path segment without ``:``, so ``GET /v1/models/ctr:predict`` is a 405, not a name."""

    regex = "[^/:]+"


register_url_convertor("model_name", _ModelNameConvertor())


class _PinRequest(msgspec.Struct, forbid_unknown_fields=True):
    version: str


_PIN_DECODER = msgspec.json.Decoder(_PinRequest)
_ENCODER = msgspec.json.Encoder()


def _json(status: int, doc: object, headers: dict[str, str] | None = None) -> Response:
    return Response(
        _ENCODER.encode(doc), status_code=status, media_type="application/json", headers=headers
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"error": message}, headers)


@dataclass(frozen=True)
class ServingState:
    """What the application serves; reachable as ``app.state.serving`` (tests, operators)."""

    holders: dict[str, ModelHolder]
    poller: RegistryPoller
    schema: Schema
    max_instances: int
    max_body_bytes: int
    registry: Registry
    metrics: ServeMetrics
    batch: BatchSettings
    admin_token: str | None = field(default=None, repr=False)
    predict_token: str | None = field(default=None, repr=False)


def create_app(
    registry_root: Path | str,
    models: Sequence[str],
    schema: Schema,
    *,
    poll_interval_s: float,
    factory: PredictorFactory = torch_factory,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock: Clock | None = None,
    batch: BatchSettings | None = None,
    admin_token: str | None = None,
    predict_token: str | None = None,
    verifier: Verifier | None = None,
    freeze_gc: bool = False,
) -> Starlette:
    """The inference application for ``models`` of the registry at ``registry_root``.

    Versions whose schema fingerprint differs from ``schema``'s are refused, and so are
    unsigned or wrongly signed ones when a ``verifier`` is given. The app's lifespan makes a
    first registry check before it accepts requests (what exists is served from the first
    request), then polls every ``poll_interval_s`` on a background thread. ``batch`` sets how
    concurrent requests share forward passes (default: not at all). ``admin_token`` enables
    the admin endpoints, ``predict_token`` makes predict require it. ``freeze_gc`` moves the
    heap into the collector's permanent generation after each load (a server process wants
    it; a test process that creates many apps does not).
    """
    names = list(models)
    if not names:
        raise ConfigError("serve.models", "at least one model name", names)
    if len(set(names)) != len(names):
        raise ConfigError("serve.models", "unique model names", names)
    for name in names:
        try:
            check_model_name(name)
        except ArtifactError as exc:
            raise ConfigError("serve.models", str(exc), name) from exc
    if not poll_interval_s > 0:
        raise ConfigError("serve.poll_interval_s", "a float > 0", poll_interval_s)
    if max_instances < 1:
        raise ConfigError("serve.max_instances", "an int >= 1", max_instances)
    if max_body_bytes < 1:
        raise ConfigError("serve.max_body_bytes", "an int >= 1", max_body_bytes)
    for what, token in (("serve.admin_token", admin_token), ("serve.predict_token", predict_token)):
        if token is not None and not token.strip():
            raise ConfigError(what, "a non-empty token", token)
    clock = clock if clock is not None else WallClock()
    holders = {name: ModelHolder(name) for name in names}
    metrics = ServeMetrics(names)
    registry = Registry(registry_root, verifier=verifier)
    poller = RegistryPoller(
        registry,
        holders,
        expected_fingerprint=schema.fingerprint(),
        factory=factory,
        clock=clock,
        interval_s=poll_interval_s,
        metrics=metrics,
        freeze=freeze_gc,
    )
    state = ServingState(
        holders,
        poller,
        schema,
        max_instances,
        max_body_bytes,
        registry,
        metrics,
        batch if batch is not None else BatchSettings(),
        admin_token,
        predict_token,
    )
    endpoints = _Endpoints(state)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(poller.poll_once)
        if freeze_gc:
            freeze_heap()
        executor = endpoints.start()
        poller.start()
        try:
            yield
        finally:
            await run_in_threadpool(poller.stop)
            if executor is not None:
                executor.shutdown(wait=True)

    model = "/v1/models/{name:model_name}"
    admin = "/v1/admin/models/{name:model_name}"
    app = Starlette(
        routes=[
            Route(f"{model}:predict", endpoints.predict, methods=["POST"]),
            Route(model, endpoints.metadata, methods=["GET"]),
            Route("/healthz", endpoints.healthz, methods=["GET"]),
            Route("/metrics", endpoints.metrics, methods=["GET"]),
            Route(f"{admin}/pin", endpoints.admin_pin, methods=["POST"]),
            Route(f"{admin}/unpin", endpoints.admin_unpin, methods=["POST"]),
            Route(f"{admin}/rollback", endpoints.admin_rollback, methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_exception},
        lifespan=lifespan,
    )
    app.state.serving = state
    return app


def _http_exception(request: Request, exc: Exception) -> Response:
    """Routing errors (404 no such path, 405 wrong method) as JSON like every other error."""
    if isinstance(exc, HTTPException):
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    raise exc  # pragma: no cover - registered for HTTPException only


def _score(predictor: Predictor, columns: FeatureColumns) -> list[float]:
    """One request's predictions, unbatched (on a thread of the pool)."""
    probs = np.asarray(predictor.predict_columns(columns), dtype=np.float64)
    if probs.shape != (len(columns),):
        raise PredictionCountError(f"expected {len(columns)} predictions, got {probs.size}")
    out: list[float] = probs.tolist()
    return out


class _Endpoints:
    def __init__(self, state: ServingState) -> None:
        self._state = state
        self._known = sorted(state.holders)
        self._batchers: dict[str, Batcher] = {}
        self._admin_token = _token_bytes(state.admin_token)
        self._predict_token = _token_bytes(state.predict_token)

    def start(self) -> ThreadPoolExecutor | None:
        """Create the batchers (on the serving event loop); the executor they run models on."""
        settings = self._state.batch
        if not settings.enabled:
            return None
        executor = ThreadPoolExecutor(
            max_workers=len(self._state.holders), thread_name_prefix="minutely-batch"
        )
        metrics = self._state.metrics
        for name in self._state.holders:
            rows, requests = metrics.batch_rows.labels(name), metrics.batch_requests.labels(name)

            def observe(
                n_rows: int, n_requests: int, rows: Any = rows, req: Any = requests
            ) -> None:
                rows.observe(n_rows)
                req.observe(n_requests)

            self._batchers[name] = Batcher(settings, executor, observe)
        return executor

    def _holder(self, request: Request) -> ModelHolder | Response:
        name = request.path_params["name"]
        holder = self._state.holders.get(name)
        if holder is None:
            return _error(404, f"unknown model {name!r}: expected one of {self._known}")
        return holder

    # -- predict ------------------------------------------------------------------------------

    async def predict(self, request: Request) -> Response:
        start = time.perf_counter()
        holder = self._holder(request)
        name = UNKNOWN_MODEL if isinstance(holder, Response) else holder.name
        if isinstance(holder, Response):
            response = holder
        elif (denied := _check_token(request, self._predict_token, "predict")) is not None:
            response = denied
        else:
            response = await self._predict(request, holder)
        metrics = self._state.metrics
        metrics.requests.labels(name, str(response.status_code)).inc()
        if name != UNKNOWN_MODEL:
            metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    async def _predict(self, request: Request, holder: ModelHolder) -> Response:
        loaded = holder.current  # this request runs on this version, whatever swaps meanwhile
        if loaded is None:
            return _error(503, f"model {holder.name!r}: no version loaded yet")
        state = self._state
        body = await _read_body(request, state.max_body_bytes)
        if body is None:
            return _error(413, f"request body: expected at most {state.max_body_bytes} bytes")
        try:
            columns = decode_body(
                body,
                request.headers.get("content-type"),
                state.schema,
                max_instances=state.max_instances,
            )
        except BodyError as exc:
            return _error(exc.status, str(exc))
        predictions: list[float] = []
        if len(columns):
            try:
                predictions = await self._run(holder.name, loaded, columns)
            except PredictionCountError as exc:
                return _error(500, f"model {holder.name!r} {loaded.version}: {exc}")
            except Exception as exc:
                logger.exception("model %s %s: predict failed", holder.name, loaded.version)
                return _error(500, f"model {holder.name!r} {loaded.version}: predict failed: {exc}")
        return _json(
            200, {"model": holder.name, "version": loaded.version, "predictions": predictions}
        )

    async def _run(self, name: str, loaded: LoadedModel, columns: FeatureColumns) -> list[float]:
        batcher = self._batchers.get(name)
        if batcher is not None:
            return await batcher.predict(loaded, columns)
        metrics = self._state.metrics
        metrics.batch_rows.labels(name).observe(len(columns))
        metrics.batch_requests.labels(name).observe(1)
        return await run_in_threadpool(_score, loaded.predictor, columns)

    # -- metadata, health, metrics ----------------------------------------------------------------

    async def metadata(self, request: Request) -> Response:
        holder = self._holder(request)
        if isinstance(holder, Response):
            return holder
        loaded = holder.current
        doc: dict[str, Any] = {
            "model": holder.name,
            "version": None if loaded is None else loaded.version,
            "loaded_ms": None if loaded is None else loaded.loaded_ms,
            "swaps": holder.swaps,
            "refused": [{"version": r.version, "reason": r.reason} for r in holder.refusals],
            "refused_total": holder.refused_total,
            "poll_errors": holder.poll_errors,
        }
        doc.update(await run_in_threadpool(self._versions, holder, loaded))
        return _json(200, doc)

    def _versions(self, holder: ModelHolder, loaded: LoadedModel | None) -> dict[str, Any]:
        """The registry's versions of ``holder``'s model, and which one is live and why."""
        registry = self._state.registry
        try:
            versions = registry.versions(holder.name)
            pinned = registry.pinned(holder.name)
        except (ArtifactError, OSError) as exc:
            return {"versions": None, "registry_error": str(exc)}
        live = None if loaded is None else loaded.version
        servable = [v for v in versions if not holder.is_refused(v)]
        out: list[dict[str, Any]] = []
        for version in versions:
            entry: dict[str, Any] = {"version": version, "live": version == live}
            if version == live:
                if version == pinned:
                    entry["why"] = "pinned"
                elif servable and servable[-1] == version:
                    entry["why"] = "latest"
                else:
                    entry["why"] = "stale"
            reason = holder.refusal_reason(version)
            if reason is not None:
                entry["refused"] = reason
            out.append(entry)
        return {"versions": out}

    async def healthz(self, request: Request) -> Response:
        versions: dict[str, str | None] = {}
        for name, holder in self._state.holders.items():
            loaded = holder.current
            versions[name] = None if loaded is None else loaded.version
        ready = all(v is not None for v in versions.values())
        return _json(
            200 if ready else 503, {"status": "ok" if ready else "loading", "models": versions}
        )

    async def metrics(self, request: Request) -> Response:
        metrics = self._state.metrics
        now_ms = self._state.poller.now_ms()
        for name in self._state.holders:
            metrics.refresh_age(name, now_ms)
        text = await run_in_threadpool(metrics.scrape)
        return Response(text, media_type=CONTENT_TYPE)

    # -- admin ----------------------------------------------------------------------------------

    def _admin(self, request: Request) -> ModelHolder | Response:
        if self._admin_token is None:
            return _error(403, "admin disabled: the server was started without an admin token")
        denied = _check_token(request, self._admin_token, "admin")
        if denied is not None:
            return denied
        return self._holder(request)

    async def admin_pin(self, request: Request) -> Response:
        holder = self._admin(request)
        if isinstance(holder, Response):
            return holder
        body = await _read_body(request, _MAX_ADMIN_BODY_BYTES)
        if body is None:
            return _error(413, f"request body: expected at most {_MAX_ADMIN_BODY_BYTES} bytes")
        try:
            version = _PIN_DECODER.decode(body).version
        except msgspec.ValidationError as exc:
            return _error(400, f'request body: expected {{"version": <version>}}: {exc}')
        except msgspec.DecodeError as exc:
            return _error(400, f"request body: expected JSON, got malformed data ({exc})")
        return await self._pin(holder, version, "pin")

    async def admin_unpin(self, request: Request) -> Response:
        holder = self._admin(request)
        if isinstance(holder, Response):
            return holder
        try:
            await run_in_threadpool(self._state.registry.unpin, holder.name)
        except (ArtifactError, OSError) as exc:
            return _error(500, f"model {holder.name!r}: unpin failed: {exc}")
        logger.info("admin: unpinned %s", holder.name)
        return self._pointer_answer(holder, None)

    async def admin_rollback(self, request: Request) -> Response:
        holder = self._admin(request)
        if isinstance(holder, Response):
            return holder
        previous = holder.previous_version()
        if previous is None:
            live = holder.current
            return _error(
                409,
                f"model {holder.name!r}: expected an earlier live version to roll back to, got "
                f"none (live: {None if live is None else live.version}, "
                f"history: {list(holder.history)})",
            )
        return await self._pin(holder, previous, "rollback")

    async def _pin(self, holder: ModelHolder, version: str, action: str) -> Response:
        registry = self._state.registry
        try:
            versions = await run_in_threadpool(registry.versions, holder.name)
        except (ArtifactError, OSError) as exc:
            return _error(500, f"model {holder.name!r}: cannot read the registry: {exc}")
        if version not in versions:
            shown = versions if len(versions) <= 5 else [versions[0], "...", *versions[-3:]]
            return _error(
                404,
                f"model {holder.name!r}: expected a version of the registry, got {version!r} "
                f"(versions: {shown})",
            )
        reason = holder.refusal_reason(version)
        if reason is not None:
            return _error(
                409, f"model {holder.name!r}: {version} was refused by this server: {reason}"
            )
        try:
            await run_in_threadpool(registry.pin, holder.name, version)
        except (ArtifactError, OSError) as exc:
            return _error(500, f"model {holder.name!r}: {action} to {version} failed: {exc}")
        live = holder.current
        logger.info(
            "admin: %s %s: pinned %s (live: %s)",
            action,
            holder.name,
            version,
            None if live is None else live.version,
        )
        return self._pointer_answer(holder, version)

    def _pointer_answer(self, holder: ModelHolder, pinned: str | None) -> Response:
        live = holder.current
        return _json(
            200,
            {
                "model": holder.name,
                "pinned": pinned,
                "live": None if live is None else live.version,
            },
        )


def _token_bytes(token: str | None) -> bytes | None:
    return None if token is None else token.strip().encode()


def _check_token(request: Request, token: bytes | None, what: str) -> Response | None:
    """``None`` when ``token`` is not required or the request carries it; a 401 otherwise."""
    if token is None:
        return None
    challenge = {"WWW-Authenticate": "Bearer"}
    header = request.headers.get("authorization")
    if header is None:
        return _error(
            401, f"{what}: expected an 'Authorization: Bearer <token>' header, got none", challenge
        )
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return _error(
            401,
            f"{what}: expected an 'Authorization: Bearer <token>' header, got another",
            challenge,
        )
    if not hmac.compare_digest(given.strip().encode(), token):
        return _error(401, f"{what}: wrong bearer token", challenge)
    return None


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or ``None`` as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
