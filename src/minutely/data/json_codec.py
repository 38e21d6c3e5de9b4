"""Samples as JSON, for debugging and fixtures only; the sample log carries Arrow batches.

>>> from minutely.schema import default_schema
>>> schema = default_schema()
>>> feats = {f.name: ([3] if f.kind == "multi_sparse" else 1) for f in schema.features}
>>> s = Sample(1, 1_000, 61_000, 0, False, -1, feats)
>>> samples_from_json(samples_to_json([s]), schema) == [s]
True
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from minutely.data._features import features_problem
from minutely.data.samples import Sample
from minutely.errors import CodecError
from minutely.schema import Schema

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(list[Sample])


def samples_to_json(samples: Sequence[Sample]) -> bytes:
    """Encode samples as one JSON array of objects."""
    return _ENCODER.encode(list(samples))


def samples_from_json(data: bytes, schema: Schema) -> list[Sample]:
    """Decode a JSON array of samples and check every sample's features against ``schema``.

    Raises :class:`~minutely.errors.CodecError` naming what is wrong: bytes that are not JSON, a
    field of the wrong type (with its JSON path), or the sample and feature that do not fit.
    """
    try:
        samples = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise CodecError(f"sample json: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise CodecError(f"sample json: bytes are not valid JSON ({exc})") from exc
    for i, s in enumerate(samples):
        problem = features_problem(s.features, schema)
        if problem is not None:
            raise CodecError(f"sample json: sample {i} (sample_id {s.sample_id}): {problem}")
    return samples
