"""The model holder: one reference swapped atomically, bounded memory of refusals."""

from __future__ import annotations

import doctest

import numpy as np

import minutely.serve.holder as holder_mod
from minutely.data.tensors import FeatureColumns
from minutely.registry import FileEntry, Manifest
from minutely.serve import LoadedModel, ModelHolder, Refusal


class Constant:
    def __init__(self, p: float) -> None:
        self.p = p

    def predict_columns(self, columns: FeatureColumns) -> list[float]:
        return [self.p] * len(columns)

    def warm_up(self) -> None:
        pass


ONE_ROW = FeatureColumns(1, (), np.zeros((1, 0), np.float32))


def loaded(version: str, p: float) -> LoadedModel:
    m = Manifest(
        manifest_version=1,
        model="ctr",
        version=version,
        parent=None,
        base=None,
        created_ms=0,
        arch="x",
        model_config={},
        feature_schema={},
        schema_fingerprint="",
        metrics={},
        samples_seen=0,
        files={"weights.safetensors": FileEntry("", 0)},
    )
    return LoadedModel(m, Constant(p), loaded_ms=7)


def test_a_reference_taken_before_a_swap_keeps_the_old_version() -> None:
    holder = ModelHolder("ctr")
    holder.swap(loaded("v00000001", 0.1))
    in_flight = holder.current
    holder.swap(loaded("v00000002", 0.2))
    assert in_flight is not None
    assert (in_flight.version, in_flight.predictor.predict_columns(ONE_ROW)) == ("v00000001", [0.1])
    current = holder.current
    assert current is not None
    assert (current.version, current.predictor.predict_columns(ONE_ROW)) == ("v00000002", [0.2])
    assert holder.swaps == 2


def test_refusals_are_remembered_counted_and_bounded() -> None:
    holder = ModelHolder("ctr", max_refusals=2)
    for i in range(1, 4):
        holder.refuse(f"v0000000{i}", f"bad {i}")
    assert holder.refusals == (Refusal("v00000002", "bad 2"), Refusal("v00000003", "bad 3"))
    assert holder.refused_total == 3
    assert holder.is_refused("v00000003")
    assert not holder.is_refused("v00000001")  # forgotten: the oldest beyond the bound
    assert holder.swaps == 0
    assert holder.current is None


def test_previous_version_is_the_last_other_live_version() -> None:
    holder = ModelHolder("ctr", max_history=3)
    assert holder.previous_version() is None
    holder.swap(loaded("v00000001", 0.1))
    assert holder.previous_version() is None  # nothing was live before
    holder.swap(loaded("v00000002", 0.2))
    holder.swap(loaded("v00000003", 0.3))
    assert holder.previous_version() == "v00000002"
    holder.swap(loaded("v00000002", 0.2))  # a rollback: the one before it is v00000003
    assert holder.previous_version() == "v00000003"
    assert holder.history == ("v00000002", "v00000003", "v00000002")  # bounded


def test_poll_errors_are_counted() -> None:
    holder = ModelHolder("ctr")
    holder.count_poll_error()
    holder.count_poll_error()
    assert holder.poll_errors == 2


def test_docstring_example_runs() -> None:
    result = doctest.testmod(holder_mod)
    assert result.attempted > 0
    assert result.failed == 0
