from __future__ import annotations

import pytest
import torch

from kafka_broker import KafkaBroker, session_broker, stop_session_broker
from s3_server import session_s3, stop_session_s3

# Small tensors run fastest on one thread; extra threads spin against other processes on a
# 2-core machine and slow the suite many times over.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def kafka_broker() -> KafkaBroker:
    """The Kafka broker shared by the test session (started on first use, stopped at its end).

    A test that stops or restarts a broker should start its own :class:`KafkaBroker` instead.
    """
    return session_broker()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """``host:port`` of the session's Kafka broker."""
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """The URL of the session's S3 server (moto, started on first use, stopped at its end);
    a test creates a bucket of its own (``s3_server.new_bucket``)."""
    return session_s3().endpoint


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Also covers a broker started outside a fixture (a backend entry of the stream suite).
    stop_session_broker()
    stop_session_s3()
