"""The replay protocol: every request answered by the version live when it arrived.

Each model scores its own population, as its requests would reach a server: a click model
(pCTR) every impression, when the impression arrives; a conversion model (pCVR) every clicked
impression, when its click arrives (the impression's features are those it was served with, looked
up by impression id as an ad server looks up its impression log). The requests of a window are
sent to the running inference server before any stage has seen that window, so each answer
comes from the version that was live at request time (the "online" strategy). In-process, the
model's frozen day model scores the same requests (the "day model only" strategy), and so does
its hourly model as it stands at request time (the "hourly" strategy: a model the pipeline
trains in place at the end of every hour). All are judged after the run against each request's
eventual label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minutely.config import ModelConfig
from minutely.data import instances_to_tensors
from minutely.demo.server import ServerProcess
from minutely.evaluate import AUC, PCOC, LogLoss
from minutely.model import CtrModel
from minutely.schema import Schema
from minutely.sim import CLICK, IMP_ID_STRIDE, IMPRESSION, EventBatch, Features, Market

# What each label's model is asked about, and when.
POPULATION = {
    "click": "every impression, scored when it arrived",
    "conversion": "every clicked impression, scored when its click arrived",
}


@dataclass
class ReplayScores:
    """One model's requests: impression id, request time, the live version's (the server's
    answer), the day model's and the hourly model's predictions (``nan`` when the model has no
    hourly model), and the version that answered."""

    imp_ids: list[np.ndarray] = field(default_factory=list)
    ts_ms: list[np.ndarray] = field(default_factory=list)
    online: list[np.ndarray] = field(default_factory=list)
    day_only: list[np.ndarray] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    hourly: list[np.ndarray] = field(default_factory=list)

    def mark(self) -> tuple[int, int]:
        """The position :meth:`since` counts from: (chunks so far, versions so far)."""
        return len(self.imp_ids), len(self.versions)

    def since(self, mark: tuple[int, int]) -> dict[str, np.ndarray]:
        """The requests added after ``mark``, as arrays."""
        first_chunk, first_version = mark
        return {
            "imp_ids": _cat(self.imp_ids[first_chunk:], np.int64),
            "ts_ms": _cat(self.ts_ms[first_chunk:], np.int64),
            "online": _cat(self.online[first_chunk:], np.float64),
            "day_only": _cat(self.day_only[first_chunk:], np.float64),
            "hourly": _cat(self.hourly[first_chunk:], np.float64),
            "versions": np.array(self.versions[first_version:], dtype=str),
        }

    def extend(self, arrays: dict[str, np.ndarray]) -> None:
        """Append requests in the form :meth:`since` returns."""
        self.imp_ids.append(arrays["imp_ids"])
        self.ts_ms.append(arrays["ts_ms"])
        self.online.append(arrays["online"])
        self.day_only.append(arrays["day_only"])
        self.hourly.append(arrays["hourly"])
        self.versions.extend(str(v) for v in arrays["versions"].tolist())

    def arrays(self) -> dict[str, np.ndarray]:
        """Every request so far, as arrays."""
        return self.since((0, 0))


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class ScoredModel:
    """A model the replay asks about: its config (label, buckets), its frozen day model and,
    optionally, its hourly model (scored as it stands when each request arrives: the caller
    trains it in place)."""

    cfg: ModelConfig
    day_model: CtrModel
    hourly_model: CtrModel | None = None


class ReplayScorer:
    """Scores each window's requests through the server and, in-process, with the frozen day
    models and the hourly models."""

    def __init__(
        self,
        server: ServerProcess,
        market: Market,
        schema: Schema,
        models: Sequence[ScoredModel],
        batch: int,
    ) -> None:
        unknown = [m.cfg.label for m in models if m.cfg.label not in POPULATION]
        if unknown:
            raise ValueError(
                f"ReplayScorer: expected models labeled one of {sorted(POPULATION)}, "
                f"got {unknown[0]!r}"
            )
        self._server = server
        self._market = market
        self._schema = schema
        self._models = list(models)
        self._batch = batch
        self.scores: dict[str, ReplayScores] = {m.cfg.name: ReplayScores() for m in models}

    def mark(self) -> dict[str, tuple[int, int]]:
        """Every model's :meth:`ReplayScores.mark`."""
        return {name: s.mark() for name, s in self.scores.items()}

    def save_since(self, path: Path, mark: dict[str, tuple[int, int]]) -> None:
        """Write every model's requests after ``mark`` to ``path`` (npz, replaced atomically):
        one window's scores, kept for a resume."""
        # Any: numpy's stubs type savez's keyword arrays as its own options.
        arrays: dict[str, Any] = {
            f"{name}.{key}": value
            for name, s in self.scores.items()
            for key, value in s.since(mark[name]).items()
        }
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        """Append the scores :meth:`save_since` wrote to ``path``."""
        with np.load(path) as z:
            for name, s in self.scores.items():
                keys = ("imp_ids", "ts_ms", "online", "day_only", "hourly", "versions")
                s.extend({k: z[f"{name}.{k}"] for k in keys})

    def score_window(self, events: EventBatch) -> None:
        """Score the window's requests of every model (see the module's docstring)."""
        impressions: tuple[np.ndarray, np.ndarray, list[dict[str, Any]]] | None = None
        clicks: tuple[np.ndarray, np.ndarray, list[dict[str, Any]]] | None = None
        for m in self._models:
            if m.cfg.label == "click":
                if impressions is None:
                    is_imp = events.kind == IMPRESSION
                    impressions = (
                        events.imp_id[is_imp],
                        events.ts_ms[is_imp],
                        list(events.feature_dicts()),
                    )
                self._score(m, *impressions)
            else:
                if clicks is None:
                    is_click = events.kind == CLICK
                    ids = events.imp_id[is_click]
                    clicks = (ids, events.ts_ms[is_click], impression_features(self._market, ids))
                self._score(m, *clicks)

    def _score(
        self,
        m: ScoredModel,
        imp_ids: np.ndarray,
        ts_ms: np.ndarray,
        instances: list[dict[str, Any]],
    ) -> None:
        name, s = m.cfg.name, self.scores[m.cfg.name]
        for i in range(0, len(instances), self._batch):
            chunk = instances[i : i + self._batch]
            version, preds = self._server.predict(name, chunk)
            tensors = instances_to_tensors(chunk, self._schema, m.cfg.buckets)
            day = m.day_model.predict(tensors).numpy().astype(np.float64)
            hourly = (
                np.full(len(chunk), np.nan)
                if m.hourly_model is None
                else m.hourly_model.predict(tensors).numpy().astype(np.float64)
            )
            s.imp_ids.append(np.asarray(imp_ids[i : i + self._batch], dtype=np.int64))
            s.ts_ms.append(np.asarray(ts_ms[i : i + self._batch], dtype=np.int64))
            s.online.append(np.asarray(preds, dtype=np.float64))
            s.day_only.append(day)
            s.hourly.append(hourly)
            s.versions.extend([version] * len(chunk))


