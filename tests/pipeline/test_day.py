"""Batch mode (the day model): a complete slice trains on each sample's final label."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from minutely.config import ModelConfig, TrainConfig
from minutely.data import encode_batch, record_batch_to_tensors, samples_to_record_batch
from minutely.data.samples import Sample
from minutely.model import build_model
from minutely.pipeline.day import final_labels, train_batch_mode
from minutely.pipeline.learner import SampleWindows
from minutely.schema import default_schema
from minutely.stream import SqliteLog
from minutely.train import Trainer


def sample(sid: int, emit: int, label: int, correction: bool = False) -> Sample:
    features: dict[str, int | float | list[int]] = {
        "user_id": sid % 7,
        "ad_id": sid % 5,
        "campaign_id": 3,
        "advertiser_id": 4,
        "category": sid % 3,
        "slot": 0,
        "device": 1,
        "hour_of_day": 3,
        "user_interests": [5, sid % 4],
        "ad_age_hours": 1.0,
        "user_activity": 2.0,
        "ad_ctr_1h": 0.03,
    }
    return Sample(sid, 0, emit, label, correction, emit if label else -1, features)


def test_final_labels_keep_a_corrected_sample_once_as_an_ordinary_positive() -> None:
    table = pa.table(
        {
            "sample_id": [1, 2, 3, 2],
            "label": [0, 0, 1, 1],
            "is_correction": [False, False, False, True],
        }
    )
    out = final_labels(table)
    assert out.column("sample_id").to_pylist() == [1, 3, 2]
    assert out.column("label").to_pylist() == [0, 1, 1]
    assert out.column("is_correction").to_pylist() == [False, False, False]
    assert out.schema == table.schema


def test_a_pu_day_model_trains_as_bce_on_the_final_labels(tmp_path: Path) -> None:
    # Batch mode has dropped the negative a correction superseded, so nothing is left for the
    # pu loss to undo: on a complete slice it must train exactly as bce does.
    schema = default_schema()
    samples = [sample(i, 100 + i, int(i % 4 == 0)) for i in range(1, 40)]
    samples += [sample(i, 500 + i, 1, correction=True) for i in (3, 7, 11, 13)]
    log = SqliteLog(tmp_path / "log.sqlite")
    weights = {}
    for loss in ("bce", "pu"):
        cfg = ModelConfig(name=loss, buckets=64, embedding_dim=2, hidden=(4,), loss=loss)
        log.create_topic(cfg.samples_topic, 1)
        rb = samples_to_record_batch(samples, schema)
        log.append(cfg.samples_topic, [(None, encode_batch(rb), 600)], 0)
        torch.manual_seed(0)
        trainer = Trainer(build_model(cfg, schema), TrainConfig(batch_size=8))
        windows = SampleWindows(log, cfg, schema, 8)
        report = train_batch_mode(trainer, windows, 601, epochs=2, seed=0)
        windows.close()
        assert report.samples == 39  # 43 rows, 4 superseded negatives dropped
        weights[loss] = trainer.model.state_dict()
    for k, v in weights["bce"].items():
        torch.testing.assert_close(weights["pu"][k], v, msg=f"pu and bce differ at {k}")
    log.close()


def test_a_fresh_day_model_starts_from_the_slices_positive_rate(tmp_path: Path) -> None:
    schema = default_schema()
    # 40 samples, 8 positive at first plus 2 corrections: a final rate of 10 / 40
    samples = [sample(i, 100 + i, int(i % 5 == 0)) for i in range(1, 41)]
    samples += [sample(i, 500 + i, 1, correction=True) for i in (1, 2)]
    log = SqliteLog(tmp_path / "log.sqlite")
    train = TrainConfig(batch_size=8, lr=0.0)  # dense weights (the bias) stay where they start
    biases = []
    for fresh in (True, False):
        cfg = ModelConfig(name=f"m{int(fresh)}", buckets=64, embedding_dim=2, hidden=(4,))
        log.create_topic(cfg.samples_topic, 1)
        rb = samples_to_record_batch(samples, schema)
        log.append(cfg.samples_topic, [(None, encode_batch(rb), 600)], 0)
        trainer = Trainer(build_model(cfg, schema), train)
        if not fresh:
            trainer.train_step(record_batch_to_tensors(rb, schema, cfg.buckets))
        windows = SampleWindows(log, cfg, schema, 8)
        train_batch_mode(trainer, windows, 601, epochs=1, seed=0)
        windows.close()
        biases.append(float(trainer.model.bias.detach()))
    assert biases[0] == pytest.approx(math.log(10 / 30))
    assert biases[1] == 0.0  # a model that has trained keeps its own bias
    log.close()
