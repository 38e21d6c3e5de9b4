"""``minutely demo``: two simulated days, a day model per model, then a day of online learning.

The demo trains every configured model (or those ``demo.models`` names) from one raw stream, each
with its own attribution window and correction horizon: by default pCTR (``ctr``: a click within
10 minutes of the impression) and pCVR (``cvr``: a conversion within an hour of the click).

1. Simulate day 1 into the raw topic; the join labels it into each model's samples topic.
2. The cut at the start of day 2 (``OnlinePipeline.cut``): each model's batch model trains on
   day 1's samples (complete labels) and is published as a warm-start version; the online model
   and the hourly model restart from it (weights and optimizer state).
3. Start the inference server (serving every model); replay day 2 window by window (the
   pipeline's schedule, export gate and monitor as configured): score the window's requests of
   each model (pCTR: every impression; pCVR: every click) with three strategies, then join,
   test-then-train, and export when the policy and the gate allow, per model:

   * ``day_only``: the frozen day model (the cut's version), in-process;
   * ``hourly``: the hourly model as it stands at request time, in-process: restarted from the
     day model at the cut and trained at the end of every hour on that hour's samples;
   * ``online``: the version live at request time, through the server, which hot-swaps every
     version published, rolled back to or made at a cut before the next window is scored.
4. Judge the three strategies of every model on day 2 against eventual labels; write
   results.json (with the exporter's and the monitor's counts and the rollback events) and a
   plot with one panel per model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from minutely.clock import MS_PER_DAY, MS_PER_HOUR
from minutely.config import Config, ModelConfig
from minutely.demo.replay import (
    POPULATION,
    ReplayScorer,
    ScoredModel,
    eventual_click_labels,
    eventual_conversion_labels,
    score,
)
from minutely.demo.report import format_table, write_plot
from minutely.demo.server import ServerProcess
from minutely.errors import CheckpointError, ConfigError, StorageError
from minutely.fsutil import describe_os_error, ensure_writable_dir, replace_atomically
from minutely.model import CtrModel
from minutely.model.artifact import load_model
from minutely.pipeline.model_loop import EVENTS_FILE, ModelLoop
from minutely.pipeline.monitor import read_events
from minutely.pipeline.origin import key_paths, publisher_registry, registry_location
from minutely.pipeline.runner import OnlinePipeline
from minutely.registry import Registry
from minutely.schema import default_schema
from minutely.sim import IMP_ID_STRIDE, Market
from minutely.stream import open_log

# The eventual labels each model is judged on, by label; known only after the run. The first
# ends with the model's attribution window; the final label also counts the actions its
# corrections bring within the correction horizon, the label a "pu" model is trained towards.
JUDGED_ON = {
    "click": "a click within {window} s of the impression ({what}), eventual",
    "conversion": "a conversion within {window} s of the click ({what}), eventual",
}
WINDOW = "its attribution window"
STRATEGY_KEYS = ("day_only", "hourly", "online")
FINAL = "attribution window + correction horizon"


def demo_models(cfg: Config) -> list[str]:
    """The models the demo trains: ``demo.models``, or every configured model."""
    return list(cfg.demo.models) if cfg.demo.models is not None else [m.name for m in cfg.models]


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


def live_version(loop: ModelLoop) -> str | None:
    """The version ``loop`` has serving: its live version (the last one published, rolled back
    to or made at a cut), else the exporter's last version."""
    return loop.live.version if loop.live is not None else loop.exporter.state.last_version


