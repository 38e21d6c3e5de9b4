"""Samples from the log to training tensors: JSON records vs tf.train.Example vs Arrow batches.

Run: ``.venv/bin/python benchmarks/ingest.py [--quick] [--samples N] [--ids K]``.

``N`` samples of the default schema (``user_interests`` with ``K - 9`` ids, ``K`` ids per sample
in all: 85 by default) are written once per sample format to a samples topic of the embedded log
(SQLite) and of a Kafka broker (the noida-db binary the tests use, started for the run):

* ``json``: one JSON object per record, what the seed system sent (the baseline): each record
  parsed with the standard library's ``json.loads`` into a :class:`~minutely.data.Sample`, the
  batch then checked and turned into columns by ``samples_to_record_batch`` (the one
  validator), as a Python consumer of JSON samples does;
* ``json_msgspec``: the same records, a batch joined into one JSON array and decoded by
  minutely's JSON codec (msgspec, the one validator): the fastest JSON path at hand;
* ``example``: one serialized tf.train.Example per record, decoded in bulk by
  :class:`~minutely.data.wire.SampleWire` (the trainer's read path);
* ``tfrecord``: one TFRecord-framed batch of Examples per message, same decoder;
* ``arrow``: one Arrow IPC record batch per message (minutely's default).

Then, per format and batch size (1,024 and 4,096 samples), a fresh consumer reads the topic from
the start, batch by batch: poll until a batch's records are in (one message for the batch
formats), decode, sort by (emit time, sample id) as the trainer does, and build the training
tensors (:func:`~minutely.data.record_batch_to_tensors`, ids hashed). The time of the whole loop
gives samples/s; the thread CPU time of the decode step (of the log's poll) over the loop's CPU
time is the decode's (the poll's) CPU share; the rest is the sort and the tensors. Each figure
is the median of ``--rounds`` reads; ratios are to each JSON path in the same run
(``over_json``: the standard library's, the seed's baseline; ``over_json_msgspec``).
Goals at 4,096, against the seed's baseline: Arrow >= 100x JSON, Example >= 3x JSON. Also, in
memory on 4,096 samples (``kernels``): the bulk Example decoder against protobuf's Python API
reading every value of every record, and the compiled id hash against the numpy version it
replaced. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the local broker the tests use

from kafka_broker import KafkaBroker  # noqa: E402
from minutely.config import SamplesConfig  # noqa: E402
from minutely.data import (  # noqa: E402
    record_batch_to_samples,
    record_batch_to_tensors,
    samples_from_json,
    samples_to_json,
    samples_to_record_batch,
)
from minutely.data.arrow import arrow_schema  # noqa: E402
from minutely.data.samples import Sample  # noqa: E402
from minutely.data.wire import SampleWire  # noqa: E402
from minutely.schema import Schema, default_schema  # noqa: E402
from minutely.stream import KafkaLog, Log, SqliteLog  # noqa: E402

FORMATS = ("json", "json_msgspec", "example", "tfrecord", "arrow")
BATCH_SIZES = (1024, 4096)
BUCKETS = 1 << 15
GOAL_ARROW_OVER_JSON = 100.0
GOAL_EXAMPLE_OVER_JSON = 3.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_batch(schema: Schema, n: int, ids: int, seed: int = 0) -> pa.RecordBatch:
    """``n`` samples with random ids: ``ids - 9`` in ``user_interests``, one per other sparse
    feature (8) and the sample id counted as one."""
    rng = np.random.default_rng(seed)
    multi = max(0, ids - 9)
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "event_ts_ms": pa.array(1_000_000 + np.arange(n, dtype=np.int64)),
        "emit_ts_ms": pa.array(1_600_000 + np.arange(n, dtype=np.int64)),
        "label": pa.array((rng.random(n) < 0.05).astype(np.int8)),
        "is_correction": pa.array(np.zeros(n, dtype=bool)),
        "label_ts_ms": pa.array(np.full(n, -1, dtype=np.int64)),
    }
    for f in schema.features:
        if f.kind == "sparse":
            cols[f.name] = pa.array(rng.integers(0, 1 << 40, n, dtype=np.int64))
        elif f.kind == "multi_sparse":
            offsets = np.arange(0, (n + 1) * multi, multi, dtype=np.int32)
            values = rng.integers(0, 1 << 40, n * multi, dtype=np.int64)
            cols[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        else:
            cols[f.name] = pa.array(rng.random(n, dtype=np.float32))
    target = arrow_schema(schema)
    return pa.RecordBatch.from_arrays([cols[name] for name in target.names], schema=target)


def messages(fmt: str, rb: pa.RecordBatch, batch: int, schema: Schema) -> list[bytes]:
    """The samples-topic messages of ``rb`` in ``fmt`` (batch formats: one per ``batch``)."""
    if fmt.startswith("json"):
        return [samples_to_json([s])[1:-1] for s in record_batch_to_samples(rb, schema)]
    wire = SampleWire(schema, SamplesConfig(format=fmt), where="bench")
    out: list[bytes] = []
    step = batch if fmt in ("arrow", "tfrecord") else rb.num_rows
    for i in range(0, rb.num_rows, step):
        out += wire.encode(rb.slice(i, step))
    return out


def decoder(fmt: str, schema: Schema) -> Callable[[list[bytes]], pa.Table]:
    if fmt == "json":

        def from_stdlib_json(values: list[bytes]) -> pa.Table:
            samples = [Sample(**json.loads(v)) for v in values]
            return pa.Table.from_batches([samples_to_record_batch(samples, schema)])

        return from_stdlib_json
    if fmt == "json_msgspec":

        def from_json(values: list[bytes]) -> pa.Table:
            samples = samples_from_json(b"[" + b",".join(values) + b"]", schema)
            return pa.Table.from_batches([samples_to_record_batch(samples, schema)])

        return from_json
    wire = SampleWire(schema, SamplesConfig(format=fmt), where="bench")

    def from_wire(values: list[bytes]) -> pa.Table:
        table, refused = wire.decode(values)
        if refused or table is None:
            raise RuntimeError(f"{fmt}: refused {refused[:1]}")
        return table

    return from_wire


def read_all(
    lg: Log, topic: str, fmt: str, batch: int, total: int, schema: Schema
) -> dict[str, float]:
    """Read the topic from the start to training tensors, ``batch`` samples at a time."""
    decode = decoder(fmt, schema)
    per_message = batch if fmt in ("arrow", "tfrecord") else 1
    want = batch // per_message  # messages per batch
    consumer = lg.consumer(topic)
    consumer.assign({0: 0})
    decode_cpu = poll_cpu = 0.0
    samples = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        while samples < total:
            values: list[bytes] = []
            while len(values) < want:
                t = time.thread_time()
                got = consumer.poll(want - len(values), timeout_s=1.0)
                poll_cpu += time.thread_time() - t
                if not got:
                    raise RuntimeError(f"{topic}: no record after {samples} samples")
                values += [r.value for r in got]
            t = time.thread_time()
            table = decode(values)
            decode_cpu += time.thread_time() - t
            table = table.sort_by([("emit_ts_ms", "ascending"), ("sample_id", "ascending")])
            for rb in table.combine_chunks().to_batches(max_chunksize=batch):
                tensors = record_batch_to_tensors(rb, schema, BUCKETS)
                samples += len(tensors.labels)
    finally:
        consumer.close()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "samples_per_s": samples / wall,
        "decode_cpu_share": decode_cpu / cpu,
        "poll_cpu_share": poll_cpu / cpu,
    }


def run_backend(
    name: str, lg: Log, rb: pa.RecordBatch, schema: Schema, rounds: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch in BATCH_SIZES:
        row: dict[str, Any] = {}
        for fmt in FORMATS:
            topic = f"samples.bench.{fmt}.{batch}"
            lg.create_topic(topic, 1)
            msgs = messages(fmt, rb, batch, schema)
            t = time.perf_counter()
            for i in range(0, len(msgs), 1024):
                lg.append(topic, [(None, m, 1_000 + i) for m in msgs[i : i + 1024]], partition=0)
            write_s = time.perf_counter() - t
            reads = [read_all(lg, topic, fmt, batch, rb.num_rows, schema) for _ in range(rounds)]
            row[fmt] = {
                "samples_per_s": round(statistics.median(r["samples_per_s"] for r in reads)),
                "decode_cpu_share": round(
                    statistics.median(r["decode_cpu_share"] for r in reads), 3
                ),
                "poll_cpu_share": round(statistics.median(r["poll_cpu_share"] for r in reads), 3),
                "bytes_per_sample": round(sum(len(m) for m in msgs) / rb.num_rows, 1),
                "write_samples_per_s": round(rb.num_rows / write_s),
            }
            log(f"{name} batch {batch} {fmt}: {json.dumps(row[fmt])}")
        base = row["json"]["samples_per_s"]
        fast = row["json_msgspec"]["samples_per_s"]
        for fmt in FORMATS:
            row[fmt]["over_json"] = round(row[fmt]["samples_per_s"] / base, 2)
            row[fmt]["over_json_msgspec"] = round(row[fmt]["samples_per_s"] / fast, 2)
        out[str(batch)] = row
    at = out[str(BATCH_SIZES[-1])]
    out["goals_at_4096"] = {
        "arrow_ge_100x_json": at["arrow"]["over_json"] >= GOAL_ARROW_OVER_JSON,
        "example_ge_3x_json": at["example"]["over_json"] >= GOAL_EXAMPLE_OVER_JSON,
    }
    return out


def _numpy_hash(ids: np.ndarray, salt: int, buckets: int) -> np.ndarray:
    """The same hash as :func:`~minutely.data.hashing.hash_ids` in numpy (ten passes over the
    ids): the implementation the compiled kernel replaced, as the baseline."""
    z = ids.astype(np.uint64)
    z ^= np.uint64(salt)
    z += np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    z %= np.uint64(buckets)
    return z.view(np.int64)


def _best_rate(n: int, run: Callable[[], object], rounds: int) -> float:
    """Items per second of ``run`` (``n`` items), median of ``rounds`` timings after a warm-up."""
    run()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def codec_kernels(rb: pa.RecordBatch, schema: Schema, rounds: int) -> dict[str, Any]:
    """The decode and hash steps alone, in memory, on the first 4,096 samples: the bulk Example
    decoder against protobuf's Python API reading every value per record, and the compiled id
    hash against numpy's."""
    from minutely.data.example import ExampleSpec, examples_to_record_batch
    from minutely.data.hashing import feature_salt, hash_ids
    from minutely.data.proto.example_pb2 import Example

    part = rb.slice(0, BATCH_SIZES[-1])
    n = part.num_rows
    spec = ExampleSpec.build(schema)
    records = SampleWire(schema, SamplesConfig(format="example"), where="bench").encode(part)

    def protobuf_python() -> None:
        for r in records:
            feats = Example.FromString(r).features.feature
            for key in spec.keys.values():
                f = feats[key]
                list(f.int64_list.value) if f.HasField("int64_list") else list(f.float_list.value)

    ids = np.concatenate(
        [part.column(f.name).to_numpy() for f in schema.sparse if f.kind == "sparse"]
        + [part.column("user_interests").flatten().to_numpy()]
    )
    salt = feature_salt("user_interests")
    assert (hash_ids(ids, salt, BUCKETS) == _numpy_hash(ids, salt, BUCKETS)).all()
    decode = _best_rate(n, lambda: examples_to_record_batch(records, spec), rounds)
    python = _best_rate(n, protobuf_python, rounds)
    compiled = _best_rate(len(ids), lambda: hash_ids(ids, salt, BUCKETS), rounds)
    numpy_ids = _best_rate(len(ids), lambda: _numpy_hash(ids, salt, BUCKETS), rounds)
    return {
        "example_decode_records_per_s": round(decode),
        "protobuf_python_records_per_s": round(python),
        "decode_over_protobuf_python": round(decode / python, 2),
        "hash_ids_per_s": round(compiled),
        "numpy_hash_ids_per_s": round(numpy_ids),
        "hash_over_numpy": round(compiled / numpy_ids, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16,384 samples, 1 round")
    ap.add_argument("--samples", type=int, help="samples per format (default 65,536)")
    ap.add_argument("--ids", type=int, default=85, help="ids per sample in all")
    ap.add_argument("--rounds", type=int, help="reads per figure (median; default 3, 1 quick)")
    ap.add_argument("--backends", default="sqlite,kafka")
    args = ap.parse_args()
    n = args.samples if args.samples is not None else (16_384 if args.quick else 65_536)
    n -= n % BATCH_SIZES[-1]
    if n <= 0:
        raise SystemExit(f"--samples: expected at least {BATCH_SIZES[-1]}, got {args.samples}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    schema = default_schema()
    rb = make_batch(schema, n, args.ids)
    result: dict[str, Any] = {"samples": n, "ids_per_sample": args.ids, "rounds": rounds}
    result["kernels"] = codec_kernels(rb, schema, max(rounds, 5))
    log(f"kernels: {json.dumps(result['kernels'])}")
    work = Path(tempfile.mkdtemp(prefix="minutely-ingest-"))
    try:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                lg: Log = SqliteLog(work / "log.sqlite")
                try:
                    result["sqlite"] = run_backend("sqlite", lg, rb, schema, rounds)
                finally:
                    lg.close()
            elif backend == "kafka":
                broker = KafkaBroker(work / "broker")
                broker.start()
                try:
                    lg = KafkaLog(broker.bootstrap)
                    try:
                        result["kafka"] = run_backend("kafka", lg, rb, schema, rounds)
                    finally:
                        lg.close()
                finally:
                    broker.stop()
            else:
                raise SystemExit(f"--backends: expected sqlite and/or kafka, got {backend!r}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
