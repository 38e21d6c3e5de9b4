"""Streaming evaluation: exact AUC and PR-AUC, logloss, PCOC; window and lifetime views."""

from minutely.evaluate.metric_set import MetricSet, WindowReport
from minutely.evaluate.metrics import AUC, PCOC, PRAUC, LogLoss, Metric

__all__ = ["AUC", "PCOC", "PRAUC", "LogLoss", "Metric", "MetricSet", "WindowReport"]
