"""Feature and label schema shared by every stage.

A :class:`Schema` names the features a sample carries and how each is typed:

* ``sparse``: one integer id per sample (``user_id``, ``ad_id``);
* ``multi_sparse``: a variable-length list of integer ids per sample (``user_interests``);
* ``dense``: one float per sample.

Features flagged ``hour_level`` are refreshed hourly upstream (statistics such as an ad's CTR of
the previous hour); during online training their weights stay frozen at the day model's.

>>> s = default_schema()
>>> [f.name for f in s.features if f.hour_level]
['ad_ctr_1h']
>>> len(s.fingerprint())
16
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from minutely.errors import SchemaError

FeatureKind = Literal["sparse", "multi_sparse", "dense"]
LabelKind = Literal["click", "conversion"]
FEATURE_KINDS: tuple[FeatureKind, ...] = ("sparse", "multi_sparse", "dense")
LABEL_KINDS: tuple[LabelKind, ...] = ("click", "conversion")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: FeatureKind
    hour_level: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise SchemaError(f"feature name: expected an identifier, got {self.name!r}")
        if self.kind not in FEATURE_KINDS:
            raise SchemaError(
                f"feature {self.name!r}: expected kind in {FEATURE_KINDS}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class Schema:
    """An ordered set of features; the order is the column order everywhere."""

    features: tuple[FeatureSpec, ...]
    version: int = 1

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"schema: expected unique feature names, got duplicates {dupes}")
        if not self.features:
            raise SchemaError("schema: expected at least one feature, got none")

    @property
    def sparse(self) -> tuple[FeatureSpec, ...]:
        """Single- and multi-valued id features, in schema order."""
        return tuple(f for f in self.features if f.kind != "dense")

    @property
    def dense(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.kind == "dense")

    def get(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise SchemaError(f"schema: no feature named {name!r}")

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "features": [
                {"name": f.name, "kind": f.kind, "hour_level": f.hour_level} for f in self.features
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Schema:
        try:
            feats = d["features"]
            if not isinstance(feats, list):
                raise TypeError("features is not a list")
            version = d.get("version", 1)
            if not isinstance(version, int):
                raise TypeError("version is not an int")
            return cls(
                features=tuple(
                    FeatureSpec(
                        name=str(f["name"]), kind=f["kind"], hour_level=bool(f["hour_level"])
                    )
                    for f in feats
                ),
                version=version,
            )
        except (KeyError, TypeError) as exc:
            raise SchemaError(f"schema: malformed schema document ({exc})") from exc

    def fingerprint(self) -> str:
        """A short stable hash of the schema; artifacts carry it so servers refuse mismatches."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_schema() -> Schema:
    """The features the ad-market simulator emits with every impression."""
    return Schema(
        features=(
            FeatureSpec("user_id", "sparse"),
            FeatureSpec("ad_id", "sparse"),
            FeatureSpec("campaign_id", "sparse"),
            FeatureSpec("advertiser_id", "sparse"),
            FeatureSpec("category", "sparse"),
            FeatureSpec("slot", "sparse"),
            FeatureSpec("device", "sparse"),
            FeatureSpec("hour_of_day", "sparse"),
            FeatureSpec("user_interests", "multi_sparse"),
            FeatureSpec("ad_age_hours", "dense"),
            FeatureSpec("user_activity", "dense"),
            FeatureSpec("ad_ctr_1h", "dense", hour_level=True),
        )
    )
