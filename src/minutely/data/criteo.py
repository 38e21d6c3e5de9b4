"""The Criteo conversion-log format: read as raw events, written from the simulator's traffic.

The public Criteo conversion log (``data.txt``; Chapelle, "Modeling delayed feedback in display
advertising", KDD 2014) holds one click per line, tab-separated, 19 columns:

====  =====================================================================================
col   content
====  =====================================================================================
1     click timestamp: seconds since the log's start (an integer >= 0)
2     conversion timestamp in the same unit, at or after the click; empty: no conversion
3-10  8 integer features (``i1`` .. ``i8``); empty: missing
11-19 9 hashed categorical features (``c1`` .. ``c9``), hex strings of 1 to 16 digits;
      empty: missing
====  =====================================================================================

Reading (:func:`read_records`, then :func:`criteo_events`; :func:`read_criteo_events` does
both) turns a file into the raw-event stream of :mod:`minutely.events`: each line is an
:class:`~minutely.events.Impression` and its :class:`~minutely.events.Click` at the click time
and, when it converted, a :class:`~minutely.events.Conversion` at the conversion time. The
impression id is the line number (the first line is 1), so ids are stable across reads. Times
become epoch milliseconds, ``base_ms + seconds * 1000``. Events come out in time order, ties
broken as the simulator's stream breaks them: by ``(ts_ms, kind, imp_id)`` with impression <
click < conversion. Clicks must come in non-decreasing time down the file (sort a log on its
first column if it is not); conversions are held in a heap until the stream reaches their time.

Features (:func:`criteo_schema`): the integers are the dense features ``i1`` .. ``i8`` and the
categoricals the sparse ids ``c1`` .. ``c9`` (the hex string read as a number). A missing integer
reads as 0 and a missing categorical as :data:`MISSING_ID` (-1, which no hex string reads as).
The schema has no per-feature transforms: every dense feature goes through the fixed
``sign(x) * log1p(|x|)`` of :mod:`minutely.data.tensors` on its way to a model, which is the
usual log transform of Criteo's count features.

Malformed lines are dead letters, not errors: :func:`read_records` skips a line with the wrong
column count, a timestamp or integer that is not an integer, a categorical that is not a hex
string, a conversion before its click, or a click earlier than the line before it, and counts it
in a :class:`CriteoReport` (lines read, accepted, skipped by field, the first messages, each
naming the line and the field). With ``strict=True`` the first such line raises
:class:`CriteoLineError` instead.

Writing (:func:`write_criteo`) takes :class:`CriteoRecord` rows; :func:`traffic_records` maps the
simulator's clicked impressions to rows (see :data:`SIM_INTS` and :data:`SIM_CATEGORICALS` for
the feature mapping), so a simulated market can be written as a Criteo log and read back.

>>> rec = CriteoRecord(5, 65, (1, None, 3, 0, 0, 0, 0, 0), (0x1F, None, 2, 3, 4, 5, 6, 7, 8))
>>> line = format_line(rec)
>>> line.split("\\t")[:4], line.split("\\t")[10:12]
(['5', '65', '1', ''], ['0000001F', ''])
>>> parse_line(line.encode(), 1) == rec
True
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from minutely.data.hashing import feature_salt, hash_ids
from minutely.errors import EventError
from minutely.events import INT64_MAX, Click, Conversion, Event, FeatureValue, Impression
from minutely.schema import FeatureSpec, Schema

if TYPE_CHECKING:
    from minutely.sim.traffic import DayTraffic

N_INTS = 8
N_CATEGORICALS = 9
N_COLUMNS = 2 + N_INTS + N_CATEGORICALS
INT_NAMES: tuple[str, ...] = tuple(f"i{k}" for k in range(1, N_INTS + 1))
CATEGORICAL_NAMES: tuple[str, ...] = tuple(f"c{k}" for k in range(1, N_CATEGORICALS + 1))
MISSING_ID = -1  # the sparse id of a missing categorical
MISSING_INT = 0  # the dense value of a missing integer

# What a field may hold: at most 18 digits keeps every integer within int64.
_INT_RE = re.compile(rb"-?[0-9]{1,18}")
_HEX_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TS_RE = re.compile(rb"[0-9]{1,15}")  # seconds; 15 digits keep base_ms + s * 1000 within int64

COLUMN_COUNT = "column count"
CLICK_TIME = "click timestamp"
CONVERSION_TIME = "conversion timestamp"


def criteo_schema() -> Schema:
    """The feature schema of a Criteo conversion log: ``i1`` .. ``i8`` dense, ``c1`` .. ``c9``
    sparse, in column order.

    >>> [f.name for f in criteo_schema().dense][:3], len(criteo_schema().sparse)
    (['i1', 'i2', 'i3'], 9)
    """
    return Schema(
        features=tuple(FeatureSpec(n, "dense") for n in INT_NAMES)
        + tuple(FeatureSpec(n, "sparse") for n in CATEGORICAL_NAMES)
    )


class CriteoLineError(EventError):
    """A line of a Criteo log that does not parse; names the line number and the field."""

    def __init__(self, line_no: int, field: str, problem: str) -> None:
        self.line_no = line_no
        self.field = field
        self.problem = problem
        super().__init__(f"criteo line {line_no}: {field}: {problem}")


@dataclass(frozen=True, slots=True)
class CriteoRecord:
    """One line: times in seconds since the log's start, ``None`` for what is empty.

    Raises ``ValueError`` naming the field for a record the format cannot hold (a negative
    time, a conversion before the click, the wrong number of features, a negative or too large
    categorical).
    """

    click_s: int
    conversion_s: int | None
    ints: tuple[int | None, ...]
    cats: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.click_s < 10**15:
            raise ValueError(f"CriteoRecord.click_s: expected in [0, 10**15), got {self.click_s}")
        if self.conversion_s is not None and not (self.click_s <= self.conversion_s < 10**15):
            raise ValueError(
                f"CriteoRecord.conversion_s: expected None or in [click_s {self.click_s}, "
                f"10**15), got {self.conversion_s}"
            )
        if len(self.ints) != N_INTS or len(self.cats) != N_CATEGORICALS:
            raise ValueError(
                f"CriteoRecord: expected {N_INTS} ints and {N_CATEGORICALS} categoricals, got "
                f"{len(self.ints)} and {len(self.cats)}"
            )
        for name, v in zip(INT_NAMES, self.ints, strict=True):
            if v is not None and not -(10**18) < v < 10**18:
                raise ValueError(f"CriteoRecord.{name}: expected |value| < 10**18, got {v}")
        for name, c in zip(CATEGORICAL_NAMES, self.cats, strict=True):
            if c is not None and not 0 <= c <= INT64_MAX:
                raise ValueError(f"CriteoRecord.{name}: expected an id in [0, 2**63), got {c}")

    def features(self) -> dict[str, FeatureValue]:
        """The impression's features under :func:`criteo_schema`."""
        out: dict[str, FeatureValue] = {}
        for name, v in zip(INT_NAMES, self.ints, strict=True):
            out[name] = MISSING_INT if v is None else v
        for name, c in zip(CATEGORICAL_NAMES, self.cats, strict=True):
            out[name] = MISSING_ID if c is None else c
        return out


