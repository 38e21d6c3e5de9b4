"""The replay protocol: every impression scored by the version live when it arrived.

Impressions of each window are sent, as requests, to the running inference server before any
stage has seen that window, so the answer comes from the version that was live at request time;
the frozen day model scores the same impressions in-process (the "day model only" strategy).
Both are judged later against each impression's eventual label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minutely.data import instances_to_tensors
from minutely.demo.server import ServerProcess
from minutely.evaluate import AUC, PCOC, LogLoss
from minutely.model import CtrModel
from minutely.schema import Schema
from minutely.sim import IMPRESSION, EventBatch


@dataclass
class ReplayScores:
    imp_ids: list[np.ndarray] = field(default_factory=list)
    ts_ms: list[np.ndarray] = field(default_factory=list)
    online: list[np.ndarray] = field(default_factory=list)
    day_only: list[np.ndarray] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)

    def save_since(self, path: Path, first_chunk: int, first_version: int) -> None:
        """Write the chunks from ``first_chunk`` (and versions from ``first_version``) to
        ``path`` (npz, replaced atomically): one window's scores, kept for a resume."""
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            np.savez(
                f,
                imp_ids=_cat(self.imp_ids[first_chunk:], np.int64),
                ts_ms=_cat(self.ts_ms[first_chunk:], np.int64),
                online=_cat(self.online[first_chunk:], np.float64),
                day_only=_cat(self.day_only[first_chunk:], np.float64),
                versions=np.array(self.versions[first_version:], dtype=str),
            )
        tmp.replace(path)

    def load(self, path: Path) -> None:
        """Append the scores :meth:`save_since` wrote to ``path``."""
        with np.load(path) as z:
            self.imp_ids.append(z["imp_ids"])
            self.ts_ms.append(z["ts_ms"])
            self.online.append(z["online"])
            self.day_only.append(z["day_only"])
            self.versions.extend(str(v) for v in z["versions"].tolist())


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


class ReplayScorer:
    """Scores each window's impressions through the server and with the frozen day model."""

    def __init__(
        self,
        server: ServerProcess,
        model_name: str,
        day_model: CtrModel,
        schema: Schema,
        buckets: int,
        batch: int,
    ) -> None:
        self._server = server
        self._name = model_name
        self._day_model = day_model
        self._schema = schema
        self._buckets = buckets
        self._batch = batch
        self.scores = ReplayScores()

    def score_window(self, events: EventBatch) -> None:
        is_imp = events.kind == IMPRESSION
        imp_ids = events.imp_id[is_imp]
        imp_ts = events.ts_ms[is_imp]
        instances: list[dict[str, Any]] = list(events.feature_dicts())
        for i in range(0, len(instances), self._batch):
            chunk = instances[i : i + self._batch]
            version, preds = self._server.predict(self._name, chunk)
            day = self._day_model.predict(instances_to_tensors(chunk, self._schema, self._buckets))
            s = self.scores
            s.imp_ids.append(np.asarray(imp_ids[i : i + self._batch], dtype=np.int64))
            s.ts_ms.append(np.asarray(imp_ts[i : i + self._batch], dtype=np.int64))
            s.online.append(np.asarray(preds, dtype=np.float64))
            s.day_only.append(day.detach().numpy().astype(np.float64))
            s.versions.extend([version] * len(chunk))


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


def score(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {"n": float(len(labels)), "positives": float(labels.sum())}
    for name, metric in (("auc", AUC()), ("logloss", LogLoss()), ("pcoc", PCOC())):
        metric.update(preds, labels)
        out[name] = float(metric.get())
    return out
