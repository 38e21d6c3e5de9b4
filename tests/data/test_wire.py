"""Samples-topic messages in each sample format: encode, decode, and what is refused."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from minutely.config import ModelConfig, SamplesConfig, load_config
from minutely.data import encode_batch, samples_to_record_batch
from minutely.data.example import encode_tfrecords
from minutely.data.samples import Sample
from minutely.data.wire import SampleWire
from minutely.errors import CodecError, ConfigError
from minutely.events import UNDECODABLE_SAMPLES
from minutely.pipeline.learner import SampleWindows
from minutely.schema import default_schema
from minutely.stream import DeadLetterSink, KafkaLog, Log, SqliteLog, read_dead_letters

SCHEMA = default_schema()
WHERE = "models.ctr.samples"


def sample(sid: int, interests: int = 3, emit: int = 1_000) -> Sample:
    feats: dict[str, int | float | list[int]] = {}
    for f in SCHEMA.features:
        if f.kind == "sparse":
            feats[f.name] = sid * 10 + len(feats)
        elif f.kind == "multi_sparse":
            feats[f.name] = list(range(interests))
        else:
            feats[f.name] = 0.5
    return Sample(sid, 500, emit, sid % 2, False, emit if sid % 2 else -1, feats)


def batch(*samples: Sample) -> pa.RecordBatch:
    return samples_to_record_batch(list(samples), SCHEMA)


def wire(fmt: str, **kw: object) -> SampleWire:
    return SampleWire(SCHEMA, SamplesConfig(format=fmt, **kw), where=WHERE)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["arrow", "example", "tfrecord"])
def test_every_format_round_trips_a_batch(fmt: str) -> None:
    w = wire(fmt)
    rb = batch(sample(1), sample(2, interests=0), sample(3, interests=7))
    msgs = w.encode(rb)
    assert len(msgs) == (3 if fmt == "example" else 1)
    table, refused = w.decode(msgs)
    assert refused == []
    assert table is not None
    assert table.combine_chunks().to_batches()[0].equals(rb)
    assert w.encode(rb.slice(0, 0)) == []
    assert w.decode([]) == (None, [])


def test_the_format_and_max_ids_are_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.samples\.format.*'json'"):
        load_config(None, {"models": [{"name": "ctr", "samples": {"format": "json"}}]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.samples\.max_ids.*>= 1"):
        load_config(None, {"models": [{"name": "ctr", "samples": {"max_ids": 0}}]})
    cfg = load_config(
        None,
        {"models": [{"name": "ctr", "samples": {"format": "tfrecord", "keys": {"label": "clk"}}}]},
    )
    assert cfg.model("ctr").samples == SamplesConfig(format="tfrecord", keys={"label": "clk"})


def test_a_key_for_no_field_fails_when_the_stage_starts_naming_it(tmp_path: Path) -> None:
    model = replace(ModelConfig(), samples=SamplesConfig(format="example", keys={"nope": "x"}))
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic(model.samples_topic, 1)
    with pytest.raises(ConfigError, match=r"models\.ctr\.samples\.keys\.nope"):
        SampleWindows(log, model, SCHEMA, 8)
    log.close()


def test_renamed_keys_are_what_the_examples_carry() -> None:
    from tfrecord import example_pb2 as reference

    w = wire("example", keys={"label": "clk", "user_id": "uid"})
    (msg,) = w.encode(batch(sample(1)))
    keys = set(reference.Example.FromString(msg).features.feature)
    assert {"clk", "uid"} <= keys
    assert not {"label", "user_id"} & keys
    table, refused = w.decode([msg])
    assert refused == []
    assert table is not None
    assert table.num_rows == 1
    # Read with the default keys, the same record names what it lacks.
    _, refused = wire("example").decode([msg])
    assert "unknown key 'clk'" in refused[0].reason


def test_arrow_samples_over_max_ids_are_refused_and_the_rest_go_on() -> None:
    w = wire("arrow", max_ids=5)
    msg = encode_batch(batch(sample(1), sample(2, interests=6), sample(3)))
    table, refused = w.decode([msg])
    assert table is not None
    assert table.column("sample_id").to_pylist() == [1, 3]
    (bad,) = refused
    assert (bad.message, bad.record) == (0, None)
    assert bad.reason == (
        "1 sample(s) over max_ids; first sample_id 2: feature 'user_interests': too many ids: "
        "6 > max_ids 5"
    )
    assert wire("arrow").decode([bad.payload])[0].column("sample_id").to_pylist() == [2]


def test_a_bad_message_or_record_is_refused_alone_with_where_it_was() -> None:
    ex = wire("example")
    good = ex.encode(batch(sample(1), sample(2)))
    table, refused = ex.decode([good[0], b"\xff\xff", good[1]])
    assert table is not None
    assert table.column("sample_id").to_pylist() == [1, 2]
    assert [(r.message, r.record, r.payload) for r in refused] == [(1, None, b"\xff\xff")]
    assert refused[0].reason.startswith("not a valid Example")

    tf = wire("tfrecord")
    framed = encode_tfrecords([good[0], b"\x08", good[1]])  # a record that is no Example
    table, refused = tf.decode([framed, b"garbage that is no framing"])
    assert table is not None
    assert table.column("sample_id").to_pylist() == [1, 2]
    assert [(r.message, r.record) for r in refused] == [(0, 1), (1, 0)]
    assert refused[0].payload == b"\x08"
    assert refused[1].payload == b"garbage that is no framing"
    assert refused[1].reason.startswith("tfrecord framing: ")

    arrow = wire("arrow")
    table, refused = arrow.decode([b"not arrow", encode_batch(batch(sample(5)))])
    assert table is not None
    assert table.column("sample_id").to_pylist() == [5]
    assert refused[0].reason.startswith("sample batch: expected an Arrow IPC stream")


def test_a_tfrecord_record_is_named_by_its_frame_after_a_refused_frame() -> None:
    tf = wire("tfrecord")
    good = wire("example").encode(batch(sample(1), sample(2)))
    framed = bytearray(encode_tfrecords([good[0], good[1], b"\x08", good[0]]))
    framed[8 + 4 + len(good[0]) + 4 + 12] ^= 1  # a byte of frame 1's data: its crc fails
    table, refused = tf.decode([encode_tfrecords([good[1]]), bytes(framed)])
    assert table is not None
    assert table.column("sample_id").to_pylist() == [2, 1, 1]
    assert [(r.message, r.record) for r in refused] == [(1, 1), (1, 2)]
    assert refused[0].reason.startswith("tfrecord framing: ")
    assert refused[1].reason.startswith("not a valid Example")
    assert refused[1].payload == b"\x08"


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("kafka", marks=pytest.mark.integration)]
)
def test_the_trainer_sends_bad_examples_to_dead_letters_with_their_offset(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    name = f"ctr{uuid.uuid4().hex[:8]}"  # topics of their own on the session's broker
    model = replace(ModelConfig(name=name), samples=SamplesConfig(format="example"))
    log: Log
    if backend == "kafka":
        log = KafkaLog(request.getfixturevalue("kafka_bootstrap"))
    else:
        log = SqliteLog(tmp_path / "log.sqlite")
    topic, dead = model.samples_topic, f"dead_letters.{name}"
    log.create_topic(topic, 1)
    good = wire("example").encode(batch(sample(1), sample(2)))
    log.append(topic, [(None, good[0], 10), (None, b"\x0a", 10), (None, good[1], 10)])
    sink = DeadLetterSink(log, dead)
    windows = SampleWindows(log, model, SCHEMA, 8, dead_letters=sink)
    table = windows.read_table(100)
    assert table is not None
    assert table.column("sample_id").to_pylist() == [1, 2]
    (letter,) = read_dead_letters(log, dead)
    assert letter.source == f"{topic}/0@1"
    assert letter.reason.startswith(f"{UNDECODABLE_SAMPLES}: not a valid Example")
    assert letter.payload == b"\x0a"
    # Without a sink the bad record stops the read, naming where it is.
    strict = SampleWindows(log, model, SCHEMA, 8)
    with pytest.raises(CodecError, match=rf"{topic}/0@1: not a valid Example"):
        strict.read_table(100)
    windows.close()
    strict.close()
    log.close()