# --- parsing ------------------------------------------------------------------------------------


def _show(raw: bytes) -> str:
    """A field as the message shows it: decoded, cut to a bounded length."""
    text = repr(raw.decode("utf-8", errors="replace"))
    return text if len(text) <= 40 else text[:37] + "..."


def parse_line(line: bytes, line_no: int) -> CriteoRecord:
    """One line (without or with its line ending) as a record; raises :class:`CriteoLineError`.

    >>> parse_line(b"7\\t3" + b"\\t" * 17, 4)
    Traceback (most recent call last):
    ...
    minutely.data.criteo.CriteoLineError: criteo line 4: conversion timestamp: expected empty \
or a time at or after the click (7), got 3
    """
    cols = line.rstrip(b"\r\n").split(b"\t")
    if len(cols) != N_COLUMNS:
        raise CriteoLineError(
            line_no, COLUMN_COUNT, f"expected {N_COLUMNS} tab-separated columns, got {len(cols)}"
        )
    raw = cols[0]
    if not _TS_RE.fullmatch(raw):
        raise CriteoLineError(
            line_no, CLICK_TIME, f"expected an integer of seconds >= 0, got {_show(raw)}"
        )
    click = int(raw)
    raw = cols[1]
    conv: int | None = None
    if raw:
        if not _TS_RE.fullmatch(raw):
            raise CriteoLineError(
                line_no,
                CONVERSION_TIME,
                f"expected empty or an integer of seconds >= 0, got {_show(raw)}",
            )
        conv = int(raw)
        if conv < click:
            raise CriteoLineError(
                line_no,
                CONVERSION_TIME,
                f"expected empty or a time at or after the click ({click}), got {conv}",
            )
    ints: list[int | None] = []
    for k in range(N_INTS):
        raw = cols[2 + k]
        if not raw:
            ints.append(None)
        elif _INT_RE.fullmatch(raw):
            ints.append(int(raw))
        else:
            raise CriteoLineError(
                line_no,
                f"integer feature {INT_NAMES[k]} (column {3 + k})",
                f"expected empty or an integer of at most 18 digits, got {_show(raw)}",
            )
    cats: list[int | None] = []
    for k in range(N_CATEGORICALS):
        raw = cols[2 + N_INTS + k]
        value = int(raw, 16) if raw and _HEX_RE.fullmatch(raw) else -1
        if not raw:
            cats.append(None)
        elif 0 <= value <= INT64_MAX:
            cats.append(value)
        else:
            raise CriteoLineError(
                line_no,
                f"categorical feature {CATEGORICAL_NAMES[k]} (column {3 + N_INTS + k})",
                "expected empty or a hex string of at most 16 digits below 8000000000000000, "
                f"got {_show(raw)}",
            )
    return CriteoRecord(click, conv, tuple(ints), tuple(cats))


