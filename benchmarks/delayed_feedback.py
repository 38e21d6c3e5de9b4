"""Delayed feedback: a pCVR model learned online from a Criteo-format conversion log, seven ways.

The streaming protocol of ES-DFM and DEFER. The log is the simulator's traffic with the
``criteo`` conversion-delay preset (about 35% of conversions within an hour of the click, half
within a day, a tail to 30 days), written as a Criteo conversion log and read back, or any
Criteo-format file (``--data``). Time is cut into windows (1 h); for each window, in order:

1. evaluate the current model on the clicks of the window against their eventual labels (the
   evaluation label: a conversion within ``--label-window-days`` of the click);
2. train it on the samples the join emitted during the window (what was known by the window's
   end), in micro-batches in emission order.

The strategies (same architecture, seed, data and windows; each a ``ModelConfig`` whose
samples come from the real ``Joiner`` and train through the real ``Trainer`` with
the loss ``cfg.loss`` names, except the oracle):

=============  ==========  =========  =====  ==============================================
strategy       wait        horizon    loss   what the model learns from
=============  ==========  =========  =====  ==============================================
oracle         --          --         bce    each click at its click time with its eventual
                                             label (known in advance: a measurement only)
wait_bce       --wait-min  0          bce    the label after the wait; later conversions are
                                             never seen
wait_pu        --wait-min  L - wait   pu     the label after the wait, and a correction when
                                             a conversion comes later within L
fnw            0           L          fnw    a negative at once, a positive duplicate when
                                             the conversion comes within L
fnc            0           L          fnc    the same samples as fnw
no_correction  0           L          bce    the same samples, the duplicates as plain
                                             positives: the baseline of RI
no_feedback    0           0          bce    every click a negative, no conversion ever
=============  ==========  =========  =====  ==============================================

``L`` is the evaluation label window. The first ``--warmup-days`` are trained on but not
evaluated (every strategy starts cold and the corrections need a label window of history to
arrive at their steady rate); AUC, PR-AUC, logloss and PCOC are computed over all clicks of the
remaining windows, and RI = (method - no_correction) / (oracle - no_correction) for AUC and
logloss, with PCOC and AUC per evaluated day beside them.
The last line printed is one JSON object with every figure.

    python benchmarks/delayed_feedback.py --quick
    python benchmarks/delayed_feedback.py
    python benchmarks/delayed_feedback.py --data data.txt --days 60 --warmup-days 30 \
        --label-window-days 30
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from minutely.clock import MS_PER_DAY, MS_PER_MIN
from minutely.config import JoinConfig, LossName, ModelConfig, SimConfig, TrainConfig
from minutely.data import Sample, TensorBatch, record_batch_to_tensors, samples_to_record_batch
from minutely.data.criteo import (
    CriteoReport,
    criteo_schema,
    read_criteo_events,
    read_records,
    traffic_records,
    write_criteo,
)
from minutely.evaluate import AUC, PCOC, PRAUC, LogLoss
from minutely.events import Event
from minutely.join import Joiner
from minutely.model import build_model
from minutely.schema import Schema
from minutely.sim import DayTraffic, Market
from minutely.train import Trainer

ORACLE = "oracle"
BASELINE = "no_correction"
STRATEGIES = (ORACLE, "wait_bce", "wait_pu", "fnw", "fnc", BASELINE, "no_feedback")


@dataclass(frozen=True)
class Setup:
    """Everything the strategies share."""

    schema: Schema
    base: ModelConfig  # architecture and size; each strategy sets name, windows and loss
    train: TrainConfig
    start_ms: int
    window_ms: int
    n_windows: int
    warmup_windows: int
    label_window_s: int
    wait_s: int

    def window_end(self, t: int) -> int:
        return self.start_ms + (t + 1) * self.window_ms


def strategy_model(setup: Setup, name: str) -> ModelConfig:
    """The model configuration of strategy ``name`` (the oracle's joins nothing)."""
    lw, wait = setup.label_window_s, setup.wait_s
    windows: dict[str, tuple[int, int, LossName]] = {
        ORACLE: (0, 0, "bce"),
        "wait_bce": (wait, 0, "bce"),
        "wait_pu": (wait, lw - wait, "pu"),
        "fnw": (0, lw, "fnw"),
        "fnc": (0, lw, "fnc"),
        BASELINE: (0, lw, "bce"),
        "no_feedback": (0, 0, "bce"),
    }
    window, horizon, loss = windows[name]
    return replace(
        setup.base,
        name=name,
        label="conversion",
        attribution_window_s=window,
        correction_horizon_s=horizon,
        loss=loss,
    )


# --- data -------------------------------------------------------------------------------------


def simulate_log(path: Path, cfg: SimConfig, days: int) -> dict[str, float | int]:
    """Write the clicks of ``days`` simulated days to ``path`` as a Criteo log."""
    t0 = time.perf_counter()
    market = Market(cfg, cached_days=1)
    impressions = 0

    def traffic() -> Iterator[DayTraffic]:
        nonlocal impressions
        for d in range(days):
            day = market.simulate_day(d)
            impressions += len(day)
            yield day

    records, _ = traffic_records(traffic(), cfg.start_ms)
    sim_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lines = write_criteo(path, records)
    return {
        "impressions": impressions,
        "lines": lines,
        "simulate_s": sim_s,
        "write_s": time.perf_counter() - t0,
    }


@dataclass
class EvalWindow:
    """The clicks of one window: tensor chunks with their eventual labels."""

    batches: list[TensorBatch]
    labels: np.ndarray


def chunks(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def to_tensors(samples: Sequence[Sample], setup: Setup) -> list[TensorBatch]:
    """``samples`` through the sample log's codec into micro-batches, as the trainer reads them."""
    return [
        record_batch_to_tensors(
            samples_to_record_batch(part, setup.schema), setup.schema, setup.base.buckets
        )
        for part in chunks(samples, setup.train.batch_size)
    ]


def eval_windows(path: Path, base_ms: int, setup: Setup, report: CriteoReport) -> list[EvalWindow]:
    """Per window, its clicks labeled with their eventual conversion within the label window.

    Converted window by window as the log is read, so only one window's samples are held.
    """
    out: list[EvalWindow] = []
    current: list[Sample] = []

    def close_window() -> None:
        labels = np.array([s.label for s in current], dtype=np.float64)
        out.append(EvalWindow(to_tensors(current, setup), labels))
        current.clear()

    end = setup.window_end(setup.n_windows - 1)
    for line_no, rec in read_records(path, report=report):
        click = base_ms + rec.click_s * 1000
        if click < setup.start_ms:
            continue
        if click >= end:
            break
        while click >= setup.window_end(len(out)):
            close_window()
        conv = rec.conversion_s
        label = int(conv is not None and conv - rec.click_s <= setup.label_window_s)
        label_ts = base_ms + conv * 1000 if label and conv is not None else -1
        current.append(Sample(line_no, click, click, label, False, label_ts, rec.features()))
    while len(out) < setup.n_windows:
        close_window()
    return out


# --- strategies -------------------------------------------------------------------------------


@dataclass
class Result:
    metrics: dict[str, float]
    daily: dict[str, list[float | None]]  # PCOC and AUC of each evaluated day
    trained: int
    positives: int
    corrections: int
    seconds: float


class Scorer:
    """AUC, PR-AUC, logloss and PCOC over the evaluated windows, and PCOC and AUC per day."""

    def __init__(self, setup: Setup) -> None:
        self._setup = setup
        self.metrics = {"auc": AUC(), "pr_auc": PRAUC(), "logloss": LogLoss(), "pcoc": PCOC()}
        self._days: dict[int, tuple[PCOC, AUC]] = {}

    def score(self, trainer: Trainer, t: int, window: EvalWindow) -> None:
        """Score the model on window ``t`` if it is past the warm-up."""
        if t < self._setup.warmup_windows or not window.batches:
            return
        preds = np.concatenate([trainer.predict(b) for b in window.batches]).astype(np.float64)
        for m in self.metrics.values():
            m.update(preds, window.labels)
        day = (t - self._setup.warmup_windows) * self._setup.window_ms // MS_PER_DAY
        pcoc, auc = self._days.setdefault(day, (PCOC(), AUC()))
        pcoc.update(preds, window.labels)
        auc.update(preds, window.labels)

    def get(self) -> dict[str, float]:
        return {k: m.get() for k, m in self.metrics.items()}

    def daily(self) -> dict[str, list[float | None]]:
        days = sorted(self._days)
        return {
            "pcoc": [rounded(self._days[d][0].get(), 3) for d in days],
            "auc": [rounded(self._days[d][1].get(), 4) for d in days],
        }


def new_trainer(setup: Setup, model_cfg: ModelConfig) -> Trainer:
    """A fresh model, seeded alike for every strategy; the trainer uses ``model_cfg.loss``."""
    torch.manual_seed(setup.train.seed)
    return Trainer(build_model(model_cfg, setup.schema), setup.train)


def run_oracle(setup: Setup, evals: list[EvalWindow]) -> Result:
    """Evaluate, then train on the window's clicks with their eventual labels."""
    t0 = time.perf_counter()
    trainer = new_trainer(setup, strategy_model(setup, ORACLE))
    scorer = Scorer(setup)
    trained = positives = 0
    for t, window in enumerate(evals):
        scorer.score(trainer, t, window)
        for batch in window.batches:
            trainer.train_step(batch)
        trained += len(window.labels)
        positives += int(window.labels.sum())
    seconds = time.perf_counter() - t0
    return Result(scorer.get(), scorer.daily(), trained, positives, 0, seconds)


def run_joined(
    setup: Setup, name: str, path: Path, base_ms: int, evals: list[EvalWindow]
) -> Result:
    """Stream the log through the joiner window by window: evaluate, then train on what the
    join emitted during the window."""
    t0 = time.perf_counter()
    model_cfg = strategy_model(setup, name)
    trainer = new_trainer(setup, model_cfg)
    # The log is in time order: no lateness to allow, and each impression comes with its click.
    joiner = Joiner(
        [model_cfg], JoinConfig(allowed_lateness_s=0, max_click_delay_s=0), setup.schema
    )
    events: Iterator[Event] = read_criteo_events(path, base_ms)
    nxt = next(events, None)
    while nxt is not None and nxt.ts_ms < setup.start_ms:
        nxt = next(events, None)  # before the first window: not part of the stream
    scorer = Scorer(setup)
    trained = positives = corrections = 0
    for t, window in enumerate(evals):
        end = setup.window_end(t)
        batch: list[Event] = []
        while nxt is not None and nxt.ts_ms < end:
            batch.append(nxt)
            nxt = next(events, None)
        joiner.process_many(batch)
        joiner.advance_to(end)
        samples = joiner.drain()[name]
        scorer.score(trainer, t, window)
        for tb in to_tensors(samples, setup):
            trainer.train_step(tb)
        trained += len(samples)
        positives += sum(s.label for s in samples)
        corrections += sum(s.is_correction for s in samples)
    seconds = time.perf_counter() - t0
    return Result(scorer.get(), scorer.daily(), trained, positives, corrections, seconds)


# --- report -----------------------------------------------------------------------------------


def relative_improvement(method: float, baseline: float, oracle: float) -> float:
    """(method - baseline) / (oracle - baseline); nan when the oracle equals the baseline."""
    gap = oracle - baseline
    if not math.isfinite(gap) or gap == 0:
        return math.nan
    return (method - baseline) / gap + 0.0  # -0.0 as 0.0


def rounded(x: float, digits: int = 5) -> float | None:
    """``x`` rounded (``-0.0`` as ``0.0``), or ``None`` when it is not finite (JSON has no nan)."""
    return round(x, digits) + 0.0 if math.isfinite(x) else None


def goals(results: dict[str, Result]) -> dict[str, bool | None]:
    """The experiment's expected outcomes, as measured (None where a strategy did not run).

    The methods are the strategies other than the oracle and the two baselines. PU's logloss is
    compared with uncorrected BCE on the same waiting window (``wait_bce``), and, as a further
    check, with the no-waiting baseline.
    """
    m = {k: r.metrics for k, r in results.items()}
    out: dict[str, bool | None] = {
        "pu_pcoc_within_5pct": None,
        "pu_logloss_below_uncorrected_bce": None,
        "pu_logloss_below_no_correction": None,
        "oracle_ge_best_method_ge_no_correction_auc": None,
        "oracle_le_best_method_le_no_correction_logloss": None,
    }
    if "wait_pu" in m:
        out["pu_pcoc_within_5pct"] = abs(m["wait_pu"]["pcoc"] - 1.0) <= 0.05
        if "wait_bce" in m:
            out["pu_logloss_below_uncorrected_bce"] = (
                m["wait_pu"]["logloss"] < m["wait_bce"]["logloss"]
            )
        if BASELINE in m:
            out["pu_logloss_below_no_correction"] = m["wait_pu"]["logloss"] < m[BASELINE]["logloss"]
    methods = [k for k in m if k not in (ORACLE, BASELINE, "no_feedback")]
    if ORACLE in m and BASELINE in m and methods:
        best_auc = max(m[k]["auc"] for k in methods)
        best_ll = min(m[k]["logloss"] for k in methods)
        out["oracle_ge_best_method_ge_no_correction_auc"] = (
            m[ORACLE]["auc"] >= best_auc >= m[BASELINE]["auc"]
        )
        out["oracle_le_best_method_le_no_correction_logloss"] = (
            m[ORACLE]["logloss"] <= best_ll <= m[BASELINE]["logloss"]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    model_defaults = ModelConfig()
    train_defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small, short market")
    p.add_argument("--data", type=Path, help="a Criteo-format log instead of the simulator's")
    p.add_argument("--base-ms", type=int, default=SimConfig().start_ms, help="the log's epoch")
    p.add_argument("--days", type=float, default=None, help="stream length (14; quick 3)")
    p.add_argument("--warmup-days", type=float, default=None, help="not evaluated (7; quick 1)")
    p.add_argument("--label-window-days", type=float, default=None, help="L (7; quick 1)")
    p.add_argument("--impressions-per-day", type=int, default=None, help="1M; quick 150k")
    p.add_argument("--sim-seed", type=int, default=SimConfig().seed)
    p.add_argument(
        "--delay-preset",
        choices=["criteo", "fast"],
        default="criteo",
        help="conversion delays: criteo-like (the experiment) or all within minutes (a check)",
    )
    p.add_argument("--window-min", type=int, default=60, help="evaluate/train window")
    p.add_argument("--wait-min", type=int, default=60, help="waiting window of wait_*")
    p.add_argument("--arch", choices=["lr", "deepfm"], default=model_defaults.arch)
    p.add_argument("--buckets", type=int, default=model_defaults.buckets)
    p.add_argument("--embedding-dim", type=int, default=model_defaults.embedding_dim)
    p.add_argument("--batch-size", type=int, default=train_defaults.batch_size)
    p.add_argument("--seed", type=int, default=train_defaults.seed, help="model initialisation")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    args = p.parse_args(argv)

    days = args.days if args.days is not None else (3.0 if args.quick else 14.0)
    warmup = args.warmup_days if args.warmup_days is not None else (1.0 if args.quick else 7.0)
    label_days = args.label_window_days
    if label_days is None:
        label_days = 1.0 if args.quick else 7.0
    ipd = args.impressions_per_day or (150_000 if args.quick else 1_000_000)
    names = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        p.error(f"--strategies: expected names among {list(STRATEGIES)}, got {names}")
    if not 0 <= warmup < days:
        p.error(f"--warmup-days: expected in [0, --days {days:g}), got {warmup:g}")
    if not 0 <= args.wait_min * 60 < label_days * 86_400:
        p.error(
            f"--wait-min: expected >= 0 and shorter than --label-window-days {label_days:g}, "
            f"got {args.wait_min}"
        )
    if args.window_min < 1:
        p.error(f"--window-min: expected >= 1, got {args.window_min}")
    torch.set_num_threads(args.threads)

    window_ms = args.window_min * MS_PER_MIN
    base = replace(
        model_defaults, arch=args.arch, buckets=args.buckets, embedding_dim=args.embedding_dim
    )
    train_cfg = replace(train_defaults, batch_size=args.batch_size, seed=args.seed)
    sim_cfg = replace(
        SimConfig(), seed=args.sim_seed, impressions_per_day=ipd, delay_preset=args.delay_preset
    )

    stream: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="delayed-feedback-") as tmp:
        if args.data is None:
            path = Path(tmp) / "criteo.txt"
            base_ms = start_ms = sim_cfg.start_ms
            stream.update(simulate_log(path, sim_cfg, math.ceil(days)))
        else:
            path = args.data
            base_ms = args.base_ms
            first = next(read_records(path), None)
            if first is None:
                p.error(f"--data: no well-formed line in {path}")
            start_ms = base_ms + first[1].click_s * 1000
        setup = Setup(
            schema=criteo_schema(),
            base=base,
            train=train_cfg,
            start_ms=start_ms,
            window_ms=window_ms,
            n_windows=math.ceil(days * MS_PER_DAY / window_ms),
            warmup_windows=math.ceil(warmup * MS_PER_DAY / window_ms),
            label_window_s=round(label_days * 86_400),
            wait_s=args.wait_min * 60,
        )
        report = CriteoReport()
        t0 = time.perf_counter()
        evals = eval_windows(path, base_ms, setup, report)
        stream["read_s"] = time.perf_counter() - t0
        evaluated = evals[setup.warmup_windows :]
        n_eval = sum(len(w.labels) for w in evaluated)
        pos_eval = sum(float(w.labels.sum()) for w in evaluated)
        stream.update(
            {
                "clicks": sum(len(w.labels) for w in evals),
                "eval_clicks": n_eval,
                "eval_positive_rate": pos_eval / n_eval if n_eval else math.nan,
                "bad_lines": report.rejected,
                "bad_examples": report.examples[:3],
            }
        )
        print(
            f"stream: {stream['clicks']:,} clicks over {days:g} days, {n_eval:,} evaluated after "
            f"{warmup:g} warm-up days; eventual positive rate {stream['eval_positive_rate']:.4f} "
            f"(label window {label_days:g} days); {report.summary()}"
        )

        results: dict[str, Result] = {}
        for name in names:
            if name == ORACLE:
                results[name] = run_oracle(setup, evals)
            else:
                results[name] = run_joined(setup, name, path, base_ms, evals)
            r = results[name]
            print(
                f"{name}: {r.seconds:.1f} s, trained {r.trained:,} samples "
                f"({r.positives:,} positive, {r.corrections:,} corrections); daily PCOC "
                f"{r.daily['pcoc']}",
                flush=True,
            )

    table: dict[str, dict[str, object]] = {}
    base_m = results[BASELINE].metrics if BASELINE in results else None
    oracle_m = results[ORACLE].metrics if ORACLE in results else None
    print(
        f"{'strategy':<14}{'AUC':>8}{'PR-AUC':>8}{'logloss':>9}{'PCOC':>7}{'RI AUC':>8}{'RI LL':>8}"
    )
    for name, r in results.items():
        m = r.metrics
        ri_auc = ri_ll = math.nan
        if base_m is not None and oracle_m is not None:
            ri_auc = relative_improvement(m["auc"], base_m["auc"], oracle_m["auc"])
            ri_ll = relative_improvement(m["logloss"], base_m["logloss"], oracle_m["logloss"])
        print(
            f"{name:<14}{m['auc']:>8.4f}{m['pr_auc']:>8.4f}{m['logloss']:>9.4f}"
            f"{m['pcoc']:>7.3f}{ri_auc:>8.3f}{ri_ll:>8.3f}"
        )
        table[name] = {
            **{k: rounded(v) for k, v in m.items()},
            "ri_auc": rounded(ri_auc, 4),
            "ri_logloss": rounded(ri_ll, 4),
            "daily_pcoc": r.daily["pcoc"],
            "daily_auc": r.daily["auc"],
            "trained_samples": r.trained,
            "trained_positives": r.positives,
            "trained_corrections": r.corrections,
            "seconds": round(r.seconds, 2),
        }
    joined = [r.trained / r.seconds for k, r in results.items() if k != ORACLE and r.seconds > 0]
    result = {
        "benchmark": "delayed_feedback",
        "quick": bool(args.quick),
        "data": "file" if args.data is not None else "sim",
        "days": days,
        "warmup_days": warmup,
        "label_window_days": label_days,
        "window_min": args.window_min,
        "wait_min": args.wait_min,
        "impressions_per_day": ipd if args.data is None else None,
        "sim_seed": args.sim_seed if args.data is None else None,
        "delay_preset": args.delay_preset if args.data is None else None,
        "arch": args.arch,
        "embedding_dim": args.embedding_dim,
        "buckets": args.buckets,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "stream": {k: rounded(v) if isinstance(v, float) else v for k, v in stream.items()},
        "joined_samples_per_s_median": round(statistics.median(joined)) if joined else None,
        "strategies": table,
        "goals": goals(results),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
