from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from stream_backends import BACKENDS, LogFactory

from minutely.stream import Log


@pytest.fixture(params=sorted(BACKENDS))
def log_factory(request: pytest.FixtureRequest, tmp_path: Path) -> LogFactory:
    """A fresh, empty log of each backend."""
    make: Callable[[Path], LogFactory] = BACKENDS[request.param]
    return make(tmp_path)


@pytest.fixture
def log(log_factory: LogFactory) -> Iterator[Log]:
    handle = log_factory.open()
    yield handle
    handle.close()


@pytest.fixture
def new_topic() -> Callable[[str], str]:
    """Topic names unique to the test, so tests sharing a broker never see each other's records."""
    suffix = uuid.uuid4().hex[:8]
    return lambda name: f"{name}-{suffix}"