@dataclass
class CriteoReport:
    """What a read of a Criteo log met: counts, and the first dead letters' messages."""

    max_examples: int = 10
    lines: int = 0
    accepted: int = 0
    rejected: int = 0
    by_field: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def reject(self, err: CriteoLineError) -> None:
        """Count ``err``'s line as skipped (its field, and its message among the first)."""
        self.rejected += 1
        key = err.field.split(" (")[0]  # "integer feature i3 (column 5)" counts as its feature
        self.by_field[key] = self.by_field.get(key, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def summary(self) -> str:
        """One line: lines read, accepted, skipped by field.

        >>> r = CriteoReport()
        >>> r.lines, r.accepted = 3, 2
        >>> r.reject(CriteoLineError(2, "column count", "expected 19 tab-separated columns, got 1"))
        >>> r.summary()
        'criteo log: 3 lines, 2 accepted, 1 skipped (column count: 1)'
        """
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_field.items()))
        tail = f" ({skipped})" if skipped else ""
        return (
            f"criteo log: {self.lines} lines, {self.accepted} accepted, "
            f"{self.rejected} skipped{tail}"
        )


def read_records(
    path: str | Path, *, report: CriteoReport | None = None, strict: bool = False
) -> Iterator[tuple[int, CriteoRecord]]:
    """``(line number, record)`` of every well-formed line of the log at ``path``, in file order.

    A malformed line, or one whose click is earlier than the last accepted line's (the stream
    must be in time order), is skipped and counted in ``report``; with ``strict`` it raises
    :class:`CriteoLineError`. The file is read lazily, line by line.
    """
    rep = report if report is not None else CriteoReport()
    last_click = -1
    with Path(path).open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            rep.lines += 1
            try:
                rec = parse_line(line, line_no)
                if rec.click_s < last_click:
                    raise CriteoLineError(
                        line_no,
                        CLICK_TIME,
                        f"expected a time at or after the previous click ({last_click}), "
                        f"got {rec.click_s}",
                    )
            except CriteoLineError as err:
                if strict:
                    raise
                rep.reject(err)
                continue
            last_click = rec.click_s
            rep.accepted += 1
            yield line_no, rec


