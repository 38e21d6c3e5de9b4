"""The ``minutely`` command line.

``minutely demo`` runs the whole pipeline in one process on embedded defaults; ``simulate``,
``join``, ``train`` and ``serve`` run one stage each as a service over the log, and ``up`` starts
them all. ``--config`` reads a TOML file, ``--set section.field=value`` overrides single fields
(values are TOML literals) and ``--kafka HOST:PORT`` puts the log on a Kafka cluster."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minutely.config import Config, load_config, merge_tables
from minutely.errors import ConfigError, MinutelyError


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=3`` -> ``{"a": {"b": 3}}``; a value that is not a TOML literal is a string."""
    if "=" not in text:
        raise ConfigError("--set", "section.field=value", text)
    path, raw = text.split("=", 1)
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError("--set", "section.field=value", text)
    out: dict[str, Any] = {}
    node = out
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return out


# A small market: about 1,800 clicks a day, so the pCVR model needs a low bar to export often.
QUICK = {
    "sim": {"impressions_per_day": 60_000, "users": 20_000, "campaigns_per_hour": 6},
    "demo": {"corrupt_every": 2_000},
    "export": {"min_samples": 50},
}


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument(
        "--kafka",
        metavar="HOST:PORT",
        help="use the Kafka cluster at these bootstrap servers instead of the embedded log",
    )


def _service_options(p: argparse.ArgumentParser) -> None:
    _config_options(p)
    p.add_argument("--run-dir", type=Path, default=Path("run"), help="checkpoints, registry, log")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minutely", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="simulate two days; compare day-only, hourly and online pCTR and pCVR models"
    )
    _config_options(demo)
    demo.add_argument("--quick", action="store_true", help="a small market (about a minute)")
    demo.add_argument("--run-dir", type=Path, help="write here instead of a new runs/ folder")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its checkpoint"
    )
    sim = sub.add_parser("simulate", help="write simulated raw events to the raw topic")
    _service_options(sim)
    sim.add_argument("--days", type=float, help="stop after this many simulated days")
    sim.add_argument("--rate", type=float, help="pace at this many times real time")
    sim.add_argument("--live", action="store_true", help="start the market at the wall clock's now")
    join = sub.add_parser("join", help="join raw events into samples (a consumer-group member)")
    _service_options(join)
    join.add_argument("--name", default="join", help="this member's status name")
    train = sub.add_parser(
        "train", help="train one model: online (a service) or a day/hour batch run"
    )
    _service_options(train)
    train.add_argument("--model", required=True, help="the model's name in the config")
    train.add_argument(
        "--mode",
        choices=("online", "day", "hour"),
        default="online",
        help="online: the stream, with the schedule's cuts (default); day/hour: one batch run "
        "over the samples released in [--start, --end), published as a warm-start version",
    )
    train.add_argument("--end", help="batch run: end of the range (ISO 8601 UTC or epoch ms)")
    train.add_argument("--start", help="batch run: start of the range (default: --end - period)")
    train.add_argument(
        "--audit", action="store_true", help="record what each window trained on (tests)"
    )
    serve = sub.add_parser("serve", help="serve the run's registry over HTTP")
    _service_options(serve)
    serve.add_argument("--port-file", type=Path, help="write the bound port here")
    serve.add_argument("--name", default="serve", help="this server's name in the run folder")
    tracker = sub.add_parser("tracker", help="run a region's tracker of who holds which chunk")
    _service_options(tracker)
    tracker.add_argument("--host", default="127.0.0.1")
    tracker.add_argument("--port", type=int, default=8700, help="0 picks a free port")
    tracker.add_argument("--port-file", type=Path, help="write the bound port here")
    keys = sub.add_parser("keys", help="generate an Ed25519 key pair that signs manifests")
    keys.add_argument("--out", type=Path, required=True, help="folder for signing.pem, public.pem")
    up = sub.add_parser("up", help="start every service locally; Ctrl-C stops them all")
    _service_options(up)
    up.add_argument("--joiners", type=int, default=2, help="join processes in the group")
    up.add_argument(
        "--servers",
        type=int,
        default=1,
        help="inference servers; more than one share versions through a tracker and agents",
    )
    up.add_argument("--days", type=float, help="simulated days (default: until stopped)")
    up.add_argument("--rate", type=float, help="pace the simulator at this many times real time")
    up.add_argument("--live", action="store_true", help="start the market at the wall clock's now")
    return parser


