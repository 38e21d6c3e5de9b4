from __future__ import annotations

import pytest
import torch

from kafka_broker import KafkaBroker, session_broker, stop_session_broker

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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Also covers a broker started outside a fixture (a backend entry of the stream suite).
    stop_session_broker()
