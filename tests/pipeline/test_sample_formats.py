"""Every sample format trains end to end: the same replay through the join and the trainer in
Arrow batches, one tf.train.Example per message and TFRecord-framed Examples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_helpers import SMALL, make_pipeline
from tfrecord import example_pb2 as reference

from minutely.clock import MS_PER_HOUR
from minutely.config import load_config
from minutely.data import decode_batch
from minutely.data.example import split_tfrecords
from minutely.schema import default_schema
from minutely.stream import SqliteLog

pytestmark = pytest.mark.integration

WINDOW = 300_000


def run(
    tmp_path: Path, fmt: str
) -> tuple[list[tuple[int, float]], dict[str, torch.Tensor], SqliteLog]:
    models = [dict(m, samples={"format": fmt}) for m in SMALL["models"]]
    cfg = load_config(None, {**SMALL, "models": models})
    pipe, log = make_pipeline(cfg, tmp_path / fmt, models=["ctr"])
    for h in range(1, 4):
        pipe.tick(cfg.sim.start_ms + h * MS_PER_HOUR, train=False, export=False)
    windows = []
    for i in range(6):
        end = cfg.sim.start_ms + 3 * MS_PER_HOUR + (i + 1) * WINDOW
        w = pipe.tick(end).windows["ctr"]
        windows.append((w.n, -1.0 if math.isnan(w.auc) else w.auc))
    state = {
        k: v.detach().clone() for k, v in pipe.models["ctr"].trainer.model.state_dict().items()
    }
    return windows, state, log


def messages(log: SqliteLog, topic: str) -> list[bytes]:
    out: list[bytes] = []
    for p in range(log.partitions(topic)):
        out += [r.value for r in log.read(topic, p, 0, 1_000_000) if r.value]
    return out


def test_example_and_tfrecord_samples_train_exactly_as_arrow_batches(tmp_path: Path) -> None:
    runs: dict[str, Any] = {fmt: run(tmp_path, fmt) for fmt in ("arrow", "example", "tfrecord")}
    arrow_windows, arrow_state, arrow_log = runs["arrow"]
    assert sum(n for n, _ in arrow_windows) > 500  # the replay trained on real traffic
    for fmt in ("example", "tfrecord"):
        windows, state, _ = runs[fmt]
        assert windows == arrow_windows, fmt
        for name, tensor in arrow_state.items():
            assert torch.equal(state[name], tensor), (fmt, name)
    # Each log holds its own format: Arrow batches, Examples TensorFlow's proto parses, and
    # TFRecord framing around such Examples.
    schema = default_schema()
    arrow_msgs = messages(arrow_log, "samples.ctr")
    samples = sum(decode_batch(m, schema).num_rows for m in arrow_msgs)
    example_msgs = messages(runs["example"][2], "samples.ctr")
    assert len(example_msgs) == samples
    parsed = reference.Example.FromString(example_msgs[0])
    fixed = {"sample_id", "event_ts_ms", "emit_ts_ms", "label", "is_correction", "label_ts_ms"}
    assert set(parsed.features.feature) == fixed | {f.name for f in schema.features}
    assert parsed.features.feature["label"].int64_list.value[0] in (0, 1)
    framed = messages(runs["tfrecord"][2], "samples.ctr")
    assert len(framed) == len(arrow_msgs)
    records = [r for m in framed for r in split_tfrecords(m)[0]]
    assert len(records) == samples
    assert sorted(records) == sorted(example_msgs)
    for _, _, log in runs.values():
        log.close()
