"""Bad input in the join, case by case: each goes to the dead-letter topic with its reason group
(:data:`minutely.events.REASONS`), or, when well-formed, is counted as late data or a repeat;
and the join goes on (an impression logged after it is joined)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minutely.clock import MS_PER_MIN, ReplayClock
from minutely.config import Config, load_config
from minutely.data import decode_batch, record_batch_to_samples
from minutely.events import (
    FUTURE_EVENT,
    REASONS,
    STALE_EVENT,
    UNJOINABLE_EVENT,
    Click,
    Conversion,
    Event,
    Impression,
    encode_event,
)
from minutely.pipeline.join_stage import JoinStage
from minutely.schema import default_schema
from minutely.stream import DeadLetter, SqliteLog, read_dead_letters
from minutely.stream.dead_letters import reason_group

MIN = MS_PER_MIN
NEXT = 777  # the impression logged after the bad input: the join must still join it


def config() -> Config:
    return load_config(
        None,
        {
            "stream": {"partitions": 1},
            "join": {"allowed_lateness_s": 30, "max_click_delay_s": 3_600, "max_clock_skew_s": 60},
            "models": [
                {"name": "ctr", "attribution_window_s": 600, "correction_horizon_s": 3_600},
                {
                    "name": "cvr",
                    "label": "conversion",
                    "attribution_window_s": 3_600,
                    "correction_horizon_s": 86_400,
                },
            ],
        },
    )


T0 = config().sim.start_ms


def features() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in default_schema().features:
        out[f.name] = 3 if f.kind == "sparse" else [1, 2] if f.kind == "multi_sparse" else 0.5
    return out


def imp(iid: int, at: int) -> Impression:
    return Impression(iid, T0 + at, features())


def click(iid: int, at: int) -> Click:
    return Click(iid, T0 + at)


def conversion(iid: int, at: int) -> Conversion:
    return Conversion(iid, T0 + at)


@dataclass
class Outcome:
    stage: JoinStage
    letters: list[DeadLetter]
    samples: Counter[tuple[str, int, int, bool]]


def join(tmp_path: Path, logged: list[tuple[Event | bytes, int]], *, hours: int = 3) -> Outcome:
    """Log ``(event, log time)`` pairs, then impression ``NEXT`` an hour in, and join all of it
    minute by minute for ``hours`` hours."""
    cfg = config()
    t0 = cfg.sim.start_ms
    log = SqliteLog(tmp_path / "log.sqlite")
    clock = ReplayClock(t0)
    js = JoinStage.from_config(log, cfg, default_schema(), clock)
    messages = [
        (None, ev if isinstance(ev, bytes) else encode_event(ev), t0 + at) for ev, at in logged
    ]
    messages.append((None, encode_event(imp(NEXT, 60 * MIN)), t0 + 60 * MIN))
    messages.sort(key=lambda m: m[2])
    log.append(cfg.stream.raw_topic, messages, partition=0)
    for minute in range(1, hours * 60 + 1):
        clock.advance_to(t0 + minute * MIN)
        js.run()
        js.advance_to(t0 + minute * MIN)
    out: Counter[tuple[str, int, int, bool]] = Counter()
    schema = default_schema()
    for m in cfg.models:
        for rec in log.read(m.samples_topic, 0, 0, 100_000):
            for s in record_batch_to_samples(decode_batch(rec.value, schema), schema):
                out[(m.name, s.sample_id, s.label, s.is_correction)] += 1
    return Outcome(js, read_dead_letters(log, cfg.stream.dead_letter_topic), out)


def went_on(o: Outcome) -> None:
    """The impression logged after the bad input was joined."""
    assert o.samples[("ctr", NEXT, 0, False)] == 1
    assert all(reason_group(letter.reason) in REASONS for letter in o.letters)


def test_a_conversion_of_an_impression_never_clicked_is_counted_as_late(tmp_path: Path) -> None:
    o = join(tmp_path, [(imp(1, 0), 0), (conversion(1, 5 * MIN), 5 * MIN)])
    assert o.stage.stats.late == {"no_click": 1}
    assert o.letters == []
    assert ("cvr", 1, 0, False) not in o.samples  # no click, no pCVR sample
    went_on(o)


def test_a_click_or_conversion_of_an_unknown_impression_is_counted_as_late(
    tmp_path: Path,
) -> None:
    o = join(tmp_path, [(click(5, 2 * MIN), 2 * MIN), (conversion(6, 3 * MIN), 3 * MIN)])
    assert o.stage.stats.late == {"no_impression": 2}
    assert o.letters == []
    went_on(o)


def test_a_click_stamped_far_before_its_held_impression_is_a_dead_letter(
    tmp_path: Path,
) -> None:
    early = encode_event(click(1, 8 * MIN))
    o = join(tmp_path, [(imp(1, 10 * MIN), 10 * MIN), (early, 10 * MIN + 1)])
    (letter,) = o.letters
    assert re.fullmatch(
        rf"{UNJOINABLE_EVENT}: EventError: Joiner\.process: click for impression 1 expected at "
        r"most 60000 ms before its impression \(join\.max_clock_skew_s\), got 120000 ms before",
        letter.reason,
    )
    assert (letter.source, letter.payload) == ("events/0@1", early)
    assert o.samples[("ctr", 1, 0, False)] == 1  # the impression joined, without the click
    went_on(o)


def test_a_waiting_click_whose_impression_comes_too_late_is_a_dead_letter(
    tmp_path: Path,
) -> None:
    # The click is logged first and waits (within the lateness); its impression, stamped 90 s
    # later, arrives: too far apart for a clock skew.
    o = join(tmp_path, [(click(1, 10 * MIN), 10 * MIN), (imp(1, 10 * MIN + 90_000), 10 * MIN + 5)])
    (letter,) = o.letters
    assert letter.reason == (
        f"{UNJOINABLE_EVENT}: Joiner.process: click for impression 1 expected at most 60000 ms "
        "before its impression (join.max_clock_skew_s), got 90000 ms before"
    )
    assert (letter.source, letter.payload) == ("join/events/0", encode_event(click(1, 10 * MIN)))
    assert o.samples[("ctr", 1, 0, False)] == 1
    assert o.stage.stats.late == {}
    went_on(o)


def test_a_click_stamped_a_little_before_its_impression_joins(tmp_path: Path) -> None:
    o = join(tmp_path, [(click(1, 10 * MIN), 10 * MIN), (imp(1, 10 * MIN + 50_000), 10 * MIN + 5)])
    assert o.letters == []
    assert o.samples[("ctr", 1, 1, False)] == 1
    went_on(o)


def test_a_repeated_impression_is_counted_once(tmp_path: Path) -> None:
    o = join(tmp_path, [(imp(1, 0), 0), (imp(1, 0), 1), (click(1, MIN), MIN), (click(1, MIN), MIN)])
    assert o.stage.stats.duplicates == 2  # the impression and the click
    assert o.letters == []
    assert o.samples[("ctr", 1, 1, False)] == 1
    assert sum(n for (m, iid, _, _), n in o.samples.items() if (m, iid) == ("ctr", 1)) == 1
    went_on(o)


def test_an_impression_id_reused_with_other_content_is_a_dead_letter(tmp_path: Path) -> None:
    other = encode_event(imp(1, 2 * MIN))
    o = join(tmp_path, [(imp(1, 0), 0), (other, 2 * MIN)])
    (letter,) = o.letters
    assert letter.reason == (
        f"{UNJOINABLE_EVENT}: EventError: Joiner.process: impression 1 expected to repeat the "
        f"held one (ts_ms {T0}) or to be new, got ts_ms {T0 + 2 * MIN}"
    )
    assert (letter.source, letter.payload) == ("events/0@1", other)
    assert o.samples[("ctr", 1, 0, False)] == 1  # the first one, once
    went_on(o)


def test_events_beyond_the_clock_skew_bounds_of_the_log_are_dead_letters(
    tmp_path: Path,
) -> None:
    cfg = config()
    ahead = cfg.ingest.max_future_s * 1000 + 1
    behind = cfg.ingest.max_past_s * 1000 + 1
    future = encode_event(click(1, 10 * MIN + ahead))
    stale = encode_event(imp(2, 10 * MIN - behind))
    o = join(tmp_path, [(imp(1, 0), 0), (future, 10 * MIN), (stale, 10 * MIN + 1)])
    assert [reason_group(letter.reason) for letter in o.letters] == [FUTURE_EVENT, STALE_EVENT]
    assert [letter.payload for letter in o.letters] == [future, stale]
    assert o.samples[("ctr", 1, 0, False)] == 1  # the future click was not joined
    went_on(o)
