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


def policy(
    tmp_path: Path, *, every_min: int = 10, min_samples: int = 100, min_trained_min: int = 10
) -> Exporter:
    return Exporter(
        Registry(tmp_path),
        ModelConfig(buckets=64, embedding_dim=2, hidden=(4,)),
        default_schema(),
        ExportConfig(every_min=every_min, min_samples=min_samples, min_trained_min=min_trained_min),
    )


def test_a_skip_is_counted_once_per_interval_with_its_numbers(tmp_path: Path) -> None:
    ex = policy(tmp_path)
    ex.state.last_export_ms = 0
    ex.state.samples_at_last_export = 1_000
    assert not ex.due(5 * MIN, 1_010)  # too soon: no skip
    assert (ex.state.skipped, ex.state.last_skip) == (0, None)
    assert not ex.due(10 * MIN, 1_040)
    assert ex.state.skipped == 1
    assert ex.state.last_skip == "40 samples since the last export, needs 100"
    assert not ex.due(11 * MIN, 1_060)  # the same interval of waiting: not counted again
    assert ex.state.skipped == 1
    assert ex.state.last_skip == "60 samples since the last export, needs 100"
    assert not ex.due(20 * MIN, 1_070)
    assert ex.state.skipped == 2
    assert ex.due(21 * MIN, 1_100)
    assert ex.hold_reason(21 * MIN, 1_100) == (True, None)


def test_minutes_trained_count_from_the_last_warm_start(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ex = policy(tmp_path, every_min=5, min_trained_min=15)
    model = build_model(ModelConfig(buckets=64, embedding_dim=2, hidden=(4,)), default_schema())
    day = ex.export(model, 60 * MIN, 5_000, {}, as_base=True)
    ex.warm_started(60 * MIN, day.version)
    assert ex.maybe_export(model, 70 * MIN, 9_000, {}) is None  # 10 of 15 minutes
    assert ex.state.skipped == 1
    assert ex.state.last_skip == (
        f"10 minutes trained since the warm start at {60 * MIN}, needs 15"
    )
    online = ex.maybe_export(model, 75 * MIN, 9_000, {})
    assert online is not None
    assert (online.parent, online.base) == (day.version, day.version)


def test_a_skip_names_every_shortfall(tmp_path: Path) -> None:
    ex = policy(tmp_path, min_trained_min=30)
    ex.warm_started(0, "v00000001", samples_seen=500)
    assert not ex.due(12 * MIN + 30_000, 550)
    assert ex.state.last_skip == (
        "50 samples since the last export, needs 100; "
        "12.5 minutes trained since the warm start at 0, needs 30"
    )


def test_a_warm_start_from_another_version_becomes_parent_and_base(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ex = policy(tmp_path, min_trained_min=0)
    model = build_model(ModelConfig(buckets=64, embedding_dim=2, hidden=(4,)), default_schema())
    first = ex.export(model, 0, 1_000, {}, as_base=True)
    online = ex.export(model, 10 * MIN, 2_000, {})
    assert online.parent == first.version
    # A rollback (or a new day model) restarts online training from ``first``.
    ex.warm_started(12 * MIN, first.version, samples_seen=1_000)
    assert ex.state.samples_at_last_export == 1_000
    again = ex.maybe_export(model, 20 * MIN, 1_100, {})
    assert again is not None
    assert (again.parent, again.base) == (first.version, first.version)


def test_state_round_trips_every_field_through_json(tmp_path: Path) -> None:
    import dataclasses
    import json

    st = ExportState(
        last_export_ms=3,
        samples_at_last_export=4,
        last_version="v00000002",
        base_version="v00000001",
        exported=5,
        warm_start_ms=6,
        skipped=7,
        last_skip="40 samples since the last export, needs 100",
        last_skip_ms=8,
        refused=9,
        last_refusal="refused: PCOC 2 outside [0.75, 1.33]",
    )
    defaults = ExportState()
    # Every field differs from its default, so a field the round trip dropped would show.
    assert all(getattr(st, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(st))
    assert ExportState.from_dict(json.loads(json.dumps(st.to_dict()))) == st


def test_state_from_a_checkpoint_older_than_the_new_fields() -> None:
    old = {
        "last_export_ms": 600_000,
        "samples_at_last_export": 2_000,
        "last_version": "v00000002",
        "base_version": "v00000001",
        "exported": 2,
    }
    st = ExportState.from_dict(old)
    assert (st.last_version, st.exported) == ("v00000002", 2)
    assert (st.warm_start_ms, st.skipped, st.last_skip, st.refused, st.last_refusal) == (
        None,
        0,
        None,
        0,
        None,
    )


def test_state_from_dict_names_an_unknown_field_or_a_wrong_type() -> None:
    import pytest

    from minutely.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"got unknown \['surprise'\]"):
        ExportState.from_dict({"surprise": 1})
    with pytest.raises(CheckpointError, match=r"field 'skipped': expected int, got str 'three'"):
        ExportState.from_dict({"skipped": "three"})
    with pytest.raises(
        CheckpointError, match=r"field 'last_version': expected str or None, got int 7"
    ):
        ExportState.from_dict({"last_version": 7})
    with pytest.raises(CheckpointError, match=r"expected a dict, got list"):
        ExportState.from_dict([1, 2])  # type: ignore[arg-type]