def criteo_events(records: Iterable[tuple[int, CriteoRecord]], base_ms: int) -> Iterator[Event]:
    """The raw events of ``(line number, record)`` pairs (as :func:`read_records` yields them).

    Impression and click at ``base_ms + click_s * 1000``, conversion at ``base_ms +
    conversion_s * 1000``, all with ``imp_id`` = the line number, ordered by ``(ts_ms, kind,
    imp_id)``. Raises ``ValueError`` for a negative ``base_ms``, and :class:`CriteoLineError`
    for a record whose click is earlier than the one before it or whose line number does not
    increase (ids must be unique).
    """
    if isinstance(base_ms, bool) or not isinstance(base_ms, int) or not 0 <= base_ms < 2**62:
        raise ValueError(f"criteo_events: expected base_ms an int in [0, 2**62), got {base_ms!r}")
    pending: list[tuple[int, int]] = []  # (conversion ts_ms, imp_id)
    group: list[tuple[int, CriteoRecord]] = []  # the lines of one click second
    group_s = -1
    last_line = 0

    def flush() -> Iterator[Event]:
        ts = base_ms + group_s * 1000
        while pending and pending[0][0] < ts:
            conv_ts, iid = heapq.heappop(pending)
            yield Conversion(iid, conv_ts)
        for line_no, rec in group:
            yield Impression(line_no, ts, rec.features())
        for line_no, rec in group:
            yield Click(line_no, ts)
            if rec.conversion_s is not None:
                heapq.heappush(pending, (base_ms + rec.conversion_s * 1000, line_no))

    for line_no, rec in records:
        if line_no <= last_line:
            raise CriteoLineError(
                line_no, "line number", f"expected a number above {last_line}, got {line_no}"
            )
        last_line = line_no
        if rec.click_s != group_s:
            if rec.click_s < group_s:
                raise CriteoLineError(
                    line_no,
                    CLICK_TIME,
                    f"expected a time at or after the previous click ({group_s}), "
                    f"got {rec.click_s}",
                )
            if group:
                yield from flush()
            group = []
            group_s = rec.click_s
        group.append((line_no, rec))
    if group:
        yield from flush()
    while pending:
        conv_ts, iid = heapq.heappop(pending)
        yield Conversion(iid, conv_ts)


def read_criteo_events(
    path: str | Path,
    base_ms: int,
    *,
    report: CriteoReport | None = None,
    strict: bool = False,
) -> Iterator[Event]:
    """:func:`criteo_events` of :func:`read_records`: the log at ``path`` as raw events."""
    return criteo_events(read_records(path, report=report, strict=strict), base_ms)


# --- writing ------------------------------------------------------------------------------------


def format_line(rec: CriteoRecord) -> str:
    """The record as one line (no line ending); categoricals as upper-case hex of at least 8
    digits, as the public log writes them."""
    parts = [str(rec.click_s), "" if rec.conversion_s is None else str(rec.conversion_s)]
    parts += ["" if v is None else str(v) for v in rec.ints]
    parts += ["" if c is None else f"{c:08X}" for c in rec.cats]
    return "\t".join(parts)


def write_criteo(path: str | Path, records: Iterable[CriteoRecord]) -> int:
    """Write ``records`` to ``path`` as a Criteo log, one line each; returns the line count.

    Raises ``ValueError`` naming the record when a click is earlier than the one before it:
    :func:`read_records` reads a log in time order only.
    """
    last = -1
    n = 0
    with Path(path).open("w", encoding="ascii", newline="\n") as f:
        for rec in records:
            if rec.click_s < last:
                raise ValueError(
                    f"write_criteo: record {n}: expected click_s >= the previous record's "
                    f"{last}, got {rec.click_s}"
                )
            last = rec.click_s
            f.write(format_line(rec))
            f.write("\n")
            n += 1
    return n


# --- the simulator's traffic --------------------------------------------------------------------

SIM_INTS: tuple[str, ...] = (
    "i1: ad_age_hours * 60, rounded (the ad's age in minutes)",
    "i2: user_activity * 10**4, rounded",
    "i3: ad_ctr_1h * 10**5, rounded",
    "i4: the number of user_interests",
    "i5: hour_of_day",
    "i6: slot",
    "i7: device",
    "i8: missing (the simulator has no further count)",
)
"""How :func:`traffic_records` fills the integer columns from the simulator's features."""

SIM_CATEGORICALS: tuple[str, ...] = (
    "user_id",
    "ad_id",
    "campaign_id",
    "advertiser_id",
    "category",
    "slot",
    "device",
    "hour_of_day",
    "user_interests",
)
"""The simulator's features behind ``c1`` .. ``c9``. Each id becomes a 32-bit hash (salted per
feature, :func:`sim_categorical_hash`); ``user_interests`` contributes its first id and is
missing for a user without interests."""


def sim_categorical_hash(name: str, ids: NDArray[np.int64]) -> NDArray[np.int64]:
    """The 32-bit hashes ``c1`` .. ``c9`` carry for the simulator's ids of feature ``name``.

    >>> a = sim_categorical_hash("ad_id", np.array([3, 3, 4]))
    >>> bool(a[0] == a[1] != a[2]), bool((a < 2**32).all())
    (True, True)
    """
    return hash_ids(ids, feature_salt(f"criteo.{name}"), 1 << 32)


