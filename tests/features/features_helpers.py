"""Shared pieces of the feature snapshot tests: random feature columns, a look at a replica's
table, and an S3 endpoint that accepts connections and never answers."""

from __future__ import annotations

import itertools
import socket
import threading
from typing import Any

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable

from minutely.features import Features
from minutely.schema import Schema

HOUR_MS = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z, the start of an hourly bucket


def random_features(schema: Schema, n: int, seed: int) -> Features:
    """Columns in the simulator's layout, different for each seed."""
    rng = np.random.default_rng(seed)
    out: Features = {}
    for spec in schema.features:
        if spec.kind == "sparse":
            out[spec.name] = rng.integers(0, 1 << 40, n, dtype=np.int64)
        elif spec.kind == "dense":
            out[spec.name] = rng.random(n, dtype=np.float32) * 10
        else:
            lengths = rng.integers(0, 5, n)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            out[spec.name] = (rng.integers(0, 1000, int(offsets[-1]), dtype=np.int64), offsets)
    return out


def rows_of(features: Features, schema: Schema) -> list[dict[str, Any]]:
    """The feature dicts of columns, one per row (dense values as Python floats of float32)."""
    cols: list[list[Any]] = []
    for spec in schema.features:
        col = features[spec.name]
        if spec.kind == "multi_sparse":
            values, offsets = col[0].tolist(), col[1].tolist()
            cols.append([values[a:b] for a, b in itertools.pairwise(offsets)])
        else:
            cols.append(np.asarray(col).tolist())
    names = [f.name for f in schema.features]
    return [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)]


def table_rows(url: str) -> pa.Table:
    """Every row of the Delta table at ``url``, sorted by request id (read directly)."""
    table = DeltaTable(url).to_pyarrow_table()
    return table.sort_by("request_id").select(sorted(table.column_names))


class SilentS3:
    """A TCP server on localhost that accepts every connection and never sends a byte: an
    object store whose every call hangs until the client gives up."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)

    def options(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }

    @property
    def connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        for conn in self._conns:
            conn.close()
