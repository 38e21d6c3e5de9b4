"""The ``minutely`` command line.

``minutely demo`` runs the whole pipeline on embedded defaults; ``--config`` reads a TOML file and
``--set section.field=value`` overrides single fields (values are TOML literals)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minutely.config import load_config, merge_tables
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


QUICK = {
    "sim": {"impressions_per_day": 60_000, "users": 20_000, "campaigns_per_hour": 6},
    "demo": {"corrupt_every": 2_000},
    "export": {"min_samples": 200},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minutely", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulate two days and compare day-only vs online")
    demo.add_argument("--config", type=Path, help="a TOML config file")
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    demo.add_argument("--quick", action="store_true", help="a small market (about a minute)")
    demo.add_argument("--run-dir", type=Path, help="write here instead of a new runs/ folder")
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        if args.quick:
            overrides = merge_tables(overrides, QUICK)
        for item in args.set:
            overrides = merge_tables(overrides, parse_override(item))
        cfg = load_config(args.config, overrides)
        from minutely.demo.run import run_demo

        run_demo(cfg, run_dir=args.run_dir, progress=not args.no_progress)
    except MinutelyError as exc:
        print(f"minutely: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
