"""The ``minutely`` command line.

``minutely demo`` runs the whole pipeline in one process on embedded defaults; ``simulate``,
``join``, ``train`` and ``serve`` run one stage each as a service over the log, and ``up`` starts
them all. ``--config`` reads a TOML file, ``--set section.field=value`` overrides single fields
(values are TOML literals) and ``--kafka HOST:PORT`` puts the log on a Kafka cluster."""

from __future__ import annotations

import argparse
import logging
import sys
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
    up = sub.add_parser("up", help="start every service locally; Ctrl-C stops them all")
    _service_options(up)
    up.add_argument("--joiners", type=int, default=2, help="join processes in the group")
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
        cfg = load_cli_config(args)
        if args.command == "demo":
            from minutely.demo.run import run_demo

            # One line per scoring request would bury the progress bar and the table.
            logging.getLogger("httpx").setLevel(logging.WARNING)

            run_demo(cfg, run_dir=args.run_dir, progress=not args.no_progress, resume=args.resume)
            return 0
        if args.command == "serve":
            return _serve(cfg, args)
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
        return run_up(cfg, run_dir, stop, joiners=args.joiners, common=common, sim_args=sim_args)
    return 0


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from minutely.pipeline.origin import registry_location
    from minutely.serve.cli import main as serve_main

    location = registry_location(cfg, args.run_dir)
    argv = ["--registry", str(location)]
    for m in cfg.models:
        argv += ["--model", m.name]
    argv += ["--host", cfg.serve.host, "--port", str(cfg.serve.port)]
    argv += ["--poll-interval", str(cfg.serve.poll_interval_s)]
    if args.port_file is not None:
        argv += ["--port-file", str(args.port_file)]
    if isinstance(location, Path):
        location.mkdir(parents=True, exist_ok=True)
    return serve_main(argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
