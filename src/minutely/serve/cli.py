"""``python -m minutely.serve``: the inference server on uvicorn.

::

    python -m minutely.serve --registry runs/x/registry --model ctr --model cvr \\
        --host 127.0.0.1 --port 0 --port-file runs/x/server.port --poll-interval 0.2 \\
        --workers 2 --batch-max-rows 1024 --admin-token-file secrets/admin.token

With ``--port 0`` the system picks a free port; ``--port-file`` receives the bound port (one
line, replaced atomically) once the server accepts connections, which is after its first
registry check, so a parent process that waits for the file can send requests at once.
SIGTERM or SIGINT stops the server gracefully (requests in flight finish) with exit status 0.

``--workers N`` (N > 1) runs N worker processes on one socket under a parent that restarts
them and stops them with it (:mod:`minutely.serve.supervisor`); each worker loads and polls
the registry on its own. ``--batch-max-rows`` (default 1024) and ``--batch-max-wait-ms``
(default 0) merge concurrent requests of a worker into shared forward passes
(:mod:`minutely.serve.batcher`; 0 rows turns that off): by default nothing waits, and only the
requests that queued while the model was busy share the next pass. Each worker runs torch on
one thread by default (``--torch-threads``): requests and workers already use the cores, and
per-operator threads on top of them oversubscribe them.

``--admin-token-file`` enables the admin endpoints (pin, unpin, rollback) for requests that
carry its token (``Authorization: Bearer <token>``); ``--predict-token-file`` makes predict
require its token too. ``--public-key`` (a PEM Ed25519 public key) refuses versions that are
not signed by its private key.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import msgspec
import torch
import uvicorn

from minutely.errors import ConfigError, MinutelyError, SchemaError
from minutely.fsutil import replace_atomically
from minutely.registry import Verifier
from minutely.schema import Schema, default_schema
from minutely.serve.app import DEFAULT_MAX_INSTANCES, create_app
from minutely.serve.batcher import BatchSettings
from minutely.serve.supervisor import supervise

logger = logging.getLogger("minutely.serve")

# Batching waits for nothing by default (--batch-max-wait-ms 0): a lone request is scored at
# once, and only requests that queued while the model was busy share the next forward pass.
DEFAULT_BATCH_MAX_ROWS = 1024


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
    p.add_argument("--registry", required=True, help="registry root (a folder or a URL)")
    p.add_argument(
        "--model", required=True, action="append", help="model name to serve (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--poll-interval", type=float, default=0.2, help="registry poll, seconds")
    p.add_argument("--schema", type=Path, help="feature schema JSON (default: default_schema)")
    p.add_argument("--max-instances", type=int, default=DEFAULT_MAX_INSTANCES)
    p.add_argument("--workers", type=int, default=1, help="worker processes on the one port")
    p.add_argument(
        "--batch-max-rows",
        type=int,
        default=DEFAULT_BATCH_MAX_ROWS,
        help="rows of concurrent requests merged into one forward pass (0: no batching)",
    )
    p.add_argument(
        "--batch-max-wait-ms",
        type=float,
        default=0.0,
        help="how long a request may wait for others to share its forward pass",
    )
    p.add_argument("--admin-token-file", type=Path, help="enables the admin endpoints")
    p.add_argument("--predict-token-file", type=Path, help="predict requires this token")
    p.add_argument("--public-key", type=Path, help="refuse versions not signed by its key")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads per worker (requests already run concurrently)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # a worker's socket
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


def load_token(path: Path | None, flag: str) -> str | None:
    """The token in the file at ``path`` (surrounding whitespace dropped), or ``None``."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(flag, "a readable token file", f"{path} ({exc})") from exc
    if not token:
        raise ConfigError(flag, "a file holding a token", f"{path} (empty)")
    return token


def _worker_argv(args: argparse.Namespace) -> Callable[[int, Path], list[str]]:
    """The command line of a worker: this one's settings, the parent's socket, a ready file."""
    base = [sys.executable, "-m", "minutely.serve", "--registry", str(args.registry)]
    for m in args.model:
        base += ["--model", m]
    base += ["--poll-interval", str(args.poll_interval)]
    base += ["--max-instances", str(args.max_instances)]
    base += ["--batch-max-rows", str(args.batch_max_rows)]
    base += ["--batch-max-wait-ms", str(args.batch_max_wait_ms)]
    base += ["--torch-threads", str(args.torch_threads), "--log-level", args.log_level]
    for flag, value in (
        ("--schema", args.schema),
        ("--admin-token-file", args.admin_token_file),
        ("--predict-token-file", args.predict_token_file),
        ("--public-key", args.public_key),
    ):
        if value is not None:
            base += [flag, str(value)]
    if args.access_log:
        base.append("--access-log")

    def argv(fd: int, ready_file: Path) -> list[str]:
        return [*base, "--listen-fd", str(fd), "--port-file", str(ready_file)]

    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; the exit status (0 after a clean stop)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for flag, value in (("--torch-threads", args.torch_threads), ("--workers", args.workers)):
        if value < 1:
            print(f"minutely.serve: {flag}: expected >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        verifier = None if args.public_key is None else Verifier.from_pem_file(args.public_key)
        app = create_app(
            args.registry,
            args.model,
            load_schema(args.schema),
            poll_interval_s=args.poll_interval,
            max_instances=args.max_instances,
            batch=BatchSettings(args.batch_max_rows, args.batch_max_wait_ms),
            admin_token=load_token(args.admin_token_file, "--admin-token-file"),
            predict_token=load_token(args.predict_token_file, "--predict-token-file"),
            verifier=verifier,
            freeze_gc=True,
        )
    except MinutelyError as exc:
        print(f"minutely.serve: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.listen_fd is None:
        return supervise(
            _worker_argv(args),
            workers=args.workers,
            host=args.host,
            port=args.port,
            port_file=args.port_file,
        )
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
    if args.listen_fd is None:
        server.run()
    else:  # a worker of minutely.serve.supervisor: serve on the parent's socket
        server.run(sockets=[socket.socket(fileno=args.listen_fd)])
    return 0 if server.started else 1
