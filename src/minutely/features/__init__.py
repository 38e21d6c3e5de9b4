"""Feature snapshots: the features of each ad request, kept by request id in two Delta tables.

A producer that answers ad requests writes the features it used as one row per request
(:class:`SnapshotWriter`), in a Delta Lake table partitioned by the hour of the request; two
replicas (a primary and a secondary, e.g. on two clusters) hold the same rows. A consumer that
later needs those features, such as the join, fetches them by request id in batches
(:class:`SnapshotReader`), failing over between the replicas. The layout and the per-replica
worker threads are in :mod:`minutely.features.table`, the write contract in
:mod:`minutely.features.writer`, the lookup rules in :mod:`minutely.features.reader`.

Configured by ``[features]`` (:class:`~minutely.config.FeaturesConfig`); both classes have a
``from_config`` that resolves relative replica paths inside the run folder.

:class:`FeatureResolver` (:mod:`minutely.features.resolve`) puts the features of by-reference
impressions back, batch by batch, for the join.
"""

from minutely.features.reader import Lookup, SnapshotReader
from minutely.features.resolve import FeatureResolver, ResolveStats, open_resolver
from minutely.features.table import BUCKET_MS, Features, Replica, arrow_schema, resolve_replicas
from minutely.features.writer import SnapshotWriter, WriteResult

__all__ = [
    "BUCKET_MS",
    "FeatureResolver",
    "Features",
    "Lookup",
    "Replica",
    "ResolveStats",
    "SnapshotReader",
    "SnapshotWriter",
    "WriteResult",
    "arrow_schema",
    "open_resolver",
    "resolve_replicas",
]
