"""Day-only, hourly and online learning (and ablations) over a multi-day replay, served for real.

Every strategy is its own run of the in-process pipeline (:class:`OnlinePipeline`: simulator,
SQLite log, join, training, registry) in its own run folder, on the same market (seed, size,
``sim.drift``) and with the same model seed. Day 1 is history: simulated and joined, nothing
trained. ``pipe.cut(start of day 2)`` makes the first batch model from it; then days 2..N are
replayed window by window (``train.window_s``), and every request is scored, before the window
trains, by the version live at its time through a real inference-server process (the demo's
protocol: :class:`~minutely.demo.server.ServerProcess`, :class:`~minutely.demo.replay.ReplayScorer`,
its ``online`` column): pCTR every impression, pCVR every click. After each window the replay
waits until the server answers with the registry's serving version, so a version published (or
rolled back to) at the end of a window serves the next one.

=================  =================================================================
strategy           configuration (everything else as configured for all)
=================  =================================================================
day_only           ``schedule.online = false``, cadence day: the batch model, trained
                   at each day's cut on the day's samples (continuing from its previous
                   state), serves the next day
hourly             ``schedule.online = false``, cadence hour: the batch model trained
                   at every hour's cut on the hour's samples serves the next hour
online             the defaults: daily cut, online model warm-started from it
                   (``distill_alpha`` 0.1, ``freeze_hour_level``), gated exports every
                   ``export.every_min`` minutes, monitoring with rollback
online_no_distill  online with ``distill_alpha = 0`` (no day-model teacher)
online_no_frozen   online with ``freeze_hour_level = false``
oracle             online, but every model's ``attribution_window_s`` is 0 and its
                   ``correction_horizon_s`` its original attribution window (samples
                   go out at once; the batch model at each cut learns the labels of
                   the original window, corrections replacing their negatives), and
                   the pipeline's ``transform`` hook replaces the label of every
                   online sample by its eventual label (from the market's truth, the
                   label it is judged on) and drops the corrections: the online model
                   learns every label the moment its request is logged. A bound,
                   not a strategy a real system could run.
=================  =================================================================

Every strategy of every model is judged on the scored days against eventual labels, as the
demo judges: pCTR, a click within the ``ctr`` model's attribution window of the impression;
pCVR, a conversion within the ``cvr`` model's attribution window of the click. Figures: AUC,
logloss, PCOC (predicted over observed), AUC per scored day, versions served, exports,
rollbacks. ``RI-AUC = (online - day_only) / (oracle - day_only)`` per model; the goal is >= 0.9.

A -> B -> A (``regime``): a second market, the same but for ``sim.regime_switch_hour`` and
``sim.regime_end_hour`` (users' category preferences permuted in between: regime B), replayed
over ``--regime-days`` days (by default two: day 1 history in regime A, B for some hours of day 2,
then A again), with ``online`` and ``online_no_distill``. Its figure is the AUC of both on the
hours of B and on the return to A (the hours from ``regime_end_hour`` to the end), and on the
hours of A before the switch.

Sizes: a full run is three days of 300,000 impressions (``--impressions-per-day``) with the
default models, and a conversion rate of 0.3 per click (``--base-cvr``; at this size the
simulator's default, 0.08, leaves about 250 conversions a day within the ``cvr`` model's hour:
little for a pCVR model to learn from in a day). ``--quick`` is a tiny market with small models
and 15-minute windows, a check of the machinery rather than of the figures.

The run folders hold everything a run writes (log, registry, server log, rollback events);
each is removed when its run ends unless ``--runs-dir`` is given. A checkpoint is written once
a simulated day (``train.checkpoint_every_windows``: the replay never resumes, more would only
cost time), and feature snapshots are off
(``features.snapshots = false``: the samples are the same either way, the Delta writes would
only cost time). The last line printed is one JSON object with every figure.

    python benchmarks/strategies.py --quick
    python benchmarks/strategies.py
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from minutely.clock import MS_PER_DAY, MS_PER_HOUR
from minutely.config import Config, ModelConfig, load_config, merge_tables
from minutely.demo.replay import (
    ReplayScorer,
    ScoredModel,
    eventual_click_labels,
    eventual_conversion_labels,
    score,
)
from minutely.demo.server import ServerProcess
from minutely.pipeline.origin import key_paths, publisher_registry
from minutely.pipeline.runner import OnlinePipeline
from minutely.schema import Schema, default_schema
from minutely.sim import IMP_ID_STRIDE, Market
from minutely.stream import open_log

DAY_ONLY = "day_only"
ONLINE = "online"
ORACLE = "oracle"
STRATEGIES = (DAY_ONLY, "hourly", ONLINE, "online_no_distill", "online_no_frozen", ORACLE)
REGIME_STRATEGIES = (ONLINE, "online_no_distill")
RI_GOAL = 0.9

# The market and models of a full run; --quick shrinks them (see `base_overrides`).
FULL_IMPRESSIONS = 300_000
QUICK_IMPRESSIONS = 30_000
QUICK_SIM = {"users": 5_000, "campaigns_per_hour": 4}
QUICK_WINDOW_S = 900
QUICK_NET = {"buckets": 4_096, "embedding_dim": 8, "hidden": [32]}


# --- configuration ------------------------------------------------------------------------------


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration every strategy shares, as ``load_config`` overrides."""
    sim: dict[str, Any] = {
        "seed": args.sim_seed,
        "impressions_per_day": args.impressions_per_day,
        "base_cvr": args.base_cvr,
    }
    net: dict[str, Any] = {}
    if args.quick:
        sim.update(QUICK_SIM)
        net.update(QUICK_NET)
    if args.users is not None:
        sim["users"] = args.users
    defaults = load_config(None)
    models = [
        {f: getattr(m, f) for f in ("name", "label", "attribution_window_s", "loss")}
        | {"correction_horizon_s": m.correction_horizon_s}
        | net
        for m in defaults.models
    ]
    return {
        "sim": sim,
        "models": models,
        # A checkpoint a day: the replay never resumes, so more would only cost time.
        "train": {
            "window_s": args.window_s,
            "seed": args.seed,
            "checkpoint_every_windows": 86_400 // args.window_s,
        },
        "serve": {"poll_interval_s": 0.02},
        "features": {"snapshots": False},
    }


