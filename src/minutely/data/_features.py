"""Per-value checks of feature dicts against a schema, shared by the codecs and serving.

The functions return a description of the first problem (or ``None``) instead of raising, so each
caller wraps it in its own error class and location ("sample 3", "instance 0").
"""

from __future__ import annotations

from collections.abc import Mapping

# The bounds are the ingest check's (minutely.events), so a sample built from an accepted event
# always encodes.
from minutely.events import F32_OVERFLOW as _F32_OVERFLOW
from minutely.events import INT64_MAX, INT64_MIN
from minutely.schema import FeatureSpec, Schema


def is_int64(value: object) -> bool:
    """An ``int`` (not a ``bool``) that fits a signed 64-bit id."""
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _listing(what: str, reprs: list[str]) -> str:
    if len(reprs) == 1:
        return f"{what} {reprs[0]}"
    return f"{what}s {', '.join(reprs)}"


def value_problem(spec: FeatureSpec, value: object) -> str | None:
    """What is wrong with ``value`` as a value of the feature ``spec``, or ``None``."""
    if spec.kind == "sparse":
        if not is_int64(value):
            return f"expected an int64 id, got {_describe(value)}"
        return None
    if spec.kind == "multi_sparse":
        if not isinstance(value, list):
            return f"expected a list of int64 ids, got {_describe(value)}"
        for pos, item in enumerate(value):
            if not is_int64(item):
                return f"expected a list of int64 ids, got {_describe(item)} at position {pos}"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a finite number, got {_describe(value)}"
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        return f"expected a finite number within int64 range, got {_describe(value)}"
    if not abs(value) < _F32_OVERFLOW:  # also false for nan
        return f"expected a finite number within float32 range, got {_describe(value)}"
    return None


def features_problem(features: Mapping[str, object], schema: Schema) -> str | None:
    """What is wrong with a feature dict as a whole (missing, unknown, mistyped), or ``None``."""
    names = [f.name for f in schema.features]
    missing = [n for n in names if n not in features]
    if missing or len(features) != len(names):
        known = set(names)
        unknown = sorted(repr(k) for k in features if k not in known)
        parts = []
        if missing:
            parts.append(_listing("missing feature", [repr(n) for n in missing]))
        if unknown:
            parts.append(_listing("unknown feature", unknown))
        return "; ".join(parts)
    for spec in schema.features:
        value = features[spec.name]
        # Inline checks of the common, valid case; value_problem says what is wrong otherwise.
        if spec.kind == "sparse":
            ok = type(value) is int and INT64_MIN <= value <= INT64_MAX
        elif spec.kind == "dense":
            ok = (type(value) is float and abs(value) < _F32_OVERFLOW) or (
                type(value) is int and INT64_MIN <= value <= INT64_MAX
            )
        else:
            ok = type(value) is list and all(map(is_int64, value))
        if not ok:
            problem = value_problem(spec, value)
            if problem is not None:
                return f"feature {spec.name!r}: {problem}"
    return None
