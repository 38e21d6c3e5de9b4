"""The child process of one replica (see :mod:`minutely.features.worker`).

It receives its replica (URL, storage options) and the table's Arrow schema through the pipe,
answers that it runs, then serves one request at a time, each a delta-rs call, and answers
``("ok", result)``, ``("mismatch", reason)`` (``ensure`` found a table with other columns) or
``("error", reason)``. It ends when asked to, or when the parent's end of the pipe closes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable, write_deltalake

from minutely.features.table import REQUEST_ID, describe, schema_problem

READY = "ready"


class _Replica:
    """The child's state: its replica and the table, opened on first use."""

    def __init__(self, url: str, options: dict[str, str], schema: pa.Schema) -> None:
        self.url = url
        self.options = options or None
        self.schema = schema
        self.table: DeltaTable | None = None

    def refresh(self) -> DeltaTable:
        """The table at its newest version. A table whose folder was moved away still answers
        an incremental update from what it loaded, so its existence is checked first."""
        if not DeltaTable.is_deltatable(self.url, self.options):
            raise FileNotFoundError(f"no Delta table at {self.url}")
        if self.table is None:
            self.table = DeltaTable(self.url, storage_options=self.options)
        else:
            self.table.update_incremental()
        return self.table

    def ensure(self, partition_by: list[str], description: str) -> str | None:
        """Open the table, or create it when there is none; how its columns differ, or None."""
        if DeltaTable.is_deltatable(self.url, self.options):
            table = DeltaTable(self.url, storage_options=self.options)
            problem = schema_problem(self.schema, pa.schema(table.schema().to_arrow()))
            parts = table.metadata().partition_columns
            if problem is None and parts != partition_by:
                problem = f"partition columns {parts}, expected {partition_by}"
            if problem is not None:
                return problem
        else:
            table = DeltaTable.create(
                self.url,
                self.schema,
                mode="ignore",
                partition_by=partition_by,
                name="feature_snapshots",
                description=description,
                storage_options=self.options,
            )
        self.table = table
        return None

    def append(self, data: pa.Table, create: tuple[list[str], str] | None) -> str | None:
        """One commit of ``data``. A table that disappeared is an error, never created again;
        ``create`` (the arguments of :meth:`ensure`) is given while the table was never opened,
        and then the table is checked or created first (how its columns differ, or None)."""
        if create is not None and self.table is None:
            problem = self.ensure(*create)
            if problem is not None:
                return problem
        table = self.refresh()
        if data.num_rows:
            write_deltalake(table, data, mode="append")
        return None

    def read(
        self, bucket_column: str, bucket: int, skip: frozenset[str], refresh: bool
    ) -> tuple[list[str], pa.Table | None, str | None]:
        """The files of one bucket not in ``skip``: their paths, their rows (only the request
        ids when the table's columns do not fit the schema) and how the columns differ."""
        table = self.refresh() if refresh or self.table is None else self.table
        got = pa.schema(table.schema().to_arrow())
        if got.get_field_index(REQUEST_ID) < 0:
            raise ValueError(f"expected a column {REQUEST_ID!r}, got the columns {got.names}")
        problem = schema_problem(self.schema, got)
        ds = table.to_pyarrow_dataset(file_pruning_predicate=[(bucket_column, "=", str(bucket))])
        fragments = [f for f in ds.get_fragments() if f.path not in skip]
        paths = [f.path for f in fragments]
        if not fragments:
            return paths, None, problem
        columns = [REQUEST_ID] if problem else self.schema.names
        sub = pads.FileSystemDataset(fragments, ds.schema, ds.format, ds.filesystem)
        return paths, sub.to_table(columns=columns), problem

    def check(self) -> float:
        """Seconds it takes to bring the table to its newest version."""
        start = time.monotonic()
        self.refresh()
        return time.monotonic() - start


def serve(recv: Connection, send: Connection) -> None:
    """Answer requests until asked to stop or the parent is gone."""
    _, url, options, schema = recv.recv()
    replica = _Replica(url, options, schema)
    send.send(READY)
    while True:
        try:
            request = recv.recv()
        except EOFError:  # the parent is gone
            return
        op, args = request[0], request[1:]
        if op == "stop":
            return
        answer: tuple[Any, ...]
        try:
            if op in ("ensure", "append"):
                problem = replica.ensure(*args) if op == "ensure" else replica.append(*args)
                answer = ("ok", None) if problem is None else ("mismatch", problem)
            elif op == "read":
                answer = ("ok", replica.read(*args))
            elif op == "check":
                answer = ("ok", replica.check())
            else:
                answer = ("error", f"unknown request {op!r}")
        except Exception as exc:  # reported to the parent, which decides what it means
            answer = ("error", describe(exc))
        send.send(answer)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv):
        print(f"minutely.features._child: expected RFD WFD, got {argv}", file=sys.stderr)
        return 2
    recv = Connection(int(argv[0]), writable=False)
    send = Connection(int(argv[1]), readable=False)
    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent is gone
        serve(recv, send)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
