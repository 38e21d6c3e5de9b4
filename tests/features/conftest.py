from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from features_helpers import SilentS3

from minutely.schema import Schema, default_schema


@pytest.fixture
def schema() -> Schema:
    return default_schema()


@pytest.fixture
def replicas(tmp_path: Path) -> tuple[str, str]:
    """Two local replica folders (not created yet)."""
    return str(tmp_path / "primary"), str(tmp_path / "secondary")


@pytest.fixture
def silent_s3() -> Iterator[SilentS3]:
    server = SilentS3()
    yield server
    server.close()
