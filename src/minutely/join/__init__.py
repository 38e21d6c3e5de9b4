"""The join stage: raw events to labeled samples per model (see :mod:`minutely.join.joiner`)."""

from minutely.join.joiner import Joiner
from minutely.join.plan import JoinPlan, ModelWindow
from minutely.join.state import JoinStats, LateEvent, LateReason
from minutely.join.store import JoinStore

__all__ = [
    "JoinPlan",
    "JoinStats",
    "JoinStore",
    "Joiner",
    "LateEvent",
    "LateReason",
    "ModelWindow",
]