def load_cli_config(args: argparse.Namespace) -> Config:
    """The configuration the command line describes: file, --quick, --set, --kafka."""
    overrides: dict[str, Any] = {}
    if getattr(args, "quick", False):
        overrides = merge_tables(overrides, QUICK)
    for item in args.set:
        overrides = merge_tables(overrides, parse_override(item))
    if args.kafka:
        kafka = {"backend": "kafka", "bootstrap_servers": args.kafka}
        overrides = merge_tables(overrides, {"stream": kafka})
    return load_config(args.config, overrides)


def parse_time(text: str, name: str) -> int:
    """Epoch milliseconds from ``text``: an integer (epoch ms) or an ISO 8601 time (UTC unless
    it names its offset).

    >>> parse_time("2026-01-02T00:00:00Z", "--end"), parse_time("1767312000000", "--end")
    (1767312000000, 1767312000000)
    """
    if text.strip().lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(name, "epoch milliseconds or an ISO 8601 time", text) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "keys":
            return _keys(args)
        cfg = load_cli_config(args)
        if args.command == "demo":
            from minutely.demo.run import run_demo

            # One line per scoring request would bury the progress bar and the table.
            logging.getLogger("httpx").setLevel(logging.WARNING)

            run_demo(cfg, run_dir=args.run_dir, progress=not args.no_progress, resume=args.resume)
            return 0
        if args.command == "serve":
            return _serve(cfg, args)
        if args.command == "tracker":
            return _tracker(cfg, args)
        return _service(cfg, args)
    except MinutelyError as exc:
        print(f"minutely: error: {exc}", file=sys.stderr)
        return 2


