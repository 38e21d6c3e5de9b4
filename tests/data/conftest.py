"""Fixtures for the data package: the default schema and a deterministic batch of samples."""

from __future__ import annotations

import random

import numpy as np
import pytest

from minutely.data import Sample
from minutely.schema import Schema, default_schema


def build_samples(schema: Schema, n: int, seed: int = 0) -> list[Sample]:
    """Samples shaped like the join's output: large ids, short (often empty) lists, skewed dense."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        feats: dict[str, int | float | list[int]] = {}
        for spec in schema.features:
            if spec.kind == "sparse":
                feats[spec.name] = rng.randrange(-(2**40), 2**50)
            elif spec.kind == "multi_sparse":
                feats[spec.name] = [rng.randrange(0, 10_000) for _ in range(rng.randrange(0, 6))]
            else:
                # float32-exact, so the Arrow round trip (float32 columns) is the identity
                feats[spec.name] = float(np.float32(rng.choice([-1, 1]) * rng.lognormvariate(0, 3)))
        label = int(rng.random() < 0.3)
        out.append(
            Sample(
                sample_id=1_000 + i,
                event_ts_ms=1_700_000_000_000 + 1_000 * i,
                emit_ts_ms=1_700_000_300_000 + 1_000 * i,
                label=label,
                is_correction=bool(label and rng.random() < 0.5),
                label_ts_ms=1_700_000_100_000 + i if label else -1,
                features=feats,
            )
        )
    return out


@pytest.fixture
def schema() -> Schema:
    return default_schema()


@pytest.fixture
def samples(schema: Schema) -> list[Sample]:
    return build_samples(schema, 64)


@pytest.fixture
def make_samples() -> object:
    """``make_samples(schema, n, seed=0)``: more samples, for other sizes or schemas."""
    return build_samples
