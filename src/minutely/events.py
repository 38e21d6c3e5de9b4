"""Raw events: impressions, clicks and conversions, their wire codec, and the ingest check.

Events travel as one JSON object per log message (the format ad servers log), decoded and
type-checked by msgspec in about a microsecond. :class:`EventValidator` is the one check of raw
input: a message it accepts holds everything the later stages rely on (ids within int64, times
near the clock, every schema feature and no other, dense values finite float32s, bounded id
lists), so nothing after it checks again. A message it refuses raises
:class:`~minutely.errors.EventError`; the join stage sends it to the dead-letter topic and goes on.

An impression carries its features inline, or *by reference*: a ``request_id`` and empty
``features``, the features being a snapshot the producer wrote under that id before it published
the impression (see :mod:`minutely.features`). The ingest check accepts a by-reference
impression as it is; its features are checked when they are fetched
(:class:`minutely.features.resolve.FeatureResolver`), by :meth:`EventValidator.check_features`,
with the same rules as inline ones.

Every dead-letter reason of the ingest and join path reads ``"<group>: <details>"``, with the
group one of :data:`REASONS` (ids and values go in the details), so counts by group stay few.

>>> ev = Click(imp_id=7, ts_ms=1_000)
>>> decode_event(encode_event(ev)) == ev
True
>>> from minutely.schema import default_schema
>>> v = EventValidator(default_schema(), max_future_ms=0, max_past_ms=60_000)
>>> v.parse(b'{"type":"click","imp_id":7,"ts_ms":1000}', now_ms=1_000) == ev
True
>>> v.parse(b'[7, 1000]', now_ms=1_000)
Traceback (most recent call last):
...
minutely.errors.EventError: invalid event: Expected `object`, got `array`
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated

import msgspec

from minutely.config import IngestConfig
from minutely.errors import ConfigError, EventError
from minutely.schema import Schema

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# The midpoint between float32's largest value and 2**128: every float64 of smaller magnitude
# rounds to a finite float32 (the dense columns of the sample log), every larger one (and this
# one, ties to even) to infinity.
F32_OVERFLOW = (2 - 2**-24) * 2**127

# Dead-letter reason groups (the text before the first ":" of every reason).
OVERSIZE_EVENT = "oversize event"  # a message over ingest.max_event_bytes, refused undecoded
UNDECODABLE_EVENT = "undecodable event"  # not JSON (junk bytes, invalid UTF-8, truncated)
INVALID_EVENT = "invalid event"  # JSON that is not an event (types, fields, ids, event type)
INVALID_IMPRESSION = "invalid impression"  # features that do not fit the schema or bounds
FUTURE_EVENT = "future event"  # stamped more than ingest.max_future_s ahead of the clock
STALE_EVENT = "stale event"  # stamped more than ingest.max_past_s behind the clock
INVALID_SNAPSHOT = "invalid snapshot"  # a by-reference impression's snapshot that does not fit
MISSING_SNAPSHOT = "missing snapshot"  # a by-reference impression whose snapshot never appeared
UNJOINABLE_EVENT = "unjoinable event"  # a valid event the joiner failed on
UNENCODABLE_SAMPLE = "unencodable sample"  # a joined sample the sample codec refused
UNDECODABLE_SAMPLES = "undecodable samples"  # a samples message the trainer could not decode
REASONS: tuple[str, ...] = (
    OVERSIZE_EVENT,
    UNDECODABLE_EVENT,
    INVALID_EVENT,
    INVALID_IMPRESSION,
    FUTURE_EVENT,
    STALE_EVENT,
    INVALID_SNAPSHOT,
    MISSING_SNAPSHOT,
    UNJOINABLE_EVENT,
    UNENCODABLE_SAMPLE,
    UNDECODABLE_SAMPLES,
)

# Ids and times are int64 on the wire to the trainer (Arrow, torch): a larger integer is bad
# input, refused at decode time rather than failing a later stage.
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
NonNegInt64 = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
FeatureValue = Int64 | float | list[Int64]


# gc=False: the cycle collector never tracks an impression (it holds numbers and a feature dict,
# so it cannot be part of a cycle); the join holds an hour of them, which collections would walk.
# omit_defaults: an impression without a request id is written exactly as before the field
# existed.
class Impression(
    msgspec.Struct,
    tag="impression",
    frozen=True,
    forbid_unknown_fields=True,
    gc=False,
    omit_defaults=True,
):
    """An ad shown to a user; ``features`` are logged by the ad server at request time.

    ``request_id`` names the ad request the impression answered. An impression *by reference*
    has a ``request_id`` and empty ``features``: its features are the snapshot stored under that
    request id (:attr:`by_reference`).

    >>> imp = Impression(imp_id=7, ts_ms=1_000, features={}, request_id=7)
    >>> encode_event(imp)
    b'{"type":"impression","imp_id":7,"ts_ms":1000,"features":{},"request_id":7}'
    >>> imp.by_reference
    True
    """

    imp_id: NonNegInt64
    ts_ms: NonNegInt64
    features: dict[str, FeatureValue]
    request_id: NonNegInt64 | None = None

    @property
    def by_reference(self) -> bool:
        """Whether the features are a snapshot to fetch: a request id and no inline features."""
        return self.request_id is not None and not self.features


class Click(msgspec.Struct, tag="click", frozen=True, forbid_unknown_fields=True):
    imp_id: NonNegInt64
    ts_ms: NonNegInt64


class Conversion(msgspec.Struct, tag="conversion", frozen=True, forbid_unknown_fields=True):
    imp_id: NonNegInt64
    ts_ms: NonNegInt64


Event = Impression | Click | Conversion

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _ENCODER.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode one raw event; raises :class:`EventError` naming what is wrong."""
    try:
        event: Event = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise EventError(f"{INVALID_EVENT}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise EventError(f"{UNDECODABLE_EVENT}: {exc}") from exc
    except UnicodeDecodeError as exc:  # invalid UTF-8 inside a JSON string
        raise EventError(f"{UNDECODABLE_EVENT}: {exc}") from exc
    return event


_INGEST = IngestConfig()


class EventValidator:
    """The ingest check of raw events: message size, decoding, the clock, the feature schema.

    Built once per schema and bounds: the feature names per kind are precomputed, an accepted
    event costs only lookups and comparisons, and the message saying what is wrong is built only
    for a refused one. Every refusal is an :class:`EventError` whose message starts with one of
    the groups in :data:`REASONS`.
    """

    __slots__ = (
        "_dense",
        "_features",
        "_known",
        "_max_bytes",
        "_max_future",
        "_max_ids",
        "_max_past",
        "_multi",
        "_n",
        "_names",
        "_sparse",
    )

    def __init__(
        self,
        schema: Schema,
        *,
        max_future_ms: int,
        max_past_ms: int,
        max_ids_per_feature: int = _INGEST.max_ids_per_feature,
        max_event_bytes: int = _INGEST.max_event_bytes,
    ) -> None:
        for name, value, lo in (
            ("max_future_ms", max_future_ms, 0),
            ("max_past_ms", max_past_ms, 0),
            ("max_ids_per_feature", max_ids_per_feature, 1),
            ("max_event_bytes", max_event_bytes, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(name, f"int >= {lo}", value)
        self._max_future = max_future_ms
        self._max_past = max_past_ms
        self._max_ids = max_ids_per_feature
        self._max_bytes = max_event_bytes
        self._names = tuple(f.name for f in schema.features)
        self._known = frozenset(self._names)
        self._n = len(self._names)
        self._sparse = tuple(f.name for f in schema.features if f.kind == "sparse")
        self._multi = tuple(f.name for f in schema.features if f.kind == "multi_sparse")
        self._dense = tuple(f.name for f in schema.features if f.kind == "dense")
        self._features = _features_struct(schema, max_ids_per_feature)

    @classmethod
    def from_config(cls, schema: Schema, ingest: IngestConfig) -> EventValidator:
        """The validator of ``ingest``'s bounds (seconds become milliseconds)."""
        return cls(
            schema,
            max_future_ms=ingest.max_future_s * 1000,
            max_past_ms=ingest.max_past_s * 1000,
            max_ids_per_feature=ingest.max_ids_per_feature,
            max_event_bytes=ingest.max_event_bytes,
        )

    def parse(self, data: bytes, now_ms: int) -> Event:
        """Decode and :meth:`check` one log message; raises :class:`EventError`.

        The size is checked first, so an oversize message is never decoded. A decoded impression
        whose features pass :meth:`_fits_decoded`, or one by reference, needs only the clock
        checked; any other event goes through :meth:`check`.
        """
        if len(data) > self._max_bytes:
            raise EventError(
                f"{OVERSIZE_EVENT}: expected at most {self._max_bytes} bytes, got {len(data)}"
            )
        try:
            event: Event = _DECODER.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            event = decode_event(data)  # raises the EventError that says what is wrong
        if type(event) is Impression and (
            self._fits_decoded(event.features) if event.features else event.request_id is not None
        ):
            ts = event.ts_ms
            if ts - now_ms > self._max_future or now_ms - ts > self._max_past:
                self._check_clock(event, now_ms)  # raises the error that says which bound
        else:
            self.check(event, now_ms)
        return event

    def check(self, event: Event, now_ms: int) -> None:
        """Check a decoded event against the clock and the schema; raises :class:`EventError`.

        An impression by reference (a request id, no features) passes without a features check:
        :meth:`check_features` checks its features once they are fetched.
        """
        iid = event.imp_id
        ts = event.ts_ms
        # Decoding already bounds both; an event built in Python is held to the same rule.
        if not 0 <= iid <= INT64_MAX or ts < 0:
            raise EventError(
                f"{INVALID_EVENT}: imp_id expected in [0, 2**63) and ts_ms >= 0, "
                f"got imp_id {iid} and ts_ms {ts}"
            )
        if isinstance(event, Impression) and event.request_id is not None:
            rid = event.request_id
            if not 0 <= rid <= INT64_MAX:
                raise EventError(
                    f"{INVALID_EVENT}: request_id expected in [0, 2**63), got {rid} (imp_id {iid})"
                )
        self._check_clock(event, now_ms)
        if isinstance(event, Impression) and not event.by_reference:
            self.check_features(event.features, iid)

    def check_features(self, features: Mapping[str, FeatureValue], imp_id: int) -> None:
        """Check one impression's features against the schema and the bounds, by the rules
        :meth:`check` applies to inline features; raises :class:`EventError` (group
        ``invalid impression``, naming the feature and ``imp_id``)."""
        if isinstance(features, dict) and self._fits_decoded(features):
            return  # the same rules, checked in C; only a refusal needs the slow path's words
        bad = self._first_bad(features)
        if bad is not None:
            raise EventError(self._describe(features, imp_id, bad))

    def _check_clock(self, event: Event, now_ms: int) -> None:
        """Refuse an event stamped too far ahead of or behind ``now_ms``."""
        iid = event.imp_id
        ts = event.ts_ms
        if ts - now_ms > self._max_future:
            raise EventError(
                f"{FUTURE_EVENT}: ts_ms {ts} is {ts - now_ms} ms in the future "
                f"(at most {self._max_future} ms allowed) (imp_id {iid})"
            )
        if now_ms - ts > self._max_past:
            raise EventError(
                f"{STALE_EVENT}: ts_ms {ts} is {now_ms - ts} ms in the past "
                f"(at most {self._max_past} ms allowed) (imp_id {iid})"
            )

    def _fits_decoded(self, feats: dict[str, FeatureValue]) -> bool:
        """:meth:`_first_bad`'s rules checked by msgspec, in C: true only if ``feats`` fit.

        For a dict just decoded from JSON (string keys, lists as lists) the verdict is the same
        as :meth:`_first_bad`'s at half the cost; false leaves it to :meth:`_first_bad`, which
        also says what is wrong.
        """
        try:
            msgspec.convert(feats, self._features)
        except msgspec.ValidationError:
            return False
        return True

    def _first_bad(self, feats: Mapping[str, FeatureValue]) -> str | None:
        """``None`` when ``feats`` fits; else the first feature at fault, or ``""`` when the
        names differ from the schema's (a feature missing or unknown)."""
        if len(feats) != self._n:
            return ""
        lo = INT64_MIN
        hi = INT64_MAX
        try:
            for name in self._sparse:
                v = feats[name]
                if type(v) is not int or not lo <= v <= hi:
                    return name
            max_ids = self._max_ids
            for name in self._multi:
                v = feats[name]
                if type(v) is not list or len(v) > max_ids:
                    return name
                for x in v:
                    if type(x) is not int or not lo <= x <= hi:
                        return name
            for name in self._dense:
                v = feats[name]
                if type(v) is float:
                    if not -F32_OVERFLOW < v < F32_OVERFLOW:  # false for nan too
                        return name
                elif type(v) is not int or not lo <= v <= hi:
                    return name
        except KeyError:
            return ""
        return None

    def _describe(self, feats: Mapping[str, FeatureValue], imp_id: int, bad: str) -> str:
        """The reason features are refused, ``bad`` being what :meth:`_first_bad` found."""
        where = f"(imp_id {imp_id})"
        if not bad:
            missing = [n for n in self._names if n not in feats]
            unknown = [k for k in feats if k not in self._known]
            parts = [f"missing features {_listing(missing)}"] if missing else []
            if unknown:
                parts.append(f"unknown features {_listing(unknown)}")
            return f"{INVALID_IMPRESSION}: {'; '.join(parts)} {where}"
        v = feats[bad]
        if bad in self._sparse:
            problem = f"expected an int64 id, got {_short(v)}"
        elif bad in self._dense:
            problem = f"expected a finite float32, got {_short(v)}"
        elif not isinstance(v, list):
            problem = f"expected a list of int64 ids, got {_short(v)}"
        elif len(v) > self._max_ids:
            problem = f"expected at most {self._max_ids} ids, got {len(v)}"
        else:
            pos = next((i for i, x in enumerate(v) if not _is_int64(x)), 0)
            problem = f"expected a list of int64 ids, got {_short(v[pos])} at position {pos}"
        return f"{INVALID_IMPRESSION}: feature {bad!r} {problem} {where}"


def _features_struct(schema: Schema, max_ids: int) -> type[msgspec.Struct]:
    """A struct type whose conversion from a feature dict checks what :meth:`EventValidator.
    _first_bad` checks: exactly the schema's names; an int64 per sparse feature; a list of at
    most ``max_ids`` int64 ids per multi-valued one; an int64 or a float inside float32's range
    (NaN refused) per dense one. Fields are named by position (feature names may be anything
    the schema accepts) and read from the feature names."""
    kinds = {
        "sparse": Int64,
        "multi_sparse": Annotated[list[Int64], msgspec.Meta(max_length=max_ids)],
        "dense": Int64 | Annotated[float, msgspec.Meta(gt=-F32_OVERFLOW, lt=F32_OVERFLOW)],
    }
    fields = [
        (f"f{i}", kinds[f.kind], msgspec.field(name=f.name)) for i, f in enumerate(schema.features)
    ]
    return msgspec.defstruct("Features", fields, forbid_unknown_fields=True, gc=False)


def _is_int64(value: object) -> bool:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _short(value: object) -> str:
    """``repr(value)``, cut to a bounded length: reasons stay small whatever the input."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _listing(names: Iterable[str]) -> str:
    """At most five names (each cut short), then how many more."""
    names = list(names)
    shown = ", ".join(_short(n) for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"[{shown}]{more}"


def validate_event(
    event: Event, schema: Schema, now_ms: int, max_future_ms: int, max_past_ms: int
) -> None:
    """:meth:`EventValidator.check` one event, with the default id-list bound (tests, tools).

    A stage builds one :class:`EventValidator` and keeps it.
    """
    EventValidator(schema, max_future_ms=max_future_ms, max_past_ms=max_past_ms).check(
        event, now_ms
    )
