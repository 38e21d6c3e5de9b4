"""The fleet's HTTP plumbing: JSON answers, request bodies, and uvicorn in a process or a thread.

:func:`serve_forever` runs an application as the main program (``--port 0`` picks a free port,
``--port-file`` receives it once connections are accepted, SIGTERM/SIGINT stop it cleanly);
:class:`BackgroundServer` runs one on a thread of the calling process (what embeds a tracker or
an agent in another program, and what the tests start).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from minutely.fsutil import replace_atomically

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ENCODER = msgspec.json.Encoder()
MAX_BODY_BYTES = 1 << 20  # announce/lease bodies are lists of chunk indices


class BadRequestError(Exception):
    """A request body that does not fit what the endpoint expects (answered with a 400)."""


def json_response(status: int, doc: object) -> Response:
    return Response(_ENCODER.encode(doc), status_code=status, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


async def read_json(request: Request, kind: type[T], expected: str) -> T:
    """The body decoded as ``kind``; :class:`BadRequestError` naming ``expected`` otherwise."""
    where = f"{request.method} {request.url.path}"
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise BadRequestError(f"{where}: expected a body of at most {MAX_BODY_BYTES} bytes")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"{where}: expected {expected}, got {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"{where}: expected a JSON body {expected}, got {exc}") from exc


def http_exception(request: Request, exc: Exception) -> Response:
    """Routing errors (404 no such path, 405 wrong method) as JSON like every other error."""
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    raise exc  # pragma: no cover - registered for HTTPException only


def bad_request(request: Request, exc: Exception) -> Response:
    return error_response(400, str(exc))


def uvicorn_config(app: Starlette, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        access_log=False,
        log_config=None,  # keep the logging the program configured
        timeout_graceful_shutdown=5,
    )


class PortFileServer(uvicorn.Server):
    """A uvicorn server that records its bound port once it accepts connections."""

    def __init__(
        self,
        config: uvicorn.Config,
        port_file: Path | None,
        on_started: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._port_file = port_file
        self._on_started = on_started
        self.port: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            port = int(self.servers[0].sockets[0].getsockname()[1])
            if self._on_started is not None:
                self._on_started(port)
            self.port = port
            if self._port_file is not None:
                replace_atomically(self._port_file, f"{self.port}\n".encode())
                logger.info("listening on port %d (written to %s)", self.port, self._port_file)


def serve_forever(
    app: Starlette,
    *,
    host: str,
    port: int,
    port_file: Path | None,
    log_level: str,
    on_started: Callable[[int], None] | None = None,
) -> int:
    """Serve ``app`` until SIGTERM/SIGINT; 0 after a clean stop, 1 when it never started.

    ``on_started`` receives the bound port once connections are accepted, before the port file
    is written.
    """
    server = PortFileServer(uvicorn_config(app, host, port, log_level), port_file, on_started)

    # uvicorn re-raises a signal it handled through the handler in place before it started;
    # this one makes that a no-op (a clean exit) and also stops a server still starting.
    def _stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.run()
    return 0 if server.started else 1


class BackgroundServer:
    """``app`` served by uvicorn on a thread of this process, on ``host`` and a free port.

    >>> from starlette.applications import Starlette
    >>> with BackgroundServer(Starlette()) as srv:
    ...     srv.url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._server = PortFileServer(uvicorn_config(app, host, port, "warning"), None)
        self._thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)
        self._exit: str | None = None

    def _run(self) -> None:
        try:
            self._server.run()
        except SystemExit as exc:  # uvicorn's answer to a port it cannot bind
            self._exit = f"an exit with status {exc.code}"

    @property
    def url(self) -> str:
        if self._server.port is None:
            raise RuntimeError("BackgroundServer.url: expected a started server, got none")
        return f"http://{self._host}:{self._server.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start serving; returns once connections are accepted (RuntimeError on failure)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while self._server.port is None:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                got = self._exit or ("an exit" if not self._thread.is_alive() else "nothing")
                raise RuntimeError(
                    f"BackgroundServer: expected uvicorn to listen on {self._host} within "
                    f"{timeout_s} s, got {got} (its log says why)"
                )
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, and join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
