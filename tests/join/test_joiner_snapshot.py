"""Snapshot and restore: exact resumption and refusal of state that does not fit."""

from __future__ import annotations

import msgspec
import pytest

from minutely.config import JoinConfig, ModelConfig
from minutely.errors import CheckpointError
from minutely.events import Click, Impression
from minutely.join import Joiner
from minutely.join.state import DECODER, ENCODER
from minutely.schema import FeatureSpec, Schema, default_schema

CTR = ModelConfig(name="ctr", attribution_window_s=10, correction_horizon_s=100)
CVR = ModelConfig(
    name="cvr", label="conversion", attribution_window_s=50, correction_horizon_s=1_000
)
CFG = JoinConfig(allowed_lateness_s=5, max_click_delay_s=60)
S = 1_000


def test_restore_keeps_undrained_outputs_late_events_and_stats() -> None:
    j = Joiner([CTR, CVR], CFG, default_schema(), late_capacity=10)
    j.process_many([Impression(1, 0, {}), Click(1, 2 * S), Impression(2, 100 * S, {})])
    j.process(Click(9, 0))  # an orphan
    r = Joiner.restore([CTR, CVR], CFG, default_schema(), j.snapshot(), late_capacity=10)
    assert r.drain() == j.drain()
    assert r.drain_late() == j.drain_late()
    assert r.stats == j.stats
    assert r.watermark_ms == j.watermark_ms == 95 * S
    assert r.state_size() == j.state_size() > 0


def test_restore_keeps_the_order_of_corrections_with_equal_times() -> None:
    j = Joiner([CTR], CFG, default_schema())
    j.process_many([Impression(1, 0, {}), Impression(2, 0, {}), Impression(3, 40 * S, {})])
    j.process(Click(2, 50 * S))
    j = Joiner.restore([CTR], CFG, default_schema(), j.snapshot())
    j.process(Click(1, 50 * S))
    j.flush_all()
    fixes = [s.sample_id for s in j.drain()["ctr"] if s.is_correction]
    assert fixes == [2, 1]  # both at 50 s: in the order they were learned


def test_snapshot_is_compact_msgpack() -> None:
    j = Joiner([CTR], CFG, default_schema())
    j.process_many([Impression(i, i * 100, {"user_id": i}) for i in range(1_000)])
    j.drain()
    blob = j.snapshot()
    assert isinstance(blob, bytes)
    assert len(blob) < 80 * 1_000  # about 70 bytes per held impression
    assert DECODER.decode(blob).watermark_ms == 99_900 - 5 * S


def test_smaller_late_capacity_on_restore_counts_the_dropped() -> None:
    j = Joiner([CTR], CFG, default_schema())
    j.process(Impression(1, 100 * S, {}))
    j.process_many([Click(i, 0) for i in range(10, 14)])
    r = Joiner.restore([CTR], CFG, default_schema(), j.snapshot(), late_capacity=1)
    assert [e.event.imp_id for e in r.drain_late()] == [13]
    assert r.stats.late_dropped == 3


def test_restore_refuses_undecodable_state() -> None:
    with pytest.raises(CheckpointError, match=r"join snapshot: cannot decode the state"):
        Joiner.restore([CTR], CFG, default_schema(), b"\x00not msgpack")


def test_restore_refuses_state_of_another_shape() -> None:
    blob = msgspec.msgpack.encode({"version": 1})
    with pytest.raises(CheckpointError, match=r"cannot decode the state \(Object missing"):
        Joiner.restore([CTR], CFG, default_schema(), blob)


def test_restore_refuses_another_state_version() -> None:
    st = DECODER.decode(Joiner([CTR], CFG, default_schema()).snapshot())
    st.version = 99
    with pytest.raises(CheckpointError, match=r"expected state version 2, got 99"):
        Joiner.restore([CTR], CFG, default_schema(), ENCODER.encode(st))


def test_restore_refuses_a_different_model_set() -> None:
    blob = Joiner([CTR, CVR], CFG, default_schema()).snapshot()
    with pytest.raises(CheckpointError, match=r"in the snapshot but not configured \['model cvr"):
        Joiner.restore([CTR], CFG, default_schema(), blob)
    other = ModelConfig(name="ctr", attribution_window_s=20, correction_horizon_s=100)
    with pytest.raises(
        CheckpointError, match=r"configured but not in the snapshot \['model ctr: .*window_ms=20000"
    ):
        Joiner.restore([other, CVR], CFG, default_schema(), blob)


def test_restore_refuses_other_join_settings() -> None:
    blob = Joiner([CTR], CFG, default_schema()).snapshot()
    with pytest.raises(
        CheckpointError,
        match=r"not in the snapshot \['allowed_lateness_ms=0', 'max_click_delay_ms=3600000'\], "
        r"in the snapshot but not configured \['allowed_lateness_ms=5000'",
    ):
        Joiner.restore([CTR], JoinConfig(allowed_lateness_s=0), default_schema(), blob)


def test_restore_refuses_another_feature_schema() -> None:
    blob = Joiner([CTR], CFG, default_schema()).snapshot()
    other = Schema(features=(FeatureSpec("user_id", "sparse"),))
    with pytest.raises(CheckpointError, match=r"expected feature schema [0-9a-f]{16}, got"):
        Joiner.restore([CTR], CFG, other, blob)


def test_restore_refuses_an_inconsistent_time_index() -> None:
    j = Joiner([CTR], CFG, default_schema())
    j.process_many([Impression(1, 0, {}), Impression(2, 1, {})])
    st = DECODER.decode(j.snapshot())
    st.impressions = st.impressions[:1]
    with pytest.raises(CheckpointError, match=r"got 1 impressions for 2 index entries"):
        Joiner.restore([CTR], CFG, default_schema(), ENCODER.encode(st))


def test_restore_refuses_a_cursor_out_of_range() -> None:
    st = DECODER.decode(Joiner([CTR], CFG, default_schema()).snapshot())
    st.click_models[0].cursor = 5
    with pytest.raises(CheckpointError, match=r"model 'ctr' cursor expected in \[0, 0\], got 5"):
        Joiner.restore([CTR], CFG, default_schema(), ENCODER.encode(st))


def test_restore_refuses_impression_ids_out_of_range() -> None:
    j = Joiner([CTR], CFG, default_schema())
    j.process(Impression(1, 0, {}))
    st = DECODER.decode(j.snapshot())
    st.impressions = [Impression(-1, 0, {})]
    st.incoming = [(0, -1)]
    with pytest.raises(
        CheckpointError, match=r"cannot decode the state \(Expected `int` >= 0 - at `\$\.impr"
    ):
        Joiner.restore([CTR], CFG, default_schema(), ENCODER.encode(st))
