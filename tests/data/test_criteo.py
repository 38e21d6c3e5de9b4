"""The Criteo conversion-log reader and writer: round trips, event order, malformed lines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minutely.config import JoinConfig, ModelConfig, SimConfig
from minutely.data.criteo import (
    CATEGORICAL_NAMES,
    INT_NAMES,
    MISSING_ID,
    CriteoLineError,
    CriteoRecord,
    CriteoReport,
    criteo_events,
    criteo_schema,
    format_line,
    parse_line,
    read_criteo_events,
    read_records,
    sim_categorical_hash,
    traffic_records,
    write_criteo,
)
from minutely.errors import EventError
from minutely.events import Click, Conversion, EventValidator, Impression
from minutely.join import Joiner
from minutely.sim import IMP_ID_STRIDE, DayTraffic, Market

BASE = 1_767_225_600_000
INTS = (1, 2, 3, 4, 5, 6, 7, 8)
CATS = (0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 0x10, 0x11, 0x12)


def rec(click: int, conv: int | None = None) -> CriteoRecord:
    return CriteoRecord(click, conv, INTS, CATS)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")
    return path


GOOD = format_line(rec(10, 20))
GOOD_COLS = GOOD.split("\t")


def with_col(k: int, value: str) -> str:
    """:data:`GOOD` with column ``k`` (0-based) replaced."""
    cols = list(GOOD_COLS)
    cols[k] = value
    return "\t".join(cols)


# --- the simulator's traffic, written and read back ----------------------------------------


@pytest.fixture(scope="module")
def sim_days() -> tuple[SimConfig, list[DayTraffic]]:
    cfg = replace(SimConfig(), impressions_per_day=40_000, users=3_000, delay_preset="criteo")
    market = Market(cfg)
    return cfg, [market.simulate_day(0), market.simulate_day(1)]


def expected_features(t: DayTraffic, row: int) -> dict[str, int]:
    """The documented mapping of one simulated impression, computed one value at a time."""
    f = t.features
    values, offsets = f["user_interests"]
    interests = [int(v) for v in values[offsets[row] : offsets[row + 1]]]
    out = {
        "i1": round(float(f["ad_age_hours"][row]) * 60),
        "i2": round(float(f["user_activity"][row]) * 1e4),
        "i3": round(float(f["ad_ctr_1h"][row]) * 1e5),
        "i4": len(interests),
        "i5": int(f["hour_of_day"][row]),
        "i6": int(f["slot"][row]),
        "i7": int(f["device"][row]),
        "i8": 0,  # missing
    }
    names: tuple[str, ...] = ("user_id", "ad_id", "campaign_id", "advertiser_id", "category")
    names += ("slot", "device", "hour_of_day")
    for k, name in enumerate(names, start=1):
        out[f"c{k}"] = int(sim_categorical_hash(name, np.array([f[name][row]]))[0])
    first = np.array([interests[0] if interests else 0])
    out["c9"] = int(sim_categorical_hash("user_interests", first)[0]) if interests else MISSING_ID
    return out


def test_sim_traffic_round_trips_through_a_criteo_file(
    tmp_path: Path, sim_days: tuple[SimConfig, list[DayTraffic]]
) -> None:
    cfg, days = sim_days
    records, sim_ids = traffic_records(days, cfg.start_ms)
    path = tmp_path / "log.txt"
    assert write_criteo(path, records) == len(records) == sum(int(t.clicked.sum()) for t in days)
    report = CriteoReport()
    events = list(read_criteo_events(path, cfg.start_ms, report=report))
    assert (report.lines, report.accepted, report.rejected) == (len(records), len(records), 0)

    # Stream order: (ts, kind, imp_id) with impression < click < conversion.
    kinds = {Impression: 0, Click: 1, Conversion: 2}
    keys = [(e.ts_ms, kinds[type(e)], e.imp_id) for e in events]
    assert keys == sorted(keys)

    line_of = {int(s): k + 1 for k, s in enumerate(sim_ids)}  # sim imp id -> line number
    assert len(line_of) == len(records)

    def floor_s(ts: int) -> int:
        return cfg.start_ms + (ts - cfg.start_ms) // 1000 * 1000

    sim_clicks = {
        (line_of[int(i)], floor_s(int(ts)))
        for t in days
        for i, ts in zip(t.click_imp_id, t.click_ts_ms, strict=True)
    }
    sim_convs = {
        (line_of[int(i)], floor_s(int(ts)))
        for t in days
        for i, ts in zip(t.conv_imp_id, t.conv_ts_ms, strict=True)
    }
    read_clicks = {(e.imp_id, e.ts_ms) for e in events if isinstance(e, Click)}
    read_convs = {(e.imp_id, e.ts_ms) for e in events if isinstance(e, Conversion)}
    assert read_clicks == sim_clicks
    assert read_convs == sim_convs
    assert len(sim_convs) > 100  # the criteo preset converts some of the clicks

    impressions = [e for e in events if isinstance(e, Impression)]
    assert {(e.imp_id, e.ts_ms) for e in impressions} == read_clicks
    by_day = {t.day: t for t in days}
    for e in impressions[::97]:
        sim_id = int(sim_ids[e.imp_id - 1])
        t = by_day[sim_id // IMP_ID_STRIDE]
        row = int(np.searchsorted(t.imp_id, sim_id))
        assert e.features == expected_features(t, row)


def test_read_events_pass_the_ingest_check_of_the_criteo_schema(
    tmp_path: Path, sim_days: tuple[SimConfig, list[DayTraffic]]
) -> None:
    cfg, days = sim_days
    path = tmp_path / "log.txt"
    write_criteo(path, traffic_records(days[:1], cfg.start_ms)[0])
    validator = EventValidator(criteo_schema(), max_future_ms=0, max_past_ms=0)
    n = 0
    for e in read_criteo_events(path, cfg.start_ms):
        validator.check(e, now_ms=e.ts_ms)
        n += 1
    assert n > 0


def test_traffic_records_refuse_a_start_after_a_click(
    sim_days: tuple[SimConfig, list[DayTraffic]],
) -> None:
    cfg, days = sim_days
    with pytest.raises(ValueError, match=r"traffic_records: expected clicks at or after start_ms"):
        traffic_records(days, cfg.start_ms + 86_400_000)


# --- lines --------------------------------------------------------------------------------

maybe_int = st.none() | st.integers(-(10**18) + 1, 10**18 - 1)
maybe_cat = st.none() | st.integers(0, 2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(
    click=st.integers(0, 10**15 - 1),
    delay=st.none() | st.integers(0, 10**9),
    ints=st.tuples(*[maybe_int] * 8),
    cats=st.tuples(*[maybe_cat] * 9),
)
def test_a_record_round_trips_through_a_line(
    click: int,
    delay: int | None,
    ints: tuple[int | None, ...],
    cats: tuple[int | None, ...],
) -> None:
    conv = None if delay is None or click + delay >= 10**15 else click + delay
    record = CriteoRecord(click, conv, ints, cats)
    line = format_line(record)
    assert line.count("\t") == 18
    assert parse_line(line.encode() + b"\r\n", 1) == record


def test_missing_features_read_as_zero_and_missing_id() -> None:
    line = "\t".join(["3", ""] + [""] * 17)
    record = parse_line(line.encode(), 1)
    assert record == CriteoRecord(3, None, (None,) * 8, (None,) * 9)
    feats = record.features()
    assert [feats[n] for n in INT_NAMES] == [0] * 8
    assert [feats[n] for n in CATEGORICAL_NAMES] == [MISSING_ID] * 9
    assert sorted(feats) == sorted(f.name for f in criteo_schema().features)


def test_the_public_logs_lowercase_or_short_hex_reads_as_its_value() -> None:
    record = parse_line(with_col(10, "5d7a4c0b").encode(), 1)
    assert record.cats[0] == 0x5D7A4C0B
    assert parse_line(with_col(11, "f").encode(), 1).cats[1] == 15


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1\t2\t3", "criteo line 7: column count: expected 19 tab-separated columns, got 3"),
        (GOOD + "\t", "criteo line 7: column count: expected 19 tab-separated columns, got 20"),
        (
            with_col(0, "1.5"),
            "criteo line 7: click timestamp: expected an integer of seconds >= 0, got '1.5'",
        ),
        (
            with_col(0, "-3"),
            "criteo line 7: click timestamp: expected an integer of seconds >= 0, got '-3'",
        ),
        (
            with_col(1, "x"),
            "criteo line 7: conversion timestamp: expected empty or an integer of seconds >= 0, "
            "got 'x'",
        ),
        (
            with_col(1, "9"),
            "criteo line 7: conversion timestamp: expected empty or a time at or after the "
            "click (10), got 9",
        ),
        (
            with_col(4, "2e3"),
            "criteo line 7: integer feature i3 (column 5): expected empty or an integer of at "
            "most 18 digits, got '2e3'",
        ),
        (
            with_col(9, "1" * 19),
            "criteo line 7: integer feature i8 (column 10): expected empty or an integer of at "
            f"most 18 digits, got '{'1' * 19}'",
        ),
        (
            with_col(11, "0x1F"),
            "criteo line 7: categorical feature c2 (column 12): expected empty or a hex string "
            "of at most 16 digits below 8000000000000000, got '0x1F'",
        ),
        (
            with_col(18, "F" * 16),
            "criteo line 7: categorical feature c9 (column 19): expected empty or a hex string "
            f"of at most 16 digits below 8000000000000000, got '{'F' * 16}'",
        ),
    ],
)
def test_a_malformed_line_is_refused_naming_the_line_and_field(line: str, message: str) -> None:
    with pytest.raises(CriteoLineError) as info:
        parse_line(line.encode(), 7)
    assert str(info.value) == message
    assert info.value.line_no == 7
    assert isinstance(info.value, EventError)


def test_malformed_lines_are_dead_letters_and_the_good_ones_go_on(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "log.txt",
        [
            format_line(rec(5, 8)),
            "junk",
            with_col(4, "abc"),
            with_col(2, "x"),
            format_line(rec(12)),
            format_line(rec(11)),  # earlier than the line before it
            format_line(rec(12, 20)),
        ],
    )
    report = CriteoReport(max_examples=2)
    got = list(read_records(path, report=report))
    assert [(n, r) for n, r in got] == [(1, rec(5, 8)), (5, rec(12)), (7, rec(12, 20))]
    assert (report.lines, report.accepted, report.rejected) == (7, 3, 4)
    assert report.by_field == {
        "column count": 1,
        "integer feature i3": 1,
        "integer feature i1": 1,
        "click timestamp": 1,
    }
    assert report.examples == [
        "criteo line 2: column count: expected 19 tab-separated columns, got 1",
        "criteo line 3: integer feature i3 (column 5): expected empty or an integer of at most "
        "18 digits, got 'abc'",
    ]
    assert report.summary() == (
        "criteo log: 7 lines, 3 accepted, 4 skipped (click timestamp: 1, column count: 1, "
        "integer feature i1: 1, integer feature i3: 1)"
    )


def test_a_click_earlier_than_the_previous_line_is_named(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "log.txt", [format_line(rec(12)), format_line(rec(11))])
    with pytest.raises(CriteoLineError) as info:
        list(read_records(path, strict=True))
    assert str(info.value) == (
        "criteo line 2: click timestamp: expected a time at or after the previous click (12), "
        "got 11"
    )


def test_strict_reading_raises_at_the_first_bad_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "log.txt", [format_line(rec(1)), "a\tb"])
    reader = read_records(path, strict=True)
    assert next(reader) == (1, rec(1))
    with pytest.raises(CriteoLineError, match=r"^criteo line 2: column count: expected 19"):
        next(reader)


# --- events -------------------------------------------------------------------------------


def test_events_come_in_time_order_with_conversions_held_until_their_time(
    tmp_path: Path,
) -> None:
    path = write_lines(
        tmp_path / "log.txt",
        [
            format_line(rec(5, 7)),
            format_line(rec(5)),
            format_line(rec(6, 6)),  # converts in the second of its click
            format_line(rec(7, 30)),
        ],
    )
    events = list(read_criteo_events(path, BASE))
    feats = rec(0).features()

    def at(s: int) -> int:
        return BASE + s * 1000

    assert events == [
        Impression(1, at(5), feats),
        Impression(2, at(5), feats),
        Click(1, at(5)),
        Click(2, at(5)),
        Impression(3, at(6), feats),
        Click(3, at(6)),
        Conversion(3, at(6)),
        Impression(4, at(7), feats),
        Click(4, at(7)),
        Conversion(1, at(7)),
        Conversion(4, at(30)),
    ]


def test_criteo_events_refuse_a_negative_base_and_unordered_input() -> None:
    with pytest.raises(ValueError, match=r"expected base_ms an int in \[0, 2\*\*62\), got -1"):
        list(criteo_events([], -1))
    with pytest.raises(CriteoLineError, match=r"^criteo line 2: line number: expected a number"):
        list(criteo_events([(3, rec(1)), (2, rec(2))], BASE))
    with pytest.raises(
        CriteoLineError,
        match=r"^criteo line 4: click timestamp: expected a time at or after the previous "
        r"click \(9\), got 8$",
    ):
        list(criteo_events([(3, rec(9)), (4, rec(8))], BASE))


def test_the_joiner_labels_read_events_by_conversion_delay(tmp_path: Path) -> None:
    """Window 1 h, horizon 1 day: a positive, a correction, a negative, in line order."""
    path = write_lines(
        tmp_path / "log.txt",
        [
            format_line(rec(0, 3_000)),  # within the window
            format_line(rec(10, 50_000)),  # after the window, within the horizon
            format_line(rec(20, 200_000)),  # after the horizon
            format_line(rec(30)),  # never
        ],
    )
    cvr = ModelConfig(
        name="cvr", label="conversion", attribution_window_s=3_600, correction_horizon_s=86_400
    )
    joiner = Joiner([cvr], JoinConfig(allowed_lateness_s=0, max_click_delay_s=0), criteo_schema())
    joiner.process_many(read_criteo_events(path, BASE))
    joiner.flush_all()
    got = sorted((s.sample_id, s.label, s.is_correction) for s in joiner.drain()["cvr"])
    assert got == [(1, 1, False), (2, 0, False), (2, 1, True), (3, 0, False), (4, 0, False)]


# --- records and the writer ---------------------------------------------------------------


def test_write_refuses_clicks_out_of_order(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"write_criteo: record 1: expected click_s >= the previous record's 5"
    ):
        write_criteo(tmp_path / "log.txt", [rec(5), rec(4)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"click_s": -1}, r"CriteoRecord.click_s: expected in \[0, 10\*\*15\), got -1"),
        ({"conversion_s": 9}, r"CriteoRecord.conversion_s: expected None or in \[click_s 10"),
        ({"ints": (1,)}, r"CriteoRecord: expected 8 ints and 9 categoricals, got 1 and 9"),
        ({"ints": (10**18, *INTS[1:])}, r"CriteoRecord.i1: expected \|value\| < 10\*\*18"),
        ({"cats": (*CATS[:8], -2)}, r"CriteoRecord.c9: expected an id in \[0, 2\*\*63\), got -2"),
    ],
)
def test_a_record_the_format_cannot_hold_is_refused(
    kwargs: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {
        "click_s": 10,
        "conversion_s": None,
        "ints": INTS,
        "cats": CATS,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        CriteoRecord(**fields)  # type: ignore[arg-type]


def test_categorical_hashes_are_32_bit_and_salted_per_feature() -> None:
    ids = np.arange(1_000, dtype=np.int64)
    user = sim_categorical_hash("user_id", ids)
    ad = sim_categorical_hash("ad_id", ids)
    assert ((user >= 0) & (user < 2**32)).all()
    assert len(set(user.tolist())) == len(ids)
    assert (user != ad).any()
    assert (sim_categorical_hash("user_id", ids) == user).all()
