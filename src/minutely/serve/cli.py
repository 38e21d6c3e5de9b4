"""``python -m minutely.serve``: the inference server on uvicorn.

::

    python -m minutely.serve --registry runs/x/registry --model ctr --model cvr \\
        --host 127.0.0.1 --port 0 --port-file runs/x/server.port --poll-interval 0.2

With ``--port 0`` the system picks a free port; ``--port-file`` receives the bound port (one
line, replaced atomically) once the server accepts connections, which is after its first
registry check, so a parent process that waits for the file can send requests at once.
SIGTERM or SIGINT stops the server gracefully (requests in flight finish) with exit status 0.
Each request runs torch on one thread by default (``--torch-threads``): requests run
concurrently on a thread pool, and per-operator threads on top of that oversubscribe the cores.

The schema: the server checks every version against one feature schema fixed at start, the
simulator's :func:`~minutely.schema.default_schema` unless ``--schema FILE`` gives another
(a JSON document of :meth:`~minutely.schema.Schema.to_dict`). It is fixed rather than taken from
the first version found because the schema is the contract with the clients that build the
requests: a trainer publishing a different one must not change what the server accepts, so such
versions are refused until the server is redeployed with the new schema.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import msgspec
import torch
import uvicorn

from minutely.errors import MinutelyError, SchemaError
from minutely.fsutil import replace_atomically
from minutely.schema import Schema, default_schema
from minutely.serve.app import DEFAULT_MAX_INSTANCES, create_app

logger = logging.getLogger("minutely.serve")


class _Server(uvicorn.Server):
    """A uvicorn server that reports its bound port once it accepts connections."""

    def __init__(self, config: uvicorn.Config, port_file: Path | None) -> None:
        super().__init__(config)
        self._port_file = port_file

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._port_file is not None:
            port = self.servers[0].sockets[0].getsockname()[1]
            replace_atomically(self._port_file, f"{port}\n".encode())
            logger.info("listening on port %d (written to %s)", port, self._port_file)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minutely.serve", description="Serve models of a minutely registry."
    )
    p.add_argument("--registry", required=True, type=Path, help="registry root directory")
    p.add_argument(
        "--model", required=True, action="append", help="model name to serve (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--poll-interval", type=float, default=0.2, help="registry poll, seconds")
    p.add_argument("--schema", type=Path, help="feature schema JSON (default: default_schema)")
    p.add_argument("--max-instances", type=int, default=DEFAULT_MAX_INSTANCES)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads per request (requests already run concurrently)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p


def load_schema(path: Path | None) -> Schema:
    """``default_schema()``, or the schema in the JSON file at ``path``."""
    if path is None:
        return default_schema()
    try:
        doc = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        raise SchemaError(f"--schema {path}: expected a JSON schema file ({exc})") from exc
    if not isinstance(doc, dict):
        raise SchemaError(f"--schema {path}: expected a JSON object, got {type(doc).__name__}")
    return Schema.from_dict(doc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; the exit status (0 after a clean stop)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.torch_threads < 1:
        print(
            f"minutely.serve: --torch-threads: expected >= 1, got {args.torch_threads}",
            file=sys.stderr,
        )
        return 2
    try:
        app = create_app(
            args.registry,
            args.model,
            load_schema(args.schema),
            poll_interval_s=args.poll_interval,
            max_instances=args.max_instances,
        )
    except MinutelyError as exc:
        print(f"minutely.serve: {exc}", file=sys.stderr)
        return 2
    # Concurrent requests are the parallelism; per-op threads on top of them oversubscribe the
    # cores, which costs a single-row request ten times its latency on a busy machine.
    torch.set_num_threads(args.torch_threads)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        lifespan="on",
        log_level=args.log_level,
        access_log=args.access_log,
        log_config=None,  # keep the logging configured above
    )
    server = _Server(config, args.port_file)

    # uvicorn re-raises a signal it handled once it has shut down, through the handler that was
    # in place before it started; this one makes that a no-op (a clean exit, status 0), and
    # also stops a server that is still starting.
    def _stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.run()
    return 0 if server.started else 1
