"""``minutely demo``: two simulated days, a day model, then a day of online learning.

1. Simulate day 1 into the raw topic; the join labels it into the samples topic.
2. Train the day model on day 1's samples (complete labels) and publish it as the base version.
3. Start the inference server; replay day 2 window by window: score the window's impressions
   with the live version (server) and with the frozen day model, then join, test-then-train,
   export every N minutes; the server hot-swaps each new version.
4. Judge both strategies on day 2 against eventual labels; write results.json and a plot.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from minutely.clock import MS_PER_DAY, MS_PER_HOUR
from minutely.config import Config
from minutely.demo.replay import ReplayScorer, eventual_click_labels, score
from minutely.demo.report import format_table, write_plot
from minutely.demo.server import ServerProcess
from minutely.errors import ConfigError, StorageError
from minutely.fsutil import describe_os_error, ensure_writable_dir, replace_atomically
from minutely.model import build_model
from minutely.pipeline.day import train_batch_mode
from minutely.pipeline.runner import OnlinePipeline
from minutely.registry import Registry
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import open_log
from minutely.train import Trainer


def new_run_dir(root: Path) -> Path:
    """A new folder under ``root`` named after the UTC time (``-1``, ``-2``... if taken)."""
    ensure_writable_dir(root, "runs folder")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
        except OSError as exc:
            raise StorageError(
                f"run folder {d}: expected a new folder, got {describe_os_error(exc)}"
            ) from exc
    raise StorageError(f"runs folder {root}: expected a free run folder name, got 1000 taken")


def _check_run_folder(run_dir: Path, resume: bool) -> None:
    """A folder that holds a run is resumed (``resume``) or refused, never run over."""
    if (run_dir / "results.json").exists():
        raise StorageError(
            f"run folder {run_dir}: expected a new or unfinished run, got a finished one "
            "(results.json); choose another folder"
        )
    held = [n for n in ("checkpoints", "registry") if (run_dir / n).is_dir()]
    held += [n for n in ("log.sqlite",) if (run_dir / n).is_file()]
    if held and not resume:
        raise StorageError(
            f"run folder {run_dir}: expected a new folder, got one that holds a run "
            f"({', '.join(held)}); pass --resume to continue it, or choose another folder"
        )
    if resume and not (run_dir / "checkpoints").is_dir():
        raise StorageError(f"run folder {run_dir}: nothing to resume (no checkpoints)")


def _hold_to_checkpoint(registry: Registry, model: str, version: str | None) -> str:
    """Serve ``version``, the online model's latest export, and return it.

    After a resume the registry may also hold versions the crashed run exported after its last
    checkpoint; until the resumed run has adopted them (it exports them again, identical), the
    server is pinned to the version live at that point in the replay, as it was then.
    """
    latest = registry.latest(model)
    if version is None or latest is None:
        raise StorageError(f"registry {registry.root}: expected a version of {model!r}, got none")
    if latest.version != version:
        registry.pin(model, version)
    elif registry.pinned(model) is not None:
        registry.unpin(model)
    return version


def served_versions(
    versions: list[str], ts_ms: np.ndarray, created: dict[str, int]
) -> list[dict[str, Any]]:
    """Each version that answered, with the span of request times it answered for."""
    out: list[dict[str, Any]] = []
    for version, t in zip(versions, ts_ms.tolist(), strict=True):
        if not out or out[-1]["version"] != version:
            out.append(
                {
                    "version": version,
                    "created_ms": created.get(version),
                    "first_request_ms": t,
                    "last_request_ms": t,
                    "requests": 0,
                }
            )
        out[-1]["last_request_ms"] = t
        out[-1]["requests"] += 1
    return out


def run_demo(
    cfg: Config,
    run_dir: Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the demo in ``run_dir`` (a new folder under ``demo.runs_dir`` by default).

    A folder that already holds a run is refused unless ``resume``: then the run continues from
    its last checkpoint (the scores of the windows replayed before it are kept in
    ``scores/``), and ends as an uninterrupted run would.
    """
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    model_cfg = cfg.model(cfg.demo.model)
    if model_cfg.label != "click":
        raise ConfigError("demo.model", "a model whose label is 'click'", cfg.demo.model)
    if MS_PER_DAY % (cfg.train.window_s * 1000):
        raise ConfigError("train.window_s", "a divisor of 86400 for the demo", cfg.train.window_s)
    if resume and run_dir is None:
        raise ConfigError("--resume", "a --run-dir to resume", None)
    run_dir = run_dir if run_dir is not None else new_run_dir(Path(cfg.demo.runs_dir))
    _check_run_folder(run_dir, resume)
    # Every folder the run writes is checked now, not when the first write fails mid-run.
    ensure_writable_dir(run_dir, "run folder")
    ensure_writable_dir(run_dir / cfg.export.registry_dir, "registry folder")
    ensure_writable_dir(run_dir / "checkpoints", "checkpoint folder")
    echo(f"minutely demo: run folder {run_dir}")
    schema = default_schema()
    market = Market(cfg.sim, schema)
    log = open_log(cfg.stream, run_dir)
    registry = Registry(run_dir / cfg.export.registry_dir)
    model = build_model(model_cfg, schema)
    trainer = Trainer(model, cfg.train)
    start = cfg.sim.start_ms
    online_start = start + (cfg.demo.days - 1) * MS_PER_DAY
    window_ms = cfg.train.window_s * 1000
    pipe = OnlinePipeline(
        cfg,
        model_cfg,
        schema,
        log,
        market,
        registry,
        model,
        trainer,
        run_dir / "checkpoints",
        start,
        corrupt_every=cfg.demo.corrupt_every,
        resume=resume,
    )
    scores_dir = run_dir / "scores"
    scores_dir.mkdir(exist_ok=True)
    history_ticks = list(range(start + MS_PER_HOUR, online_start + 1, MS_PER_HOUR))
    online_ticks = list(range(online_start + window_ms, online_start + MS_PER_DAY + 1, window_ms))
    timings: dict[str, float] = {}
    bar = tqdm(
        total=len(history_ticks) + len(online_ticks),
        disable=not progress,
        unit="win",
        dynamic_ncols=True,
    )
    try:
        # 1. history: events in, joined into samples; nothing trains yet.
        t0 = time.perf_counter()
        bar.set_description("day 1: simulate + join")
        for end in history_ticks:
            if end > pipe.now_ms:
                pipe.tick(end, train=False, export=False)
            bar.update()
        timings["history_s"] = time.perf_counter() - t0

        # 2. the day model, on the complete day.
        t0 = time.perf_counter()
        bar.set_description("day model: train")
        day_file = run_dir / "day_model.json"
        if pipe.exporter.state.base_version is None:
            day_report = train_batch_mode(
                trainer, pipe.samples, online_start, cfg.train.day_epochs, cfg.train.seed
            )
            base = pipe.exporter.export(
                model,
                online_start,
                trainer.samples_seen,
                {"train_auc": day_report.train_auc, "train_logloss": day_report.train_logloss},
                as_base=True,
            )
            pipe.checkpoint()  # a resume starts online learning from the trained day model
            day_model = copy.deepcopy(model).eval()
            day_info = {
                "version": base.version,
                "train_samples": day_report.samples,
                "train_auc": day_report.train_auc,
            }
            day_file.write_text(json.dumps(day_info))
        else:  # resumed after the day model: the frozen day model is the registry's base
            day_info = json.loads(day_file.read_text())
            base, weights = registry.load(
                model_cfg.name, day_info["version"], expected_fingerprint=None
            )
            day_model = build_model(model_cfg, schema)
            day_model.load_state_dict(weights)
            day_model.eval()
        timings["day_model_s"] = time.perf_counter() - t0

        # 3. online: the live version serves, the model keeps learning, versions roll out.
        t0 = time.perf_counter()
        bar.set_description("day 2: online")
        live = _hold_to_checkpoint(registry, model_cfg.name, pipe.exporter.state.last_version)
        with ServerProcess(
            registry.root, [model_cfg.name], run_dir, cfg.serve.poll_interval_s, cfg.serve.host
        ) as server:
            server.wait_for_version(model_cfg.name, live)
            scorer = ReplayScorer(
                server, model_cfg.name, day_model, schema, model_cfg.buckets, cfg.demo.score_batch
            )
            # When each version was created (pruned ones too): kept for a resume.
            created_file = run_dir / "created.json"
            created: dict[str, int] = {base.version: base.created_ms}
            if created_file.exists():
                created.update(json.loads(created_file.read_text()))
            for end in online_ticks:
                saved = scores_dir / f"{end}.npz"
                if end <= pipe.now_ms:  # replayed before the resume
                    scorer.scores.load(saved)
                    bar.update()
                    continue
                saved.unlink(missing_ok=True)
                first = (len(scorer.scores.imp_ids), len(scorer.scores.versions))
                res = pipe.tick(end, on_events=scorer.score_window)
                scorer.scores.save_since(saved, *first)
                if res.exported is not None:
                    created[res.exported.version] = res.exported.created_ms
                    replace_atomically(created_file, json.dumps(created).encode())
                    _hold_to_checkpoint(registry, model_cfg.name, res.exported.version)
                    server.wait_for_version(model_cfg.name, res.exported.version)
                bar.update()
        timings["online_s"] = time.perf_counter() - t0
    finally:
        bar.close()
        pipe.close()
        log.close()

    # 4. judge both strategies on the last day.
    s = scorer.scores
    imp_ids = np.concatenate(s.imp_ids)
    ts = np.concatenate(s.ts_ms)
    truth = market.simulate_day(cfg.demo.days - 1)
    labels = eventual_click_labels(
        truth.imp_id,
        truth.imp_ts_ms,
        truth.click_imp_id,
        truth.click_ts_ms,
        model_cfg.attribution_window_s * 1000,
        imp_ids,
    )
    online = np.concatenate(s.online)
    day_only = np.concatenate(s.day_only)
    hours = (ts - online_start) // MS_PER_HOUR
    hourly = []
    for h in range(24):
        m = hours == h
        hourly.append(
            {
                "hour": h,
                "n": int(m.sum()),
                "day_only_auc": score(day_only[m], labels[m])["auc"],
                "online_auc": score(online[m], labels[m])["auc"],
            }
        )
    timings["total_s"] = time.perf_counter() - t_start
    stats = pipe.join.stats
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": model_cfg.name,
        "impressions_scored": len(imp_ids),
        "day_model": {
            "version": day_info["version"],
            "train_samples": day_info["train_samples"],
            "train_auc": day_info["train_auc"],
        },
        "strategies": {
            "day_only": {**score(day_only, labels), "versions_served": 1},
            "online": {**score(online, labels), "versions_served": len(set(s.versions))},
        },
        "hourly": hourly,
        "served": served_versions(s.versions, ts, created),
        "pipeline": {
            "raw_events": stats.events,
            "samples": stats.samples,
            "dead_letters": stats.dead_letters,
            "dead_letters_by_reason": stats.dead_letters_by_reason,
            "late_events": stats.late,
            "malformed_injected": pipe.source.corrupted,
            "versions_exported": pipe.exporter.state.exported,
        },
        "timings_s": timings,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    write_plot(hourly, run_dir / "auc_per_hour.png")
    echo(format_table(results))
    echo(f"results: {run_dir / 'results.json'}  plot: {run_dir / 'auc_per_hour.png'}")
    return results
