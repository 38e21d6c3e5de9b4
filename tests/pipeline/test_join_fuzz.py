"""Fuzz: 10,000 malformed raw events among valid simulator events, through a running join stage.

Each bad event has one defect of a known kind, and each kind one dead-letter reason group. The
stage must let no exception escape, dead-letter every bad event once under its kind's group, and
emit exactly the samples of a run over the valid events alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from pipeline_helpers import SMALL

from minutely.clock import MS_PER_HOUR, MS_PER_MIN, ReplayClock
from minutely.config import Config, load_config
from minutely.data import decode_batch, record_batch_to_samples
from minutely.events import (
    F32_OVERFLOW,
    FUTURE_EVENT,
    INVALID_EVENT,
    INVALID_IMPRESSION,
    OVERSIZE_EVENT,
    REASONS,
    STALE_EVENT,
    UNDECODABLE_EVENT,
)
from minutely.pipeline.join_stage import JoinStage
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import SqliteLog, read_dead_letters
from minutely.stream.dead_letters import reason_group

pytestmark = pytest.mark.slow

SEED = 20_260_101
N_BAD = 10_000
TICK_MS = 5 * MS_PER_MIN
Message = tuple[bytes | None, bytes, int]
Doc = dict[str, Any]


def fuzz_config() -> Config:
    return load_config(
        None, {**SMALL, "ingest": {"max_event_bytes": 2_048, "max_ids_per_feature": 64}}
    )


class BadEvents:
    """Malformed copies of valid events: ``make`` returns the bytes and the expected group."""

    def __init__(self, rng: np.random.Generator, cfg: Config) -> None:
        self.rng = rng
        self.max_bytes = cfg.ingest.max_event_bytes
        self.max_ids = cfg.ingest.max_ids_per_feature
        self.max_future = cfg.ingest.max_future_s * 1000
        self.max_past = cfg.ingest.max_past_s * 1000
        self.names = [f.name for f in default_schema().features]
        self.dense = [f.name for f in default_schema().features if f.kind == "dense"]
        self.sparse = [f.name for f in default_schema().features if f.kind == "sparse"]
        self.kinds: dict[str, tuple[str, Callable[[Doc, Doc, int], bytes]]] = {
            "id as text": (INVALID_EVENT, lambda a, i, now: enc(a, imp_id=str(a["imp_id"]))),
            "ts as float": (INVALID_EVENT, lambda a, i, now: enc(a, ts_ms=a["ts_ms"] + 0.5)),
            "id as bool": (INVALID_EVENT, lambda a, i, now: enc(a, imp_id=True)),
            "id null": (INVALID_EVENT, lambda a, i, now: enc(a, imp_id=None)),
            "features as list": (
                INVALID_EVENT,
                lambda a, i, now: enc(i, features=list(i["features"].values())),
            ),
            "feature as text": (INVALID_EVENT, lambda a, i, now: self.feature(i, "12")),
            "feature null": (INVALID_EVENT, lambda a, i, now: self.feature(i, None)),
            "id beyond int64": (
                INVALID_EVENT,
                lambda a, i, now: enc(a, imp_id=2**63 + self.int(0, 2**40)),
            ),
            "feature id beyond int64": (
                INVALID_EVENT,
                lambda a, i, now: self.feature(i, -(2**63) - 1 - self.int(0, 2**40), self.sparse),
            ),
            "listed id beyond int64": (
                INVALID_EVENT,
                lambda a, i, now: self.feature(i, [1, 2**64], ["user_interests"]),
            ),
            "negative id": (INVALID_EVENT, lambda a, i, now: enc(a, imp_id=-self.int(1, 2**40))),
            "negative ts": (INVALID_EVENT, lambda a, i, now: enc(a, ts_ms=-self.int(1, 2**40))),
            "float64 overflow": (INVALID_EVENT, lambda a, i, now: self.token(i, b"1e400")),
            "missing field": (INVALID_EVENT, lambda a, i, now: self.drop(a)),
            "unknown field": (
                INVALID_EVENT,
                lambda a, i, now: enc(a, **{f"x{self.int(0, 99)}": self.int(0, 9)}),
            ),
            "unknown type": (
                INVALID_EVENT,
                lambda a, i, now: enc(a, type=self.pick(["view", "Click", "", "impressions"])),
            ),
            "nested garbage": (INVALID_EVENT, lambda a, i, now: self.nested(i)),
            "not an object": (
                INVALID_EVENT,
                lambda a, i, now: self.pick([b"[]", b"17", b'"click"', b"null", b"[{}]"]),
            ),
            "sparse as float": (
                INVALID_IMPRESSION,
                lambda a, i, now: self.feature(i, 2.5, self.sparse),
            ),
            "dense as list": (
                INVALID_IMPRESSION,
                lambda a, i, now: self.feature(i, [1], self.dense),
            ),
            "float32 overflow": (
                INVALID_IMPRESSION,
                lambda a, i, now: self.feature(i, self.huge(), self.dense),
            ),
            "missing feature": (INVALID_IMPRESSION, lambda a, i, now: self.drop_feature(i)),
            "unknown feature": (
                INVALID_IMPRESSION,
                lambda a, i, now: enc(i, features={**i["features"], "xx": 1}),
            ),
            "list too long": (
                INVALID_IMPRESSION,
                lambda a, i, now: self.feature(
                    i, list(range(self.max_ids + self.int(1, 50))), ["user_interests"]
                ),
            ),
            "NaN token": (
                UNDECODABLE_EVENT,
                lambda a, i, now: self.token(i, self.pick([b"NaN", b"Infinity", b"-Infinity"])),
            ),
            "junk bytes": (UNDECODABLE_EVENT, lambda a, i, now: self.junk()),
            "invalid utf-8": (UNDECODABLE_EVENT, lambda a, i, now: self.bad_utf8(i)),
            "truncated": (
                UNDECODABLE_EVENT,
                lambda a, i, now: enc(a)[: self.int(0, len(enc(a)) - 1)],
            ),
            "oversize": (
                OVERSIZE_EVENT,
                lambda a, i, now: enc(i, pad="p" * self.max_bytes),
            ),
            "future": (
                FUTURE_EVENT,
                lambda a, i, now: enc(a, ts_ms=now + self.max_future + self.int(1, 10**9)),
            ),
            "ancient": (
                STALE_EVENT,
                lambda a, i, now: enc(a, ts_ms=now - self.max_past - self.int(1, 10**9)),
            ),
        }

    def int(self, lo: int, hi: int) -> int:
        """A uniform int in ``[lo, hi]``."""
        return lo + int(self.rng.integers(0, hi - lo + 1))

    def pick(self, options: list[Any]) -> Any:
        return options[int(self.rng.integers(0, len(options)))]

    def feature(self, imp: Doc, value: object, names: list[str] | None = None) -> bytes:
        name = self.pick(names or self.names)
        return enc(imp, features={**imp["features"], name: value})

    def huge(self) -> float:
        value = 10 ** float(self.rng.uniform(38.6, 308))
        assert value > F32_OVERFLOW
        return value if self.rng.random() < 0.5 else -value

    def token(self, imp: Doc, token: bytes) -> bytes:
        """``imp`` with a dense value written as ``token`` (a number msgspec cannot write)."""
        marker = 12345.6789
        raw = self.feature(imp, marker, self.dense)
        assert raw.count(b"12345.6789") == 1
        return raw.replace(b"12345.6789", token)

    def drop(self, doc: Doc) -> bytes:
        field = self.pick(list(doc))
        return enc({k: v for k, v in doc.items() if k != field})

    def drop_feature(self, imp: Doc) -> bytes:
        gone = self.pick(self.names)
        return enc(imp, features={k: v for k, v in imp["features"].items() if k != gone})

    def nested(self, imp: Doc) -> bytes:
        depth = self.int(2, 300)
        deep: object = 1
        for _ in range(depth):
            deep = [deep] if self.rng.random() < 0.5 else {"a": deep}
        return self.feature(imp, deep)

    def junk(self) -> bytes:
        # The first byte can start no JSON value (and is no whitespace): never valid JSON.
        first = self.pick([*range(0x01, 0x09), *range(0x80, 0x100)])
        return bytes([first]) + self.rng.bytes(self.int(0, 300))

    def bad_utf8(self, imp: Doc) -> bytes:
        raw = enc(imp)
        if self.rng.random() < 0.5:
            return raw.replace(b'"impression"', b'"impr\xffession"', 1)
        return raw.replace(b'"user_id"', b'"user_\xc3"', 1)  # a cut two-byte sequence

    def make(self, any_doc: Doc, imp_doc: Doc, now: int) -> tuple[str, str, bytes]:
        kind = self.pick(sorted(self.kinds))
        group, build = self.kinds[kind]
        return kind, group, build(any_doc, imp_doc, now)


def enc(doc: Doc, **changes: object) -> bytes:
    return msgspec.json.encode({**doc, **changes})


def stage(cfg: Config, log: SqliteLog, clock: ReplayClock) -> JoinStage:
    return JoinStage.from_config(log, cfg, default_schema(), clock)


def run_ticks(cfg: Config, log: SqliteLog, ticks: list[list[Message]], start: int) -> JoinStage:
    """Append each tick's messages, then run the stage on it, as the pipeline runner does."""
    clock = ReplayClock(start)
    js = stage(cfg, log, clock)
    for k, messages in enumerate(ticks):
        end = start + (k + 1) * TICK_MS
        log.append(cfg.stream.raw_topic, messages)
        clock.advance_to(end)
        js.run()
        js.advance_to(end)
    js.flush_all()
    return js


