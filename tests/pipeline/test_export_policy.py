from pathlib import Path

import torch

from minutely.config import ExportConfig, ModelConfig
from minutely.model import build_model
from minutely.pipeline.export import Exporter, ExportState
from minutely.registry import Registry
from minutely.schema import default_schema

MIN = 60_000


def exporter(tmp_path: Path, state: ExportState | None = None) -> Exporter:
    cfg = ModelConfig(buckets=64, embedding_dim=2, hidden=(4,))
    return Exporter(
        Registry(tmp_path),
        cfg,
        default_schema(),
        ExportConfig(every_min=10, min_samples=100, keep_versions=2),
        state,
    )


def test_due_needs_both_time_and_samples(tmp_path: Path) -> None:
    ex = exporter(tmp_path)
    assert not ex.due(0, 99)
    assert ex.due(0, 100)
    ex.state.last_export_ms = 0
    ex.state.samples_at_last_export = 100
    assert not ex.due(9 * MIN, 10_000)  # too soon
    assert not ex.due(10 * MIN, 150)  # too few new samples
    assert ex.due(10 * MIN, 200)


def test_online_versions_descend_from_the_base(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ex = exporter(tmp_path)
    model = build_model(ModelConfig(buckets=64, embedding_dim=2, hidden=(4,)), default_schema())
    base = ex.export(model, 0, 1_000, {"train_auc": 0.7}, as_base=True)
    assert ex.maybe_export(model, 5 * MIN, 2_000, {}) is None
    v2 = ex.maybe_export(model, 10 * MIN, 2_000, {"window_auc": 0.71})
    assert v2 is not None
    assert (v2.parent, v2.base) == (base.version, base.version)
    assert base.base is None
    restored = exporter(tmp_path, ExportState.from_dict(ex.state.to_dict()))
    assert restored.state == ex.state
    assert restored.state.exported == 2


def test_exports_keep_the_newest_versions_and_their_base(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ex = exporter(tmp_path)
    model = build_model(ModelConfig(buckets=64, embedding_dim=2, hidden=(4,)), default_schema())
    base = ex.export(model, 0, 1_000, {}, as_base=True)
    online = [ex.export(model, i * 10 * MIN, 1_000 + i * 200, {}).version for i in range(1, 5)]
    assert Registry(tmp_path).versions("ctr") == [base.version, *online[-2:]]


def test_batch_mode_keeps_only_final_labels() -> None:
    import pyarrow as pa

    from minutely.pipeline.day import final_labels

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
    clean = table.slice(0, 3)
    assert final_labels(clean) is clean


def test_undefined_metrics_are_left_out_of_the_manifest(tmp_path: Path) -> None:
    ex = exporter(tmp_path)
    model = build_model(ModelConfig(buckets=64, embedding_dim=2, hidden=(4,)), default_schema())
    m = ex.export(model, 0, 1_000, {"window_auc": float("nan"), "window_logloss": 0.13})
    assert m.metrics == {"window_logloss": 0.13}
