"""Labeled samples: what the join emits and the trainer consumes."""

from __future__ import annotations

import msgspec

from minutely.events import FeatureValue


class Sample(msgspec.Struct, frozen=True):
    """One labeled training example for one model.

    ``event_ts_ms`` is when its attribution window opened (the impression for pCTR, the click for
    pCVR); ``emit_ts_ms`` is when the join emitted it (the window's close, or the late positive's
    arrival for a correction). A correction (``is_correction``) re-emits, as a positive, a sample
    that was earlier emitted as a negative: it carries the same ``sample_id``.
    ``label_ts_ms`` is the time of the positive event, or -1 for a negative.
    """

    sample_id: int
    event_ts_ms: int
    emit_ts_ms: int
    label: int
    is_correction: bool
    label_ts_ms: int
    features: dict[str, FeatureValue]