def _service(cfg: Config, args: argparse.Namespace) -> int:
    from minutely.clock import WallClock
    from minutely.fsutil import ensure_writable_dir
    from minutely.pipeline import commands
    from minutely.pipeline.services import stop_on_signals, tune_gc

    stop = stop_on_signals()
    tune_gc()
    run_dir: Path = args.run_dir
    ensure_writable_dir(run_dir, "run folder")
    clock = WallClock()
    if args.command == "simulate":
        commands.run_simulate(
            cfg, run_dir, clock, stop, days=args.days, rate=args.rate, live=args.live
        )
    elif args.command == "join":
        commands.run_join(cfg, run_dir, clock, stop, name=args.name)
    elif args.command == "train" and args.mode != "online":
        if args.end is None:
            raise ConfigError("--end", f"the end of the {args.mode} range", None)
        outcome = commands.run_batch(
            cfg,
            run_dir,
            model=args.model,
            mode=args.mode,
            end_ms=parse_time(args.end, "--end"),
            start_ms=None if args.start is None else parse_time(args.start, "--start"),
        )
        r, m = outcome.report, outcome.version
        print(
            f"{args.model} {args.mode} model: {r.samples} samples, train AUC {r.train_auc:.4f}, "
            f"published {m.version} (warm start)"
        )
    elif args.command == "train":
        if args.end is not None or args.start is not None:
            raise ConfigError(
                "--end", "no range for --mode online (it follows the stream)", args.end
            )
        commands.run_train(cfg, run_dir, clock, stop, model=args.model, audit=args.audit)
    elif args.command == "up":
        from minutely.pipeline.up import run_up

        if args.joiners < 1:
            raise ConfigError("--joiners", "an int >= 1", args.joiners)
        common = ["--run-dir", str(run_dir)]
        if args.config is not None:
            common += ["--config", str(args.config)]
        for item in args.set:
            common += ["--set", item]
        if args.kafka:
            common += ["--kafka", args.kafka]
        sim_args: list[str] = []
        if args.days is not None:
            sim_args += ["--days", str(args.days)]
        if args.rate is not None:
            sim_args += ["--rate", str(args.rate)]
        if args.live:
            sim_args.append("--live")
        if args.servers < 1:
            raise ConfigError("--servers", "an int >= 1", args.servers)
        return run_up(
            cfg,
            run_dir,
            stop,
            joiners=args.joiners,
            common=common,
            sim_args=sim_args,
            servers=args.servers,
        )
    return 0


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    """``minutely serve``: the inference server of one host.

    With the registry in a local folder and no tracker configured, the server's workers watch
    the folder itself. Otherwise (an object-store registry, or a region with a tracker) the host
    runs a distribution agent (:mod:`minutely.fleet.agent`, a child process) that fetches new
    versions from peers and the origin into ``<run>/<fleet.cache_dir>/<name>/registry``, and the
    workers watch that folder. Either way every version must be signed by the run's key.
    """
    import subprocess

    from minutely.pipeline.origin import fsspec_options, public_key_file, registry_location
    from minutely.procs import spawn_child, wait_for_port_file
    from minutely.serve.cli import main as serve_main

    run_dir: Path = args.run_dir
    location = registry_location(cfg, run_dir)
    public = public_key_file(cfg, run_dir)
    models = [m.name for m in cfg.models]
    agent: subprocess.Popen[bytes] | None = None
    stop_follow = threading.Event()
    if isinstance(location, Path) and not cfg.fleet.tracker:
        location.mkdir(parents=True, exist_ok=True)
        served: Path | str = location
    else:
        home = run_dir / cfg.fleet.cache_dir / args.name
        home.mkdir(parents=True, exist_ok=True)
        served = home / "registry"
        port_file = home / "agent.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "minutely.fleet.agent", "--origin", str(location)]
        for key, value in _flat_options(fsspec_options(cfg)):
            cmd += ["--origin-option", f"{key}={value}"]
        cmd += ["--cache", str(home / "cache"), "--local-registry", str(served)]
        if cfg.fleet.tracker:
            cmd += ["--tracker", cfg.fleet.tracker]
        cmd += ["--region", cfg.fleet.region, "--public-key", str(public)]
        cmd += ["--peer-id", f"{cfg.fleet.region}-{args.name}-{os.getpid()}"]
        cmd += ["--host", cfg.serve.host, "--port", "0", "--port-file", str(port_file)]
        cmd += ["--poll-interval", str(cfg.fleet.poll_interval_s)]
        cmd += ["--max-transfers", str(cfg.fleet.max_transfers)]
        for m in models:
            cmd += ["--model", m]
        agent = spawn_child(cmd)
        agent_port = wait_for_port_file(port_file, agent, "distribution agent", timeout_s=60.0)
        _follow(cfg, run_dir, models, f"http://{cfg.serve.host}:{agent_port}", stop_follow)
    argv = ["--registry", str(served), "--public-key", str(public)]
    for m in models:
        argv += ["--model", m]
    argv += ["--host", cfg.serve.host, "--port", str(cfg.serve.port)]
    argv += ["--poll-interval", str(cfg.serve.poll_interval_s)]
    argv += ["--workers", str(cfg.serve.workers)]
    argv += ["--batch-max-rows", str(cfg.serve.batch_max_rows)]
    argv += ["--batch-max-wait-ms", str(cfg.serve.batch_max_wait_ms)]
    if cfg.serve.admin_token_file:
        argv += ["--admin-token-file", cfg.serve.admin_token_file]
    if cfg.serve.predict_token_file:
        argv += ["--predict-token-file", cfg.serve.predict_token_file]
    if args.port_file is not None:
        argv += ["--port-file", str(args.port_file)]
    try:
        return serve_main(argv)
    finally:
        stop_follow.set()
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(10.0)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def _follow(
    cfg: Config, run_dir: Path, models: list[str], agent_url: str, stop: threading.Event
) -> None:
    """On a daemon thread: every announcement of a new version or a serving change on the log
    makes the agent check the origin at once (its polling is the fallback)."""
    import httpx

    from minutely.pipeline.origin import Announcement, follow_announcements
    from minutely.stream import open_log

    def wake(msg: Announcement) -> None:
        try:
            httpx.post(f"{agent_url}/v1/sync", timeout=5.0)
        except httpx.HTTPError as exc:
            logging.getLogger("minutely.serve").warning("agent sync request failed: %s", exc)

    def run() -> None:
        try:
            log = open_log(cfg.stream, run_dir)
        except MinutelyError as exc:
            logging.getLogger("minutely.serve").warning(
                "announcements on %s not followed (%s); the agent polls the origin every %g s",
                cfg.registry.announce_topic,
                exc,
                cfg.fleet.poll_interval_s,
            )
            return
        try:
            follow_announcements(log, cfg.registry.announce_topic, models, wake, stop)
        finally:
            log.close()

    threading.Thread(target=run, name="announcements", daemon=True).start()


def _flat_options(options: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += _flat_options(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _tracker(cfg: Config, args: argparse.Namespace) -> int:
    """``minutely tracker``: the region's tracker (see :mod:`minutely.fleet.tracker`)."""
    from minutely.fleet.tracker import main as tracker_main

    argv = ["--host", args.host, "--port", str(args.port)]
    argv += ["--lease-s", str(cfg.fleet.lease_s), "--peer-ttl-s", str(cfg.fleet.peer_ttl_s)]
    if args.port_file is not None:
        argv += ["--port-file", str(args.port_file)]
    return tracker_main(argv)


def _keys(args: argparse.Namespace) -> int:
    """``minutely keys``: a new Ed25519 key pair for signing manifests."""
    from minutely.registry.signing import generate_keypair

    out: Path = args.out
    signer = generate_keypair(out / "signing.pem", out / "public.pem")
    print(f"wrote {out / 'signing.pem'} (keep it with the trainers) and {out / 'public.pem'}")
    print(f"key id {signer.key_id}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