def traffic_records(
    days: Iterable[DayTraffic], start_ms: int
) -> tuple[list[CriteoRecord], NDArray[np.int64]]:
    """The clicked impressions of ``days`` as Criteo records, and the simulator's impression id
    behind each (same order).

    Only the clicked rows of a day are kept once it is read, so ``days`` may be a generator
    that simulates one day at a time.

    Records are ordered by click time, then impression id; times are whole seconds since
    ``start_ms`` (floored), the conversion time being the impression's eventual conversion
    (days after ``days`` included), empty when it never converts. Features follow
    :data:`SIM_INTS` and :data:`SIM_CATEGORICALS`. Raises ``ValueError`` for a click before
    ``start_ms``.
    """
    ids: list[NDArray[np.int64]] = []
    click_ms: list[NDArray[np.int64]] = []
    conv_ms: list[NDArray[np.int64]] = []
    ints: list[NDArray[np.int64]] = []
    cats: list[NDArray[np.int64]] = []
    for t in days:
        rows = np.searchsorted(t.imp_id, t.click_imp_id)
        order = np.argsort(t.conv_imp_id, kind="stable")
        conv_ids = t.conv_imp_id[order]
        at = np.minimum(np.searchsorted(conv_ids, t.click_imp_id), max(len(conv_ids) - 1, 0))
        found = (
            conv_ids[at] == t.click_imp_id if len(conv_ids) else np.zeros(len(rows), dtype=np.bool_)
        )
        conv = np.full(len(rows), -1, np.int64)
        conv[found] = t.conv_ts_ms[order][at[found]]
        ids.append(np.asarray(t.click_imp_id, np.int64))
        click_ms.append(np.asarray(t.click_ts_ms, np.int64))
        conv_ms.append(conv)
        i, c = _sim_columns(t, rows)
        ints.append(i)
        cats.append(c)
    if not ids:
        return [], np.zeros(0, np.int64)
    imp_id, click, conv, int_cols, cat_cols = (
        np.concatenate(x) for x in (ids, click_ms, conv_ms, ints, cats)
    )
    if len(click) and int(click.min()) < start_ms:
        raise ValueError(
            f"traffic_records: expected clicks at or after start_ms {start_ms}, "
            f"got {int(click.min())}"
        )
    order = np.lexsort((imp_id, click))
    click_s = ((click[order] - start_ms) // 1000).tolist()
    conv_sorted = conv[order]
    conv_s = np.where(conv_sorted >= 0, (conv_sorted - start_ms) // 1000, -1).tolist()
    int_rows = int_cols[order].tolist()
    cat_rows = cat_cols[order].tolist()
    records = [
        CriteoRecord(
            cs,
            None if vs < 0 else vs,
            (*ir[:-1], None),
            tuple(None if c < 0 else c for c in cr),
        )
        for cs, vs, ir, cr in zip(click_s, conv_s, int_rows, cat_rows, strict=True)
    ]
    return records, imp_id[order]


def _sim_columns(
    t: DayTraffic, rows: NDArray[np.intp]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Integer columns ``[n, 8]`` (the last is a placeholder for the missing ``i8``) and
    categorical columns ``[n, 9]`` (-1: missing) of the impressions at ``rows``."""
    feats = t.features
    values, offsets = feats["user_interests"]
    offsets = np.asarray(offsets, np.int64)
    lengths = (offsets[1:] - offsets[:-1])[rows]
    first = np.full(len(rows), -1, np.int64)
    has = lengths > 0
    if len(values):
        first[has] = np.asarray(values, np.int64)[offsets[:-1][rows][has]]

    def dense(name: str, scale: float) -> NDArray[np.int64]:
        col = np.asarray(feats[name], np.float64)[rows]
        return np.rint(col * scale).astype(np.int64)

    ints = np.stack(
        [
            dense("ad_age_hours", 60.0),
            dense("user_activity", 1e4),
            dense("ad_ctr_1h", 1e5),
            lengths,
            np.asarray(feats["hour_of_day"], np.int64)[rows],
            np.asarray(feats["slot"], np.int64)[rows],
            np.asarray(feats["device"], np.int64)[rows],
            np.zeros(len(rows), np.int64),
        ],
        axis=1,
    )
    cat_cols = []
    for name in SIM_CATEGORICALS:
        if name == "user_interests":
            hashed = sim_categorical_hash(name, first)
            cat_cols.append(np.where(has, hashed, -1))
        else:
            cat_cols.append(sim_categorical_hash(name, np.asarray(feats[name], np.int64)[rows]))
    return ints, np.stack(cat_cols, axis=1)