def strategy_config(base: dict[str, Any], name: str) -> Config:
    """The configuration of strategy ``name`` (see the module docstring), validated."""
    models: list[dict[str, Any]] = [dict(m) for m in base["models"]]
    over: dict[str, Any] = {}
    if name == DAY_ONLY:
        over["schedule"] = {"online": False, "cadence": "day"}
    elif name == "hourly":
        over["schedule"] = {"online": False, "cadence": "hour"}
    elif name == "online_no_distill":
        for m in models:
            m["distill_alpha"] = 0.0
    elif name == "online_no_frozen":
        for m in models:
            m["freeze_hour_level"] = False
    elif name == ORACLE:
        for m in models:
            m["correction_horizon_s"] = m["attribution_window_s"]
            m["attribution_window_s"] = 0
    elif name != ONLINE:
        raise ValueError(f"strategy: expected one of {list(STRATEGIES)}, got {name!r}")
    return load_config(None, merge_tables(base, {**over, "models": models}))


# --- eventual labels ------------------------------------------------------------------------


class EventualLabels:
    """Each impression's eventual label per model, from the market's truth (computed per day
    once, then looked up by impression id).

    A click model's label: a click within its attribution window of the impression. A
    conversion model's: a conversion within its attribution window of the click (0 for an
    impression that was not clicked). The models are the judged ones (their windows), whatever
    windows a strategy joins with.
    """

    def __init__(self, market: Market, models: Sequence[ModelConfig]) -> None:
        self._market = market
        self._models = {m.name: m for m in models}
        self._days: dict[int, dict[str, np.ndarray]] = {}

    def _day(self, day: int) -> dict[str, np.ndarray]:
        cached = self._days.get(day)
        if cached is not None:
            return cached
        t = self._market.simulate_day(day)
        out: dict[str, np.ndarray] = {}
        for name, m in self._models.items():
            window_ms = m.attribution_window_s * 1000
            if m.label == "click":
                out[name] = eventual_click_labels(
                    t.imp_id, t.imp_ts_ms, t.click_imp_id, t.click_ts_ms, window_ms, t.imp_id
                )
            else:
                labels = np.zeros(len(t), dtype=np.float64)
                rows = t.click_imp_id - day * IMP_ID_STRIDE
                labels[rows] = eventual_conversion_labels(
                    t.conv_imp_id, t.conv_ts_ms, window_ms, t.click_imp_id, t.click_ts_ms
                )
                out[name] = labels
        self._days[day] = out
        return out

    def lookup(self, model: str, imp_ids: np.ndarray) -> np.ndarray:
        """The eventual labels of ``model`` for ``imp_ids`` (any order, any days)."""
        if model not in self._models:
            raise ValueError(
                f"EventualLabels: expected a model among {list(self._models)}, got {model!r}"
            )
        out = np.zeros(len(imp_ids), dtype=np.float64)
        days = imp_ids // IMP_ID_STRIDE
        for day in np.unique(days).tolist():
            where = days == day
            out[where] = self._day(int(day))[model][imp_ids[where] - day * IMP_ID_STRIDE]
        return out


