"""Predict request bodies, decoded and validated into :class:`FeatureColumns`.

Three bodies carry the same thing, the features of the instances to score:

``{"instances": [{feature: value, ...}, ...]}`` (JSON)
    one object per instance;
``{"columns": {feature: [value, ...], ...}}`` (JSON)
    one list per feature, row ``i`` at index ``i`` of every list;
an Arrow IPC stream (content type ``application/vnd.apache.arrow.stream``)
    one record batch with one column per feature: ``int64`` for a sparse feature,
    ``list<int64>`` for a multi-sparse one, any integer or floating-point type for a dense one.

All three follow the rules of :func:`~minutely.data.instances_to_tensors`, and a bad value gets
the same message in each (naming the instance index and the feature). A body that is not what
it claims to be raises :class:`BodyError` with the HTTP status to answer.

>>> from minutely.schema import Schema, FeatureSpec
>>> schema = Schema((FeatureSpec("ad_id", "sparse"), FeatureSpec("bid", "dense")))
>>> fc = decode_body(b'{"columns": {"ad_id": [1, 2], "bid": [0.5, 1]}}', "application/json",
...                  schema, max_instances=10)
>>> len(fc), fc.dense.tolist()
(2, [[0.5], [1.0]])
"""

from __future__ import annotations

from typing import Any

import msgspec
import pyarrow as pa

from minutely.data.tensors import (
    FeatureColumns,
    columns_from_arrow,
    columns_from_instances,
    columns_from_lists,
)
from minutely.errors import SchemaError
from minutely.schema import Schema

ARROW_STREAM = "application/vnd.apache.arrow.stream"


class BodyError(Exception):
    """A request body that cannot be scored: the HTTP ``status`` and the message to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _PredictRequest(msgspec.Struct, forbid_unknown_fields=False):
    instances: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET
    columns: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


_DECODER = msgspec.json.Decoder(_PredictRequest)


def decode_body(
    body: bytes, content_type: str | None, schema: Schema, *, max_instances: int
) -> FeatureColumns:
    """The validated rows of a predict body; :class:`BodyError` (400 or 413) otherwise."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == ARROW_STREAM:
        return _decode_arrow(body, schema, max_instances)
    try:
        request = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise BodyError(400, f"request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BodyError(400, f"request body: expected JSON, got malformed data ({exc})") from exc
    instances, columns = request.instances, request.columns
    try:
        if isinstance(instances, msgspec.UnsetType):
            if isinstance(columns, msgspec.UnsetType):
                raise BodyError(
                    400, "request body: expected a field `instances` or `columns`, got neither"
                )
            fc = columns_from_lists(columns, schema)
            _check_count("'columns'", len(fc), max_instances)
            return fc
        if not isinstance(columns, msgspec.UnsetType):
            raise BodyError(
                400, "request body: expected one of `instances` and `columns`, got both"
            )
        _check_count("'instances'", len(instances), max_instances)
        return columns_from_instances(instances, schema)
    except SchemaError as exc:
        raise BodyError(400, str(exc)) from exc


def _decode_arrow(body: bytes, schema: Schema, max_instances: int) -> FeatureColumns:
    try:
        reader = pa.ipc.open_stream(body)
        batches = list(reader)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BodyError(
            400, f"request body: expected an Arrow IPC stream ({ARROW_STREAM}), got {exc}"
        ) from exc
    if len(batches) != 1:
        raise BodyError(400, f"request body: expected one Arrow record batch, got {len(batches)}")
    rb = batches[0]
    _check_count("arrow batch", rb.num_rows, max_instances)
    try:
        return columns_from_arrow(rb, schema)
    except SchemaError as exc:
        raise BodyError(400, str(exc)) from exc


def _check_count(where: str, n: int, max_instances: int) -> None:
    if n > max_instances:
        raise BodyError(413, f"{where}: expected at most {max_instances} per request, got {n}")


def encode_arrow(columns: dict[str, list[Any]], schema: Schema) -> bytes:
    """An Arrow IPC stream body for ``columns`` (one list per feature), as a client sends it.

    >>> from minutely.schema import Schema, FeatureSpec
    >>> schema = Schema((FeatureSpec("ad_id", "sparse"), FeatureSpec("bid", "dense")))
    >>> body = encode_arrow({"ad_id": [1], "bid": [0.5]}, schema)
    >>> len(decode_body(body, ARROW_STREAM, schema, max_instances=10))
    1
    """
    types = {"sparse": pa.int64(), "multi_sparse": pa.list_(pa.int64()), "dense": pa.float64()}
    arrays = {f.name: pa.array(columns[f.name], type=types[f.kind]) for f in schema.features}
    rb = pa.record_batch(arrays)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as writer:
        writer.write_batch(rb)
    out: bytes = sink.getvalue().to_pybytes()
    return out