def _hold_to_checkpoint(registry: Registry, model: str, version: str | None) -> str:
    """Serve ``version``, the model's live version (:func:`live_version`), and return it.

    After a resume the registry may also hold versions the crashed run exported after its last
    checkpoint; until the resumed run has adopted them (it exports them again, identical), the
    server is pinned to the version live at that point in the replay, as it was then. A version
    rolled back to is older than the latest: it stays pinned, as the loop pinned it.
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
    transform: Callable[[str, int, pa.Table], pa.Table] | None = None,
) -> dict[str, Any]:
    """Run the demo in ``run_dir`` (a new folder under ``demo.runs_dir`` by default).

    A folder that already holds a run is refused unless ``resume``: then the run continues from
    its last checkpoint (the scores of the windows replayed before it are kept in
    ``scores/``), and ends as an uninterrupted run would. ``transform(model, end_ms, table)``
    rewrites each online window's samples before the model sees them (the pipeline's fault
    injection hook, for tests and experiments: a label shift the monitor rolls back).
    """
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    names = demo_models(cfg)
    if MS_PER_DAY % (cfg.train.window_s * 1000):
        raise ConfigError("train.window_s", "a divisor of 86400 for the demo", cfg.train.window_s)
    if resume and run_dir is None:
        raise ConfigError("--resume", "a --run-dir to resume", None)
    run_dir = run_dir if run_dir is not None else new_run_dir(Path(cfg.demo.runs_dir))
    _check_run_folder(run_dir, resume)
    # Every folder the run writes is checked now, not when the first write fails mid-run.
    ensure_writable_dir(run_dir, "run folder")
    location = registry_location(cfg, run_dir)
    if isinstance(location, Path):
        ensure_writable_dir(location, "registry folder")
    ensure_writable_dir(run_dir / "checkpoints", "checkpoint folder")
    echo(f"minutely demo: run folder {run_dir} (models {', '.join(names)})")
    schema = default_schema()
    market = Market(cfg.sim, schema)
    log = open_log(cfg.stream, run_dir)
    registry = publisher_registry(cfg, run_dir)
    start = cfg.sim.start_ms
    online_start = start + (cfg.demo.days - 1) * MS_PER_DAY
    window_ms = cfg.train.window_s * 1000
    pipe = OnlinePipeline(
        cfg,
        schema,
        log,
        market,
        registry,
        run_dir / "checkpoints",
        start,
        models=names,
        corrupt_every=cfg.demo.corrupt_every,
        resume=resume,
        hourly_shadow=True,
        transform=transform,
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

        # 2. the cut: a day model per model, on the complete day; online and hourly models
        # restart from it.
        t0 = time.perf_counter()
        bar.set_description("day models: train")
        day_info, day_models = _day_models(pipe, registry, run_dir, online_start)
        timings["day_model_s"] = time.perf_counter() - t0

        # 3. online: the live versions serve, the models keep learning, versions roll out.
        t0 = time.perf_counter()
        bar.set_description("day 2: online")
        live = {
            name: _hold_to_checkpoint(registry, name, live_version(loop))
            for name, loop in pipe.models.items()
        }
        with ServerProcess(
            registry.root,
            names,
            run_dir,
            cfg.serve.poll_interval_s,
            cfg.serve.host,
            public_key=key_paths(cfg, run_dir)[1],
        ) as server:
            for name, version in live.items():
                server.wait_for_version(name, version)
            scorer = ReplayScorer(
                server,
                market,
                schema,
                [
                    ScoredModel(loop.cfg, day_models[name], loop.hourly_model)
                    for name, loop in pipe.models.items()
                ],
                cfg.demo.score_batch,
            )
            # When each version was created (pruned ones too): kept for a resume.
            created_file = run_dir / "created.json"
            created: dict[str, dict[str, int]] = {
                name: {day_info[name]["version"]: day_info[name]["created_ms"]} for name in names
            }
            if created_file.exists():
                for name, versions in json.loads(created_file.read_text()).items():
                    created[name].update(versions)
            for end in online_ticks:
                saved = scores_dir / f"{end}.npz"
                if end <= pipe.now_ms:  # replayed before the resume
                    scorer.load(saved)
                    bar.update()
                    continue
                saved.unlink(missing_ok=True)
                mark = scorer.mark()
                res = pipe.tick(end, on_events=scorer.score_window)
                scorer.save_since(saved, mark)
                published = list(res.exported.items())
                published += [(n, c.version) for n, cs in res.cuts.items() for c in cs]
                if published:
                    for name, m in published:
                        created[name][m.version] = m.created_ms
                    replace_atomically(created_file, json.dumps(created).encode())
                # A new export, a rollback (the outcome's rolled_back_to) or a cut changes the
                # loop's live version: the server serves it before the next window is scored.
                now_live = {name: live_version(loop) for name, loop in pipe.models.items()}
                changed = {
                    name: v for name, v in now_live.items() if v is not None and v != live[name]
                }
                for name, v in changed.items():
                    live[name] = _hold_to_checkpoint(registry, name, v)
                for name, v in changed.items():
                    server.wait_for_version(name, v)
                bar.update()
        timings["online_s"] = time.perf_counter() - t0
    finally:
        bar.close()
        pipe.close()
        log.close()

    # 4. judge the three strategies of every model on the last day.
    events = _rollback_events(run_dir)
    models: dict[str, Any] = {}
    for name, loop in pipe.models.items():
        requests = scorer.scores[name].arrays()
        mc = loop.cfg
        window_s = mc.attribution_window_s
        final_s = window_s + mc.correction_horizon_s
        labels = _eventual_labels(market, mc, requests, cfg.demo.days - 1, window_s)
        final = _eventual_labels(market, mc, requests, cfg.demo.days - 1, final_s)
        info = day_info[name]
        models[name] = {
            "label": mc.label,
            "loss": mc.loss,
            "attribution_window_s": window_s,
            "correction_horizon_s": mc.correction_horizon_s,
            "population": POPULATION[mc.label],
            "judged_on": JUDGED_ON[mc.label].format(window=window_s, what=WINDOW),
            "requests": len(labels),
            "day_model": {
                key: info[key]
                for key in ("version", "created_ms", "train_samples", "train_auc", "train_logloss")
            },
            **_judge(requests, labels, online_start, created[name]),
            "final_label": {
                "judged_on": JUDGED_ON[mc.label].format(window=final_s, what=FINAL),
                "strategies": {key: score(requests[key], final) for key in STRATEGY_KEYS},
            },
            "samples_trained_online": loop.trainer.samples_seen - info["samples_seen"],
            "versions_exported": loop.exporter.state.exported,
            "gate": {
                "exported": loop.exporter.state.exported,
                "refused": loop.exporter.state.refused,
                "skipped": loop.exporter.state.skipped,
                "last_refusal": loop.exporter.state.last_refusal,
            },
            "monitor": {
                "rollbacks": loop.rollbacks,
                "events": [e for e in events if e["model"] == name],
            },
        }
    timings["total_s"] = time.perf_counter() - t_start
    stats = pipe.join.stats
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "models": models,
        "pipeline": {
            "raw_events": stats.events,
            "samples": stats.samples,
            "dead_letters": stats.dead_letters,
            "dead_letters_by_reason": stats.dead_letters_by_reason,
            "late_events": stats.late,
            "malformed_injected": pipe.source.corrupted,
            "versions_exported": {n: lp.exporter.state.exported for n, lp in pipe.models.items()},
        },
        "timings_s": timings,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    write_plot({n: m["hourly"] for n, m in models.items()}, run_dir / "auc_per_hour.png")
    echo(format_table(results))
    echo(f"results: {run_dir / 'results.json'}  plot: {run_dir / 'auc_per_hour.png'}")
    return results


def _day_models(
    pipe: OnlinePipeline, registry: Registry, run_dir: Path, online_start: int
) -> tuple[dict[str, dict[str, Any]], dict[str, CtrModel]]:
    """Each model's day model: the cut at ``online_start`` (:meth:`OnlinePipeline.cut`) trains
    its batch model on every sample before it and publishes it as a warm-start version, from
    which the online and hourly models restart; after a resume past the cut, ``day_models.json``
    names it. Returns what ``day_models.json`` records of them and each one, read back from the
    registry (the loop's warm-start version moves on at later cuts; the day model stays)."""
    day_file = run_dir / "day_models.json"
    info: dict[str, dict[str, Any]] = {}
    if day_file.exists():
        info = json.loads(day_file.read_text())
    cuts = pipe.cut(online_start)
    for name, cut in cuts.items():
        info[name] = {
            "version": cut.version.version,
            "created_ms": cut.version.created_ms,
            "samples_seen": pipe.models[name].trainer.samples_seen,
            "train_samples": cut.report.samples,
            "train_auc": cut.report.train_auc,
            "train_logloss": cut.report.train_logloss,
        }
    if cuts:
        # Recorded before the checkpoint: a resume past the cut always finds the day models.
        replace_atomically(day_file, json.dumps(info).encode())
        pipe.checkpoint()  # a resume starts online learning from the day models
    frozen: dict[str, CtrModel] = {}
    for name in pipe.models:
        if name not in info:
            raise CheckpointError(
                f"resume: {day_file}: expected the day model of {name!r}, got none"
            )
        _, frozen[name] = load_model(
            registry, name, info[name]["version"], expected_fingerprint=pipe.schema.fingerprint()
        )
    return info, frozen


def _rollback_events(run_dir: Path) -> list[dict[str, Any]]:
    """The rollback events of the run (``events.jsonl``), oldest first. A resumed run records
    again the events its crashed predecessor recorded after the last checkpoint, identical
    (the replay is deterministic): each is kept once."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for event in read_events(run_dir / EVENTS_FILE):
        line = event.to_json()
        if line not in seen:
            seen.add(line)
            out.append(json.loads(line))
    return out


def _eventual_labels(
    market: Market,
    model_cfg: ModelConfig,
    requests: dict[str, np.ndarray],
    day: int,
    window_s: int,
) -> np.ndarray:
    """Each request's eventual label over ``window_s``: for a click model, whether the
    impression (of ``day``) was clicked within it; for a conversion model, whether the clicked
    impression converted within it after the click (the request's time)."""
    window_ms = window_s * 1000
    if model_cfg.label == "click":
        truth = market.simulate_day(day)
        return eventual_click_labels(
            truth.imp_id,
            truth.imp_ts_ms,
            truth.click_imp_id,
            truth.click_ts_ms,
            window_ms,
            requests["imp_ids"],
        )
    days = np.unique(requests["imp_ids"] // IMP_ID_STRIDE).tolist()
    traffic = [market.simulate_day(int(d)) for d in days]
    conv_ids = np.concatenate([t.conv_imp_id for t in traffic] or [np.zeros(0, np.int64)])
    conv_ts = np.concatenate([t.conv_ts_ms for t in traffic] or [np.zeros(0, np.int64)])
    return eventual_conversion_labels(
        conv_ids, conv_ts, window_ms, requests["imp_ids"], requests["ts_ms"]
    )


def _judge(
    requests: dict[str, np.ndarray],
    labels: np.ndarray,
    online_start: int,
    created: dict[str, int],
) -> dict[str, Any]:
    """The three strategies over the day, AUC per hour of request time, and the versions
    served. The hourly strategy's "versions" are its models by hour (it is trained at the end
    of every hour)."""
    ts = requests["ts_ms"]
    versions = [str(v) for v in requests["versions"].tolist()]
    hours = (ts - online_start) // MS_PER_HOUR
    hourly = []
    for h in range(24):
        m = hours == h
        hourly.append(
            {
                "hour": h,
                "n": int(m.sum()),
                **{
                    f"{key}_auc": score(requests[key][m], labels[m])["auc"] for key in STRATEGY_KEYS
                },
            }
        )
    served = {"day_only": 1, "hourly": len(np.unique(hours)), "online": len(set(versions))}
    return {
        "strategies": {
            key: {**score(requests[key], labels), "versions_served": served[key]}
            for key in STRATEGY_KEYS
        },
        "hourly": hourly,
        "served": served_versions(versions, ts, created),
    }