def oracle_transform(labels: EventualLabels) -> Callable[[str, int, pa.Table], pa.Table]:
    """The oracle's ``transform``: drop the corrections of a window's samples and give every
    other sample its eventual label (``label_ts_ms`` stays as the join wrote it: the ``pu`` and
    ``bce`` losses do not read it)."""

    def transform(model: str, _end_ms: int, table: pa.Table) -> pa.Table:
        corrections = table["is_correction"].to_numpy(zero_copy_only=False)
        table = table.filter(pa.array(~corrections))
        ids = table["sample_id"].to_numpy(zero_copy_only=False)
        i = table.schema.get_field_index("label")
        f = table.schema.field(i)
        new = labels.lookup(model, ids).astype(np.int8)
        return table.set_column(i, f, pa.array(new, type=f.type))

    return transform


# --- one run ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One strategy's run: per model, the scored requests and the pipeline's counts."""

    name: str
    requests: dict[str, dict[str, np.ndarray]]
    counts: dict[str, dict[str, int]]
    wall_s: float
    phases_s: dict[str, float] = field(default_factory=dict)


def run_strategy(
    name: str,
    cfg: Config,
    market: Market,
    schema: Schema,
    run_dir: Path,
    days: int,
    labels: EventualLabels,
    echo: Callable[[str], None],
) -> RunResult:
    """Replay ``days`` days with strategy ``name``: day 1 joined, a cut at the start of day 2,
    days 2..``days`` scored through a server process, then trained on."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    run_dir.mkdir(parents=True)
    names = [m.name for m in cfg.models]
    start = cfg.sim.start_ms
    online_start = start + MS_PER_DAY
    window_ms = cfg.train.window_s * 1000
    log = open_log(cfg.stream, run_dir)
    registry = publisher_registry(cfg, run_dir)
    pipe = OnlinePipeline(
        cfg,
        schema,
        log,
        market,
        registry,
        run_dir / "checkpoints",
        start,
        transform=oracle_transform(labels) if name == ORACLE else None,
    )
    phases: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        for end in range(start + MS_PER_HOUR, online_start + 1, MS_PER_HOUR):
            pipe.tick(end, train=False, export=False)
        phases["history_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.cut(online_start)
        phases["first_cut_s"] = time.perf_counter() - t0
        # The scorer also runs a day model in-process (a column this benchmark does not
        # use): the first batch model.
        day_models = {}
        for n, loop in pipe.models.items():
            assert loop.warm is not None  # the cut made it
            day_models[n] = loop.warm.model
        t0 = time.perf_counter()
        with ServerProcess(
            registry.root,
            names,
            run_dir,
            cfg.serve.poll_interval_s,
            cfg.serve.host,
            public_key=key_paths(cfg, run_dir)[1],
        ) as server:
            serving: dict[str, str | None] = {n: None for n in names}

            def follow_registry() -> None:
                for n in names:
                    version = registry.serving_version(n)
                    if version is not None and version != serving[n]:
                        server.wait_for_version(n, version)
                        serving[n] = version

            follow_registry()
            scorer = ReplayScorer(
                server,
                market,
                schema,
                [ScoredModel(pipe.models[n].cfg, day_models[n]) for n in names],
                cfg.demo.score_batch,
            )
            ends = range(online_start + window_ms, start + days * MS_PER_DAY + 1, window_ms)
            for i, end in enumerate(ends):
                pipe.tick(end, on_events=scorer.score_window)
                follow_registry()
                if (i + 1) % (MS_PER_DAY // window_ms) == 0:
                    echo(f"  {run_dir.name}: day {(end - start) // MS_PER_DAY} replayed")
        phases["replay_s"] = time.perf_counter() - t0
        requests = {n: scorer.scores[n].arrays() for n in names}
        counts = {
            n: {
                "exported": loop.exporter.state.exported,
                "refused_by_gate": loop.exporter.state.refused,
                "rollbacks": loop.rollbacks,
                "warm_starts": len(registry.warm_start_versions(n)),
            }
            for n, loop in pipe.models.items()
        }
    finally:
        pipe.close()
        log.close()
    return RunResult(name, requests, counts, time.perf_counter() - t_start, phases)


# --- judging ----------------------------------------------------------------------------------


def rounded(x: float, digits: int = 5) -> float | None:
    """``x`` rounded (``-0.0`` as ``0.0``), or ``None`` when it is not finite (JSON has no nan)."""
    return round(x, digits) + 0.0 if math.isfinite(x) else None


def judged(preds: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """n, positives, AUC, logloss and PCOC of ``preds`` against ``labels``."""
    s = score(preds, labels)
    return {
        "n": int(s["n"]),
        "positives": int(s["positives"]),
        **{k: rounded(s[k]) for k in ("auc", "logloss", "pcoc")},
    }


def model_metrics(
    run: RunResult, model: str, labels: EventualLabels, start_ms: int
) -> dict[str, Any]:
    """One strategy's figures for one model over the scored days."""
    req = run.requests[model]
    y = labels.lookup(model, req["imp_ids"])
    preds, ts = req["online"], req["ts_ms"]
    day = (ts - start_ms) // MS_PER_DAY
    daily_auc = [
        rounded(score(preds[day == d], y[day == d])["auc"], 4) for d in np.unique(day).tolist()
    ]
    return {
        **judged(preds, y),
        "daily_auc": daily_auc,
        "versions_served": len(set(req["versions"].tolist())),
        **run.counts[model],
    }


