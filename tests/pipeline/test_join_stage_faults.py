"""No record stops the join stage: a refused event, a joiner failure, an unencodable sample each
cost one dead letter, once, also across a resume; and an early-stamped click moves no watermark
past the clock."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from minutely.clock import MS_PER_MIN, ReplayClock
from minutely.config import Config
from minutely.data import decode_batch, record_batch_to_samples
from minutely.events import (
    INVALID_IMPRESSION,
    UNDECODABLE_EVENT,
    UNENCODABLE_SAMPLE,
    UNJOINABLE_EVENT,
    Click,
    Event,
    EventValidator,
    Impression,
    encode_event,
)
from minutely.join import Joiner
from minutely.pipeline.join_stage import JoinStage
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import SqliteLog, read_dead_letters
from minutely.stream.dead_letters import reason_group

BAD_ID = 10**15  # no simulated impression has this id
HALF_HOUR = 30 * MS_PER_MIN


def stage(
    cfg: Config, log: SqliteLog, clock: ReplayClock, state: dict[str, Any] | None = None
) -> JoinStage:
    return JoinStage.from_config(log, cfg, default_schema(), clock, state)


def features(dense: float = 0.5) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in default_schema().features:
        out[f.name] = 3 if f.kind == "sparse" else [1, 2] if f.kind == "multi_sparse" else dense
    return out


def step(js: JoinStage, clock: ReplayClock, now: int) -> None:
    clock.advance_to(now)
    js.run()
    js.advance_to(now)


def samples(cfg: Config, log: SqliteLog) -> Counter[tuple[str, int, int, bool]]:
    out: Counter[tuple[str, int, int, bool]] = Counter()
    schema = default_schema()
    for m in cfg.models:
        for p in range(log.partitions(m.samples_topic)):
            for rec in log.read(m.samples_topic, p, 0, 100_000):
                for s in record_batch_to_samples(decode_batch(rec.value, schema), schema):
                    out[(m.name, s.sample_id, s.label, s.is_correction)] += 1
    return out


def ends(cfg: Config, log: SqliteLog) -> list[int]:
    return [
        log.end_offset(m.samples_topic, p) for m in cfg.models for p in range(cfg.stream.partitions)
    ]


def two_halves(cfg: Config, log: SqliteLog, bad: bytes | None) -> tuple[JoinStage, dict[str, Any]]:
    """Join the first half hour, snapshot, then the second with ``bad`` logged in it."""
    start = cfg.sim.start_ms
    batch = Market(cfg.sim).events_between(start, start + 2 * HALF_HOUR)
    first = [m for m in batch.messages() if m[2] < start + HALF_HOUR]
    second = [m for m in batch.messages() if m[2] >= start + HALF_HOUR]
    clock = ReplayClock(start)
    js = stage(cfg, log, clock)
    log.append(cfg.stream.raw_topic, first)
    step(js, clock, start + HALF_HOUR)
    state = json.loads(json.dumps(js.snapshot()))  # as a checkpoint stores it
    if bad is not None:
        ts = start + HALF_HOUR + 1
        second = [(BAD_ID.to_bytes(8, "big"), bad, ts), *second]
    log.append(cfg.stream.raw_topic, second)
    step(js, clock, start + 2 * HALF_HOUR)
    return js, state


def fail_joining(monkeypatch: pytest.MonkeyPatch, bad_ids: set[int]) -> None:
    """Make the joiner fail on the events of ``bad_ids``, alone: the others join one by one."""
    process_clocked = Joiner.process_clocked

    def failing(
        self: Joiner,
        events: Iterable[tuple[Event, int]],
        on_error: Callable[[int, Exception], None] | None = None,
    ) -> None:
        for i, pair in enumerate(events):
            if pair[0].imp_id not in bad_ids:
                process_clocked(self, [pair])
            elif on_error is None:
                raise RuntimeError("joiner state is inconsistent")
            else:
                on_error(i, RuntimeError("joiner state is inconsistent"))

    monkeypatch.setattr(Joiner, "process_clocked", failing)


def bad_impression(cfg: Config, dense: float) -> bytes:
    """An impression logged in the second half hour (see :func:`two_halves`)."""
    return encode_event(Impression(BAD_ID, cfg.sim.start_ms + HALF_HOUR + 1, features(dense)))


@pytest.mark.parametrize(
    ("fault", "group", "source"),
    [
        ("refused", INVALID_IMPRESSION, r"events/\d+@\d+"),
        ("joiner fails", UNJOINABLE_EVENT, r"events/\d+@\d+"),
        ("unencodable", UNENCODABLE_SAMPLE, r"join/ctr/\d+"),
    ],
)
def test_one_bad_record_costs_one_dead_letter_also_across_a_resume(
    tmp_path: Path,
    small_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    group: str,
    source: str,
) -> None:
    cfg = small_cfg
    if fault == "joiner fails":
        fail_joining(monkeypatch, {BAD_ID})
    if fault == "unencodable":  # an ingest check that lets a float32 overflow through
        monkeypatch.setattr(EventValidator, "check", lambda self, event, now_ms: None)
    bad = bad_impression(cfg, 1e39 if fault != "joiner fails" else 0.5)

    reference_log = SqliteLog(tmp_path / "reference.sqlite")
    two_halves(cfg, reference_log, None)
    log = SqliteLog(tmp_path / "log.sqlite")
    js, state = two_halves(cfg, log, bad)

    (letter,) = read_dead_letters(log, cfg.stream.dead_letter_topic)
    assert reason_group(letter.reason) == group
    assert re.fullmatch(source, letter.source)
    assert js.stats.dead_letters_by_reason == {group: 1}
    if fault == "unencodable":
        (sample,) = msgspec.json.decode(letter.payload)
        assert (sample["sample_id"], sample["features"]["ad_ctr_1h"]) == (BAD_ID, 1e39)
        assert re.match(rf"{group}: sample_id {BAD_ID}: .*float32 range", letter.reason)
    else:
        assert letter.payload == bad
    expected = samples(cfg, reference_log)
    assert samples(cfg, log) == expected  # everything else joined, nothing of the bad record
    written = ends(cfg, log)

    # A restore from the snapshot taken just before the bad record replays it: no crash, and
    # its letter and the samples after it are not written again.
    start = cfg.sim.start_ms
    clock = ReplayClock(start + HALF_HOUR)
    again = stage(cfg, log, clock, state)
    step(again, clock, start + 2 * HALF_HOUR)
    assert read_dead_letters(log, cfg.stream.dead_letter_topic) == [letter]
    assert again.stats.dead_letters == 1
    assert again.stats.dead_letters_by_reason == {group: 1}
    assert ends(cfg, log) == written
    assert samples(cfg, log) == expected
    assert again.stats.samples == js.stats.samples
    log.close()
    reference_log.close()


def test_a_batch_of_only_unencodable_samples_writes_no_message(
    tmp_path: Path, small_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(EventValidator, "check", lambda self, event, now_ms: None)
    log = SqliteLog(tmp_path / "log.sqlite")
    start = small_cfg.sim.start_ms
    clock = ReplayClock(start)
    js = stage(small_cfg, log, clock)
    bad = encode_event(Impression(BAD_ID, start, features(-1e39)))
    log.append(small_cfg.stream.raw_topic, [(BAD_ID.to_bytes(8, "big"), bad, start)])
    step(js, clock, start + HALF_HOUR)
    (letter,) = read_dead_letters(log, small_cfg.stream.dead_letter_topic)
    assert letter.reason.startswith(f"{UNENCODABLE_SAMPLE}: sample_id {BAD_ID}: ")
    assert ends(small_cfg, log) == [0] * len(ends(small_cfg, log))
    assert js.stats.samples == {"ctr": 0, "cvr": 0}


def test_dead_letters_keep_the_order_of_their_records(
    tmp_path: Path, small_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_joining(monkeypatch, {BAD_ID, BAD_ID + 3})
    log = SqliteLog(tmp_path / "log.sqlite")
    start = small_cfg.sim.start_ms
    clock = ReplayClock(start)
    js = stage(small_cfg, log, clock)
    key = BAD_ID.to_bytes(8, "big")  # one key: one partition, in this order
    values = [
        encode_event(Impression(BAD_ID, start, features())),  # the joiner fails
        b"{",  # refused
        encode_event(Impression(BAD_ID + 2, start, features())),  # joined
        encode_event(Impression(BAD_ID + 3, start, features())),  # the joiner fails
        encode_event(Impression(BAD_ID + 4, start, features(1e39))),  # refused
    ]
    placed = log.append(small_cfg.stream.raw_topic, [(key, v, start) for v in values])
    step(js, clock, start + HALF_HOUR)
    letters = read_dead_letters(log, small_cfg.stream.dead_letter_topic)
    (partition,) = {p for p, _ in placed}
    assert [(reason_group(letter.reason), letter.source) for letter in letters] == [
        (UNJOINABLE_EVENT, f"events/{partition}@0"),
        (UNDECODABLE_EVENT, f"events/{partition}@1"),
        (UNJOINABLE_EVENT, f"events/{partition}@3"),
        (INVALID_IMPRESSION, f"events/{partition}@4"),
    ]
    assert js.stats.samples["ctr"] == 1
    log.close()


def test_a_click_stamped_ahead_of_the_clock_leaves_valid_impressions_on_time(
    tmp_path: Path, small_cfg: Config
) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    now = small_cfg.sim.start_ms + HALF_HOUR
    clock = ReplayClock(now)
    js = stage(small_cfg, log, clock)
    early_click = encode_event(Click(1, now + 290_000))  # within ingest.max_future_s
    impression = encode_event(Impression(2, now - 10_000, features()))
    # One partition: the click's watermark is the one the impression is judged by.
    log.append(
        small_cfg.stream.raw_topic,
        [(None, early_click, now - 2_000), (None, impression, now - 1_000)],
        partition=0,
    )
    js.run()
    step(js, clock, now + 700_000)  # past the impression's 600 s window
    assert js.stats.dead_letters == 0
    assert "late_impression" not in js.stats.late
    assert samples(small_cfg, log) == Counter({("ctr", 2, 0, False): 1})
    log.close()
