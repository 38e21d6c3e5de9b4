from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from features_helpers import T0, random_features, rows_of

from minutely.errors import SchemaError
from minutely.features import BUCKET_MS, arrow_schema
from minutely.features.table import snapshot_table, table_to_features
from minutely.schema import FeatureSpec, Schema


def test_a_batch_becomes_rows_with_their_hour_bucket_and_back(schema: Schema) -> None:
    feats = random_features(schema, 5, seed=1)
    ts = np.array([T0, T0 + 1, T0 + BUCKET_MS - 1, T0 + BUCKET_MS, T0 + 5 * BUCKET_MS])
    table = snapshot_table(schema, np.arange(10, 15), ts, feats)
    assert table.schema == arrow_schema(schema)
    assert table.column("request_id").to_pylist() == [10, 11, 12, 13, 14]
    hour = T0 // BUCKET_MS
    assert table.column("bucket").to_pylist() == [hour, hour, hour, hour + 1, hour + 5]
    back = table_to_features(table, schema)
    assert rows_of(back, schema) == rows_of(feats, schema)
    assert back["user_interests"][1].dtype == np.int64
    assert back["ad_ctr_1h"].dtype == np.float32


def test_arrow_columns_and_one_time_for_all_are_accepted(schema: Schema) -> None:
    feats = random_features(schema, 3, seed=2)
    values, offsets = feats["user_interests"]
    arrow_feats: dict[str, Any] = {
        name: pa.array(col) for name, col in feats.items() if name != "user_interests"
    }
    # a sliced list array: its offsets do not start at 0
    whole = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], offsets + 2]).astype(np.int32)),
        pa.array(np.concatenate([[7, 7], values])),
    )
    arrow_feats["user_interests"] = whole.slice(1)
    table = snapshot_table(schema, pa.array([1, 2, 3]), T0, arrow_feats)
    assert table.column("ts_ms").to_pylist() == [T0] * 3
    assert rows_of(table_to_features(table, schema), schema) == rows_of(feats, schema)


def _bad(schema: Schema, n: int = 3, **changes: Any) -> dict[str, Any]:
    feats = random_features(schema, n, seed=3)
    feats.update(changes)
    return feats


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ad_id": np.arange(2)}, r"feature 'ad_id': expected 3 values, got 2"),
        (
            {"ad_id": np.array([1.0, 2.0, 3.0])},
            r"feature 'ad_id': expected integers, got dtype float64",
        ),
        (
            {"ad_id": np.array([True, False, True])},
            r"feature 'ad_id': expected integers, got dtype bool",
        ),
        (
            {"ad_id": np.array([1, 2, 2**63], dtype=np.uint64)},
            r"feature 'ad_id': expected int64 ids, got 9223372036854775808 \(beyond int64\)",
        ),
        ({"ad_id": pa.array([1, None, 3])}, r"feature 'ad_id': expected no nulls, got 1"),
        ({"ad_id": np.zeros((3, 1), np.int64)}, r"feature 'ad_id': expected a 1-d column"),
        (
            {"ad_ctr_1h": np.array([0.1, np.nan, 0.2])},
            r"feature 'ad_ctr_1h': expected finite numbers within float32 range, got "
            r"np\.float64\(nan\) at row 1",
        ),
        (
            {"ad_ctr_1h": np.array([0.1, 0.2, 1e39])},
            r"feature 'ad_ctr_1h': expected finite numbers within float32 range, got .*1e\+39",
        ),
        ({"ad_ctr_1h": np.array(["a", "b", "c"])}, r"feature 'ad_ctr_1h': expected numbers"),
        (
            {"user_interests": [[1], [2], [3]]},
            r"feature 'user_interests': expected \(values, offsets\) or an Arrow list array, "
            r"got list",
        ),
        (
            {"user_interests": (np.arange(3), np.array([0, 1, 3]))},
            r"feature 'user_interests': expected 4 offsets, got 3",
        ),
        (
            {"user_interests": (np.arange(3), np.array([0, 2, 1, 3]))},
            r"feature 'user_interests': expected non-decreasing offsets, got 2 then 1 at row 1",
        ),
        (
            {"user_interests": (np.arange(3), np.array([0, 1, 2, 5]))},
            r"feature 'user_interests': expected offsets from 0 to 3 \(the number of values\), "
            r"got 0\.\.5",
        ),
        (
            {"user_interests": (np.array([0.5]), np.array([0, 1, 1, 1]))},
            r"feature 'user_interests' values: expected integers, got dtype float64",
        ),
    ],
)
def test_a_bad_column_names_the_feature(
    schema: Schema, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(SchemaError, match=r"snapshot batch: " + message):
        snapshot_table(schema, np.arange(3), T0, _bad(schema, **change))


def test_missing_and_unknown_features_are_listed(schema: Schema) -> None:
    feats = random_features(schema, 2, seed=4)
    del feats["slot"]
    feats["colour"] = np.zeros(2, np.int64)
    with pytest.raises(SchemaError, match=r"got missing \['slot'\]; unknown \['colour'\]"):
        snapshot_table(schema, np.arange(2), T0, feats)


def test_ids_and_times_are_checked(schema: Schema) -> None:
    feats = random_features(schema, 3, seed=5)
    with pytest.raises(SchemaError, match=r"expected distinct request ids, got 7 2 times"):
        snapshot_table(schema, np.array([7, 8, 7]), T0, feats)
    with pytest.raises(SchemaError, match=r"ts_ms: expected 3 values, got 2"):
        snapshot_table(schema, np.arange(3), np.array([T0, T0]), feats)
    with pytest.raises(SchemaError, match=r"request_id: expected integers, got dtype <U1"):
        snapshot_table(schema, np.array(["a", "b", "c"]), T0, feats)


def test_feature_names_may_not_take_the_table_columns() -> None:
    clash = Schema((FeatureSpec("bucket", "sparse"), FeatureSpec("x", "dense")))
    with pytest.raises(SchemaError, match=r"feature names must differ from .*got \['bucket'\]"):
        arrow_schema(clash)