def ri(method: float | None, base: float | None, oracle: float | None) -> float | None:
    """(method - base) / (oracle - base); ``None`` when a figure is missing or the gap is 0."""
    if method is None or base is None or oracle is None or oracle == base:
        return None
    return rounded((method - base) / (oracle - base), 4)


def hours_auc(
    run: RunResult, model: str, labels: EventualLabels, start_ms: int, lo: int, hi: int
) -> dict[str, Any]:
    """AUC (and n) of the requests in market hours ``[lo, hi)``."""
    req = run.requests[model]
    hour = (req["ts_ms"] - start_ms) // MS_PER_HOUR
    m = (hour >= lo) & (hour < hi)
    y = labels.lookup(model, req["imp_ids"][m])
    s = score(req["online"][m], y)
    return {"hours": [lo, hi], "n": int(s["n"]), "auc": rounded(s["auc"])}


def per_hour_auc(
    run: RunResult, model: str, labels: EventualLabels, start_ms: int, lo: int, hi: int
) -> list[float | None]:
    return [hours_auc(run, model, labels, start_ms, h, h + 1)["auc"] for h in range(lo, hi)]


def run_regime(
    base: dict[str, Any],
    switch: int,
    end: int,
    days: int,
    schema: Schema,
    root: Path,
    echo: Callable[[str], None],
    keep: bool,
) -> dict[str, Any]:
    """The A -> B -> A runs: the shared market with regime B in market hours ``[switch,
    end)``, replayed over ``days`` days with ``online`` and ``online_no_distill``; the AUC of
    each model on the hours of A before B, of B, and of the return to A (from ``end`` to the
    last hour), hour by hour too, and distillation's gain (with minus without) on each part.
    ``wall_s`` holds each run's wall time; run folders are removed unless ``keep``."""
    regime_base = merge_tables(
        base, {"sim": {"regime_switch_hour": switch, "regime_end_hour": end}}
    )
    cfg = load_config(None, regime_base)
    market = Market(cfg.sim, schema, cached_days=days + 1)
    labels = EventualLabels(market, cfg.models)
    start_ms, first, last = cfg.sim.start_ms, 24, 24 * days
    out: dict[str, Any] = {
        "days": days,
        "regime_switch_hour": switch,
        "regime_end_hour": end,
        "strategies": {},
        "wall_s": {},
    }
    for n in REGIME_STRATEGIES:
        echo(f"regime-{n}: replaying {days} days (A -> B -> A)")
        r = run_strategy(
            n,
            strategy_config(regime_base, n),
            market,
            schema,
            root / f"regime-{n}",
            days,
            labels,
            echo,
        )
        echo(f"regime-{n}: {r.wall_s:.0f} s ({_phases(r)})")
        if not keep:
            shutil.rmtree(root / f"regime-{n}", ignore_errors=True)
        out["wall_s"][f"regime_{n}"] = round(r.wall_s, 1)
        out["strategies"][n] = {
            m.name: {
                "a_before": hours_auc(r, m.name, labels, start_ms, first, switch),
                "b": hours_auc(r, m.name, labels, start_ms, switch, end),
                "a_return": hours_auc(r, m.name, labels, start_ms, end, last),
                "hourly_auc": per_hour_auc(r, m.name, labels, start_ms, first, last),
                **{k: r.counts[m.name][k] for k in ("exported", "rollbacks")},
            }
            for m in cfg.models
        }
    on, off = out["strategies"][ONLINE], out["strategies"]["online_no_distill"]
    out["distill_gain_auc"] = {
        m.name: {
            part: _diff(on[m.name][part]["auc"], off[m.name][part]["auc"])
            for part in ("a_before", "b", "a_return")
        }
        for m in cfg.models
    }
    return out


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny market and small models")
    p.add_argument("--days", type=int, default=3, help="days replayed (day 1 history; >= 3)")
    p.add_argument(
        "--impressions-per-day",
        type=int,
        default=None,
        help=f"{FULL_IMPRESSIONS:,}; quick {QUICK_IMPRESSIONS:,}",
    )
    p.add_argument("--users", type=int, default=None, help="simulated users (default: config)")
    p.add_argument("--window-s", type=int, default=None, help="train.window_s (300; quick 900)")
    p.add_argument(
        "--base-cvr",
        type=float,
        default=0.3,
        help="sim.base_cvr: mean conversion rate of a click (the simulator's default is 0.08)",
    )
    p.add_argument("--sim-seed", type=int, default=7)
    p.add_argument("--seed", type=int, default=0, help="train.seed (model initialisation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the replay")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    p.add_argument("--regime-days", type=int, default=2, help="days of the A -> B -> A run")
    p.add_argument(
        "--regime-start", type=int, default=8, help="hour of the last regime day B starts at"
    )
    p.add_argument("--regime-hours", type=int, default=6, help="hours of regime B")
    p.add_argument("--no-regime", action="store_true", help="skip the A -> B -> A runs")
    p.add_argument("--runs-dir", type=Path, default=None, help="keep the run folders here")
    args = p.parse_args(argv)
    if args.window_s is None:
        args.window_s = QUICK_WINDOW_S if args.quick else 300
    if args.impressions_per_day is None:
        args.impressions_per_day = QUICK_IMPRESSIONS if args.quick else FULL_IMPRESSIONS
    names = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names or len(set(names)) != len(names):
        p.error(f"--strategies: expected distinct names among {list(STRATEGIES)}, got {names}")
    if args.days < 3:
        p.error(f"--days: expected >= 3 (one history day, two scored), got {args.days}")
    if args.regime_days < 2:
        p.error(
            f"--regime-days: expected >= 2 (one history day in regime A), got {args.regime_days}"
        )
    if not 0 <= args.regime_start < args.regime_start + args.regime_hours < 24:
        p.error(
            "--regime-start, --regime-hours: expected B to start and end within the last day "
            f"(0 <= start < start + hours < 24), got {args.regime_start} + {args.regime_hours}"
        )
    if args.window_s < 1 or MS_PER_HOUR % (args.window_s * 1000):
        p.error(f"--window-s: expected a divisor of 3600, got {args.window_s}")
    if args.threads < 1:
        p.error(f"--threads: expected >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    def echo(line: str) -> None:
        print(line, flush=True)

    base = base_overrides(args)
    schema = default_schema()
    configs = {n: strategy_config(base, n) for n in names}
    judged_cfg = load_config(None, base)
    model_names = [m.name for m in judged_cfg.models]
    start_ms = judged_cfg.sim.start_ms

    keep = args.runs_dir is not None
    root = Path(args.runs_dir) if keep else Path(tempfile.mkdtemp(prefix="strategies-"))
    root.mkdir(parents=True, exist_ok=True)
    runs: dict[str, RunResult] = {}
    regime: dict[str, Any] | None = None
    wall: dict[str, float] = {}
    try:
        # Every strategy replays the same market: simulated once, every day kept.
        market = Market(judged_cfg.sim, schema, cached_days=args.days + 1)
        labels = EventualLabels(market, judged_cfg.models)
        for n in names:
            echo(f"{n}: replaying {args.days} days")
            runs[n] = run_strategy(n, configs[n], market, schema, root / n, args.days, labels, echo)
            echo(f"{n}: {runs[n].wall_s:.0f} s ({_phases(runs[n])})")
            wall[n] = round(runs[n].wall_s, 1)
            if not keep:  # a full run's log and registry take gigabytes
                shutil.rmtree(root / n, ignore_errors=True)
        if not args.no_regime:
            switch = 24 * (args.regime_days - 1) + args.regime_start
            regime = run_regime(
                base,
                switch,
                switch + args.regime_hours,
                args.regime_days,
                schema,
                root,
                echo,
                keep,
            )
            wall.update(regime.pop("wall_s"))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    strategies: dict[str, dict[str, Any]] = {
        n: {m: model_metrics(r, m, labels, start_ms) for m in model_names} for n, r in runs.items()
    }
    ri_auc: dict[str, dict[str, float | None]] = {}
    if DAY_ONLY in strategies and ORACLE in strategies:
        for n in strategies:
            if n in (DAY_ONLY, ORACLE):
                continue
            ri_auc[n] = {
                m: ri(
                    strategies[n][m]["auc"],
                    strategies[DAY_ONLY][m]["auc"],
                    strategies[ORACLE][m]["auc"],
                )
                for m in model_names
            }
    online_ri = ri_auc.get(ONLINE, {})
    goals: dict[str, bool | None] = {}
    for m in model_names:
        value = online_ri.get(m)
        goals[f"ri_auc_{m}_ge_{RI_GOAL}"] = None if value is None else value >= RI_GOAL
    _print_table(strategies, ri_auc, model_names)
    first_sim = configs[names[0]].sim
    result = {
        "benchmark": "strategies",
        "quick": bool(args.quick),
        "config": {
            "days": args.days,
            "scored_days": args.days - 1,
            "impressions_per_day": first_sim.impressions_per_day,
            "users": first_sim.users,
            "drift": first_sim.drift,
            "delay_preset": first_sim.delay_preset,
            "base_ctr": first_sim.base_ctr,
            "base_cvr": first_sim.base_cvr,
            "sim_seed": first_sim.seed,
            "seed": args.seed,
            "window_s": args.window_s,
            "threads": args.threads,
            "models": {
                m.name: {
                    "label": m.label,
                    "loss": m.loss,
                    "attribution_window_s": m.attribution_window_s,
                    "correction_horizon_s": m.correction_horizon_s,
                    "arch": m.arch,
                    "embedding_dim": m.embedding_dim,
                    "buckets": m.buckets,
                    "hidden": list(m.hidden),
                    "distill_alpha": m.distill_alpha,
                }
                for m in judged_cfg.models
            },
            "export_every_min": judged_cfg.export.every_min,
        },
        "strategies": strategies,
        "ri_auc": ri_auc,
        "goals": goals,
        "regime": regime,
        "wall_s": wall,
        "total_wall_s": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(result))
    return 0


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else rounded(a - b)


def _phases(run: RunResult) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in run.phases_s.items())


def _print_table(
    strategies: dict[str, dict[str, Any]],
    ri_auc: dict[str, dict[str, float | None]],
    models: list[str],
) -> None:
    print(
        f"{'strategy':<19}{'model':<6}{'AUC':>8}{'logloss':>9}{'PCOC':>7}{'RI-AUC':>8}{'vers':>6}"
    )
    for n, per_model in strategies.items():
        for m in models:
            s = per_model[m]
            r = ri_auc.get(n, {}).get(m)
            print(
                f"{n:<19}{m:<6}{_fmt(s['auc'], 4):>8}{_fmt(s['logloss'], 4):>9}"
                f"{_fmt(s['pcoc'], 3):>7}{_fmt(r, 3):>8}{s['versions_served']:>6}"
            )


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
