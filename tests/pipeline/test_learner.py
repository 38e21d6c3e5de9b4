from pathlib import Path

import torch

from minutely.config import ModelConfig, TrainConfig
from minutely.data import encode_batch, samples_to_record_batch
from minutely.data.samples import Sample
from minutely.model import build_model
from minutely.pipeline.learner import OnlineLearner, SampleWindows
from minutely.schema import default_schema
from minutely.stream import SqliteLog
from minutely.train import Trainer

FEATURES: dict[str, int | float | list[int]] = {
    "user_id": 1,
    "ad_id": 2,
    "campaign_id": 3,
    "advertiser_id": 4,
    "category": 5,
    "slot": 0,
    "device": 1,
    "hour_of_day": 3,
    "user_interests": [5],
    "ad_age_hours": 1.0,
    "user_activity": 2.0,
    "ad_ctr_1h": 0.03,
}


def sample(sid: int, emit: int, label: int, correction: bool = False) -> Sample:
    return Sample(sid, 0, emit, label, correction, emit if label else -1, FEATURES)


def test_windows_score_each_sample_once_and_train_on_corrections(tmp_path: Path) -> None:
    torch.manual_seed(0)
    schema = default_schema()
    cfg = ModelConfig(buckets=64, embedding_dim=2, hidden=(4,))
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic(cfg.samples_topic, 2)
    first = [sample(1, 100, 0), sample(2, 200, 1), sample(3, 250, 0)]
    later = [sample(1, 400, 1, correction=True), sample(4, 450, 0)]
    for part, batch in ((0, first), (1, later)):
        rb = samples_to_record_batch(batch, schema)
        log.append(cfg.samples_topic, [(None, encode_batch(rb), batch[-1].emit_ts_ms)], part)
    trainer = Trainer(build_model(cfg, schema), TrainConfig(batch_size=2))
    learner = OnlineLearner(trainer, SampleWindows(log, cfg, schema, 2), TrainConfig())
    w1 = learner.run_window(0, 300)
    assert (w1.n, w1.positives) == (3, 1)
    w2 = learner.run_window(300, 600)
    assert (w2.n, w2.positives) == (1, 0)  # the correction is trained on, not scored again
    assert trainer.samples_seen == 5
    assert learner.windows.positions() == {0: 1, 1: 1}
    assert learner.run_window(600, 900).n == 0
    log.close()
