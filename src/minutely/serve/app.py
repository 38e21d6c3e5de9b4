"""The inference HTTP application (ASGI, Starlette).

Endpoints, all JSON:

``POST /v1/models/{name}:predict``
    body ``{"instances": [{feature: value, ...}, ...]}``; answers
    ``{"model", "version", "predictions": [float, ...]}``, one probability per instance, all
    from the one version that was live when the request arrived.
``GET /v1/models/{name}``
    ``{"model", "version", "loaded_ms", "swaps", "refused": [{"version", "reason"}],
    "refused_total", "poll_errors"}`` (``version`` and ``loaded_ms`` are null before the first
    load).
``GET /healthz``
    readiness: 200 ``{"status": "ok", "models": {name: version}}`` once every model has a
    version, else 503 with ``"status": "loading"``.

Errors answer ``{"error": message}``: 400 a body that is not JSON, lacks ``instances``, whose
``instances`` is not a list of objects, or whose instance does not fit the schema (the message
names the instance and the feature); 404 an unknown model or path; 413 too many instances or
too large a body; 503 no version loaded yet; 500 a failure of the model itself.

>>> from minutely.schema import default_schema
>>> app = create_app(Path("registry"), ["ctr"], default_schema(), poll_interval_s=1.0)
>>> sorted(app.state.serving.holders)
['ctr']
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from minutely.clock import Clock, WallClock
from minutely.errors import ArtifactError, ConfigError, SchemaError
from minutely.registry import Manifest, Registry, check_model_name
from minutely.schema import Schema
from minutely.serve.holder import ModelHolder, Predictor, PredictorFactory
from minutely.serve.poller import RegistryPoller

logger = logging.getLogger(__name__)

DEFAULT_MAX_INSTANCES = 10_000
DEFAULT_MAX_BODY_BYTES = 64 << 20


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


class _PredictRequest(msgspec.Struct):
    instances: list[dict[str, Any]]


_DECODER = msgspec.json.Decoder(_PredictRequest)
_ENCODER = msgspec.json.Encoder()


def _json(status: int, doc: object) -> Response:
    return Response(_ENCODER.encode(doc), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


@dataclass(frozen=True)
class ServingState:
    """What the application serves; reachable as ``app.state.serving`` (tests, operators)."""

    holders: dict[str, ModelHolder]
    poller: RegistryPoller
    schema: Schema
    max_instances: int
    max_body_bytes: int


def create_app(
    registry_root: Path,
    models: Sequence[str],
    schema: Schema,
    *,
    poll_interval_s: float,
    factory: PredictorFactory = torch_factory,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock: Clock | None = None,
) -> Starlette:
    """The inference application for ``models`` of the registry at ``registry_root``.

    Versions whose schema fingerprint differs from ``schema``'s are refused. The app's lifespan
    makes a first registry check before it accepts requests (what exists is served from the
    first request), then polls every ``poll_interval_s`` on a background thread.
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
    holders = {name: ModelHolder(name) for name in names}
    poller = RegistryPoller(
        Registry(registry_root),
        holders,
        expected_fingerprint=schema.fingerprint(),
        factory=factory,
        clock=clock if clock is not None else WallClock(),
        interval_s=poll_interval_s,
    )
    state = ServingState(holders, poller, schema, max_instances, max_body_bytes)
    endpoints = _Endpoints(state)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(poller.poll_once)
        poller.start()
        try:
            yield
        finally:
            await run_in_threadpool(poller.stop)

    app = Starlette(
        routes=[
            Route("/v1/models/{name:model_name}:predict", endpoints.predict, methods=["POST"]),
            Route("/v1/models/{name:model_name}", endpoints.metadata, methods=["GET"]),
            Route("/healthz", endpoints.healthz, methods=["GET"]),
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


class _Endpoints:
    def __init__(self, state: ServingState) -> None:
        self._state = state
        self._known = sorted(state.holders)

    def _holder(self, request: Request) -> ModelHolder | Response:
        name = request.path_params["name"]
        holder = self._state.holders.get(name)
        if holder is None:
            return _error(404, f"unknown model {name!r}: expected one of {self._known}")
        return holder

    async def predict(self, request: Request) -> Response:
        holder = self._holder(request)
        if isinstance(holder, Response):
            return holder
        loaded = holder.current  # this request runs on this version, whatever swaps meanwhile
        if loaded is None:
            return _error(503, f"model {holder.name!r}: no version loaded yet")
        body = await _read_body(request, self._state.max_body_bytes)
        if body is None:
            return _error(413, f"request body: expected at most {self._state.max_body_bytes} bytes")
        try:
            instances = _DECODER.decode(body).instances
        except msgspec.ValidationError as exc:
            return _error(400, f"request body: {exc}")
        except msgspec.DecodeError as exc:
            return _error(400, f"request body: expected JSON, got malformed data ({exc})")
        n = len(instances)
        if n > self._state.max_instances:
            return _error(
                413,
                f"'instances': expected at most {self._state.max_instances} per request, got {n}",
            )
        predictions: list[float] = []
        if n:
            try:
                predictions = await run_in_threadpool(loaded.predictor.predict, instances)
            except SchemaError as exc:
                return _error(400, str(exc))
            except Exception as exc:
                logger.exception("model %s %s: predict failed", holder.name, loaded.version)
                return _error(500, f"model {holder.name!r} {loaded.version}: predict failed: {exc}")
            if len(predictions) != n:
                return _error(
                    500,
                    f"model {holder.name!r} {loaded.version}: expected {n} predictions, "
                    f"got {len(predictions)}",
                )
        return _json(
            200, {"model": holder.name, "version": loaded.version, "predictions": predictions}
        )

    async def metadata(self, request: Request) -> Response:
        holder = self._holder(request)
        if isinstance(holder, Response):
            return holder
        loaded = holder.current
        return _json(
            200,
            {
                "model": holder.name,
                "version": None if loaded is None else loaded.version,
                "loaded_ms": None if loaded is None else loaded.loaded_ms,
                "swaps": holder.swaps,
                "refused": [{"version": r.version, "reason": r.reason} for r in holder.refusals],
                "refused_total": holder.refused_total,
                "poll_errors": holder.poll_errors,
            },
        )

    async def healthz(self, request: Request) -> Response:
        versions: dict[str, str | None] = {}
        for name, holder in self._state.holders.items():
            loaded = holder.current
            versions[name] = None if loaded is None else loaded.version
        ready = all(v is not None for v in versions.values())
        return _json(
            200 if ready else 503, {"status": "ok" if ready else "loading", "models": versions}
        )


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