def impression_features(market: Market, imp_ids: np.ndarray) -> list[dict[str, Any]]:
    """The features each impression of ``imp_ids`` was served with, in that order.

    Raises ``ValueError`` for an id the market never served.
    """
    out: list[dict[str, Any]] = [{} for _ in range(len(imp_ids))]
    days = imp_ids // IMP_ID_STRIDE
    for day in np.unique(days).tolist():
        where = np.flatnonzero(days == day)
        ids = imp_ids[where]
        rows = ids - day * IMP_ID_STRIDE  # imp_id = day * IMP_ID_STRIDE + row within the day
        traffic = market.simulate_day(int(day)) if day >= 0 else None
        if traffic is None or int(rows.max()) >= len(traffic):
            bad = ids if traffic is None else ids[rows >= len(traffic)]
            raise ValueError(
                f"impression_features: expected ids of impressions the market served, got "
                f"{int(bad[0])}"
            )
        feats = take_rows(traffic.features, market.schema, rows)
        zeros = np.zeros(len(ids), np.uint8)
        batch = EventBatch(market.schema, zeros, ids, np.zeros(len(ids), np.int64), feats)
        for i, row in zip(where.tolist(), batch.feature_dicts(), strict=True):
            out[i] = row
    return out


def take_rows(features: Features, schema: Schema, rows: np.ndarray) -> Features:
    """Rows ``rows`` (any order) of ``features``; jagged columns rebuilt with new offsets."""
    out: Features = {}
    for spec in schema.features:
        col = features[spec.name]
        if spec.kind == "multi_sparse":
            values, offsets = col
            starts, ends = offsets[rows], offsets[rows + 1]
            lengths = ends - starts
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            picks = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
            out[spec.name] = (values[picks], new_offsets)
        else:
            out[spec.name] = col[rows]
    return out


def eventual_click_labels(
    imp_ids: np.ndarray,
    imp_ts: np.ndarray,
    click_imp_ids: np.ndarray,
    click_ts: np.ndarray,
    window_ms: int,
    query: np.ndarray,
) -> np.ndarray:
    """1 where the impression got a click within ``window_ms`` (its attribution window)."""
    order = np.argsort(imp_ids, kind="stable")
    sorted_ids = imp_ids[order]
    pos = np.searchsorted(sorted_ids, click_imp_ids)
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == click_imp_ids
    within = found & (click_ts - imp_ts[order][pos] <= window_ms)
    clicked = np.unique(click_imp_ids[within])
    return np.isin(query, clicked).astype(np.float64)


def eventual_conversion_labels(
    conv_imp_ids: np.ndarray,
    conv_ts: np.ndarray,
    window_ms: int,
    query: np.ndarray,
    query_click_ts: np.ndarray,
) -> np.ndarray:
    """1 where the clicked impression ``query[i]`` converted within ``window_ms`` after its
    click at ``query_click_ts[i]`` (the conversion model's attribution window)."""
    if len(conv_imp_ids) == 0:
        return np.zeros(len(query), dtype=np.float64)
    order = np.argsort(conv_imp_ids, kind="stable")
    sorted_ids = conv_imp_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, query), 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == query
    delay = conv_ts[order][pos] - query_click_ts
    labels: np.ndarray = (found & (delay >= 0) & (delay <= window_ms)).astype(np.float64)
    return labels


def score(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {"n": float(len(labels)), "positives": float(labels.sum())}
    for name, metric in (("auc", AUC()), ("logloss", LogLoss()), ("pcoc", PCOC())):
        metric.update(preds, labels)
        out[name] = float(metric.get())
    return out