def joined(cfg: Config, log: SqliteLog) -> Counter[tuple[str, int, int, bool]]:
    out: Counter[tuple[str, int, int, bool]] = Counter()
    schema = default_schema()
    for m in cfg.models:
        for p in range(log.partitions(m.samples_topic)):
            for rec in log.read(m.samples_topic, p, 0, 100_000):
                for s in record_batch_to_samples(decode_batch(rec.value, schema), schema):
                    out[(m.name, s.sample_id, s.label, s.is_correction)] += 1
    return out


def test_bad_events_are_dead_lettered_by_group_and_valid_ones_all_join(tmp_path: Path) -> None:
    cfg = fuzz_config()
    rng = np.random.default_rng(SEED)
    gen = BadEvents(rng, cfg)
    start = cfg.sim.start_ms + 12 * MS_PER_HOUR  # midday: the busiest hour of traffic
    n_ticks = MS_PER_HOUR // TICK_MS
    good = Market(cfg.sim).events_between(start, start + n_ticks * TICK_MS).messages()
    docs = [msgspec.json.decode(v) for _, v, _ in good]
    imp_docs = [d for d in docs if d["type"] == "impression"]
    valid_ticks: list[list[Message]] = [[] for _ in range(n_ticks)]
    for msg in good:
        valid_ticks[(msg[2] - start) // TICK_MS].append(msg)
    mixed_ticks = [list(t) for t in valid_ticks]
    bad: list[bytes] = []
    group_of: dict[bytes, str] = {}
    groups: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for _ in range(N_BAD):
        k = int(rng.integers(0, n_ticks))
        ts = start + k * TICK_MS + int(rng.integers(0, TICK_MS))
        template = {**docs[int(rng.integers(0, len(docs)))], "ts_ms": ts}
        imp = {**imp_docs[int(rng.integers(0, len(imp_docs)))], "ts_ms": ts}
        kind, group, raw = gen.make(template, imp, start + (k + 1) * TICK_MS)
        mixed_ticks[k].append((rng.bytes(8), raw, ts))
        bad.append(raw)
        assert group_of.setdefault(raw, group) == group  # equal bytes, equal group
        groups[group] += 1
        kinds[kind] += 1
    for tick in mixed_ticks:
        tick.sort(key=lambda m: m[2])  # a partition is logged in time order
    assert len(kinds) == len(gen.kinds)  # every kind was drawn

    mixed_log = SqliteLog(tmp_path / "mixed.sqlite")
    js = run_ticks(cfg, mixed_log, mixed_ticks, start)
    valid_log = SqliteLog(tmp_path / "valid.sqlite")
    reference = run_ticks(cfg, valid_log, valid_ticks, start)

    letters = read_dead_letters(mixed_log, cfg.stream.dead_letter_topic)
    assert len(letters) == js.stats.dead_letters == N_BAD
    assert Counter(reason_group(d.reason) for d in letters) == groups
    assert js.stats.dead_letters_by_reason == dict(groups)
    assert set(groups) <= set(REASONS)
    assert Counter(d.payload for d in letters) == Counter(bad)
    assert all(reason_group(d.reason) == group_of[d.payload] for d in letters)  # letter by letter
    assert all(re.fullmatch(r"events/\d+@\d+", d.source) for d in letters)
    assert all(len(d.reason) < 400 for d in letters)  # details are bounded too

    assert reference.stats.dead_letters == 0
    expected = joined(cfg, valid_log)
    # After the flush every impression has its pCTR sample: the comparison covers them all.
    assert sum(n for (m, _, _, corr), n in expected.items() if m == "ctr" and not corr) == len(
        imp_docs
    )
    assert joined(cfg, mixed_log) == expected
    assert js.stats.samples == reference.stats.samples
    assert js.stats.late == reference.stats.late
    mixed_log.close()
    valid_log.close()
