"""Raw events: impressions, clicks and conversions, and their wire codec.

Events travel as one JSON object per log message (the format ad servers log), decoded and
type-checked by msgspec in about a microsecond. A message that does not decode, or an event that
does not fit the schema or the clock, raises :class:`~minutely.errors.EventError` with the reason;
the ingest stage sends it to the dead-letter topic and goes on.

>>> ev = Click(imp_id=7, ts_ms=1_000)
>>> decode_event(encode_event(ev)) == ev
True
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from minutely.errors import EventError
from minutely.schema import Schema

# Ids and times are int64 on the wire to the trainer (Arrow, torch): a larger integer is bad
# input, refused at decode time rather than failing a later stage.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
NonNegInt64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
FeatureValue = Int64 | float | list[Int64]


class Impression(msgspec.Struct, tag="impression", frozen=True, forbid_unknown_fields=True):
    """An ad shown to a user; ``features`` are logged by the ad server at request time."""

    imp_id: NonNegInt64
    ts_ms: NonNegInt64
    features: dict[str, FeatureValue]


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
        raise EventError(f"invalid event: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise EventError(f"undecodable event: {exc}") from exc
    return event


def validate_event(
    event: Event, schema: Schema, now_ms: int, max_future_ms: int, max_past_ms: int
) -> None:
    """Check an event against the schema and the clock; raises :class:`EventError`."""
    if event.imp_id < 0:
        raise EventError(f"invalid event: imp_id must be >= 0, got {event.imp_id}")
    if event.ts_ms > now_ms + max_future_ms:
        raise EventError(
            f"invalid event: ts_ms {event.ts_ms} is {event.ts_ms - now_ms} ms in the future "
            f"(at most {max_future_ms} ms allowed)"
        )
    if event.ts_ms < now_ms - max_past_ms:
        raise EventError(
            f"invalid event: ts_ms {event.ts_ms} is {now_ms - event.ts_ms} ms in the past "
            f"(at most {max_past_ms} ms allowed)"
        )
    if isinstance(event, Impression):
        _validate_features(event, schema)


def _validate_features(event: Impression, schema: Schema) -> None:
    feats = event.features
    for spec in schema.features:
        if spec.name not in feats:
            raise EventError(f"invalid impression {event.imp_id}: missing feature {spec.name!r}")
        v = feats[spec.name]
        if spec.kind == "sparse":
            ok = isinstance(v, int) and not isinstance(v, bool)
            want = "an int id"
        elif spec.kind == "multi_sparse":
            ok = isinstance(v, list)
            want = "a list of int ids"
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            want = "a finite number"
        if not ok:
            raise EventError(
                f"invalid impression {event.imp_id}: feature {spec.name!r} expected {want}, "
                f"got {v!r}"
            )
    extra = sorted(set(feats) - {f.name for f in schema.features})
    if extra:
        raise EventError(f"invalid impression {event.imp_id}: unknown features {extra}")
