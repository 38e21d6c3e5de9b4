"""Typed, frozen configuration loaded from one TOML file.

Every section has defaults, so ``load_config(None)`` is a complete, runnable configuration. A bad
value fails at start with a :class:`~minutely.errors.ConfigError` that names the field, what was
expected and what was got; an unknown key fails the same way (a typo never passes silently).

>>> cfg = load_config(None)
>>> cfg.train.window_s
300
>>> load_config(None, {"train": {"batch_size": 0}})
Traceback (most recent call last):
...
minutely.errors.ConfigError: config field 'train.batch_size': expected int >= 1, got 0 (int)
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minutely.errors import ConfigError


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, float | None]:
    return {"min": lo, "max": hi}


# --- sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """The ad-market simulator (see :mod:`minutely.sim`)."""

    seed: int = field(default=7, metadata=_range(0))
    start_ms: int = field(default=1_767_225_600_000, metadata=_range(0))  # 2026-01-01T00:00Z
    impressions_per_day: int = field(default=1_000_000, metadata=_range(1, 999_999_999))
    users: int = field(default=200_000, metadata=_range(1))
    categories: int = field(default=40, metadata=_range(2))
    advertisers: int = field(default=400, metadata=_range(1))
    campaigns_per_hour: int = field(default=12, metadata=_range(1))
    ads_per_campaign: int = field(default=4, metadata=_range(1))
    campaign_hours_mean: float = field(default=18.0, metadata=_range(1.0, 720.0))
    slots: int = field(default=4, metadata=_range(1, 64))
    devices: int = field(default=3, metadata=_range(1, 64))
    base_ctr: float = field(default=0.03, metadata=_range(1e-4, 0.5))
    base_cvr: float = field(default=0.08, metadata=_range(1e-4, 0.9))
    drift: float = field(default=1.0, metadata=_range(0.0, 10.0))
    delay_preset: Literal["criteo", "fast"] = "criteo"
    regime_switch_hour: int | None = field(default=None, metadata=_range(0))
    regime_end_hour: int | None = field(default=None, metadata=_range(1))


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable and picklable ``str -> str`` mapping (a TOML table of strings).

    >>> m = FrozenMap({"security.protocol": "SSL"})
    >>> m["security.protocol"], m == {"security.protocol": "SSL"}, hash(m) == hash(FrozenMap(m))
    ('SSL', True, True)
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


@dataclass(frozen=True)
class StreamConfig:
    """The log that connects the stages.

    ``backend = "sqlite"`` keeps the log in the file ``path``; ``"kafka"`` uses the brokers at
    ``bootstrap_servers``, with ``kafka`` passed to every librdkafka client as it is (e.g.
    ``security.protocol``, ``sasl.*``; a dotted TOML key such as ``sasl.mechanism = "PLAIN"``
    names the option ``sasl.mechanism``). A group member that has not been heard from for
    ``session_timeout_s`` is dead and loses its partitions (Kafka brokers refuse less than 6 s by
    default); a call to an unreachable Kafka broker fails after about ``request_timeout_s``.
    """

    backend: Literal["sqlite", "kafka"] = "sqlite"
    path: str = "log.sqlite"
    partitions: int = field(default=4, metadata=_range(1, 1024))
    raw_topic: str = "events"
    dead_letter_topic: str = "dead_letters"
    bootstrap_servers: str = "127.0.0.1:9092"
    kafka: Mapping[str, str] = field(default_factory=FrozenMap)
    session_timeout_s: float = field(default=10.0, metadata=_range(1.0))
    request_timeout_s: float = field(default=30.0, metadata=_range(1.0))

    def __post_init__(self) -> None:
        # A plain dict passed by a caller would make the frozen config mutable and unhashable.
        if not isinstance(self.kafka, FrozenMap):
            object.__setattr__(self, "kafka", FrozenMap(self.kafka))


@dataclass(frozen=True)
class IngestConfig:
    """Validation of raw events before the join (see :class:`minutely.events.EventValidator`).

    An event stamped more than ``max_future_s`` ahead of the clock or ``max_past_s`` behind it,
    a message over ``max_event_bytes`` (refused before decoding), or a ``multi_sparse`` feature
    with more than ``max_ids_per_feature`` ids is a dead letter.
    """

    max_future_s: int = field(default=300, metadata=_range(0))
    max_past_s: int = field(default=7 * 86_400, metadata=_range(0))
    max_event_bytes: int = field(default=65_536, metadata=_range(1))
    max_ids_per_feature: int = field(default=1_024, metadata=_range(1))


@dataclass(frozen=True)
class JoinConfig:
    """The join of impressions with clicks and conversions.

    The watermark trails the newest event time by ``allowed_lateness_s``; an impression waits at
    most ``max_click_delay_s`` for its click (what pCVR samples need; pCTR models keep theirs for
    their own attribution window plus correction horizon). A click or conversion stamped more
    than ``max_clock_skew_s`` before its impression is a dead letter. With its state on disk
    (the services and the in-process replay), a partition's join keeps at most
    ``hot_impressions`` impressions in memory once a checkpoint has written them (the newest);
    the others are read back when a click needs them. It changes memory and speed, not outputs.
    """

    allowed_lateness_s: int = field(default=30, metadata=_range(0))
    max_click_delay_s: int = field(default=3_600, metadata=_range(0))
    max_clock_skew_s: int = field(default=60, metadata=_range(0))
    hot_impressions: int = field(default=50_000, metadata=_range(0))


LossName = Literal["bce", "pu", "fnw", "fnc"]
SampleFormat = Literal["arrow", "example", "tfrecord"]


@dataclass(frozen=True)
class SamplesConfig:
    """How a model's samples travel on its samples topic (``[models.samples]``).

    ``format``: ``arrow`` (default) writes one Arrow IPC record batch per message, the trainer's
    fastest form; ``example`` one serialized tf.train.Example per message; ``tfrecord`` a batch
    of Examples per message in TFRecord framing. The join writes the format and the trainer
    reads it. ``keys`` maps sample fields (``sample_id``, ``event_ts_ms``, ``emit_ts_ms``,
    ``label``, ``is_correction``, ``label_ts_ms``) and feature names to their Example keys (a
    name not listed keeps its own name; Arrow batches name their columns by the names). A
    sample with more than ``max_ids`` ids in one multi-valued feature is a dead letter, in every
    format.
    """

    format: SampleFormat = "arrow"
    keys: Mapping[str, str] = field(default_factory=FrozenMap)
    max_ids: int = field(default=1024, metadata=_range(1))


@dataclass(frozen=True)
class ModelConfig:
    """One model: its label, attribution window, loss and architecture.

    A sample waits ``attribution_window_s`` for its action (click or conversion) before it is
    labeled; an action later than that but within ``correction_horizon_s`` after the window
    re-emits it as a positive correction. ``attribution_window_s = 0`` waits for nothing: every
    sample goes out at once as a negative and its action, when it comes within the horizon, as a
    positive duplicate (what the ``fnw`` and ``fnc`` losses are built for). ``loss`` names the
    training objective (see :mod:`minutely.train.losses`).

    During online training the loss is ``(1 - distill_alpha) * loss + distill_alpha *
    BCE(model, day model)``: the current day (warm-start) model is a frozen teacher that keeps the
    online model from forgetting what the day taught it (0 turns it off). With
    ``freeze_hour_level`` the parameters that read only hour-level features (see
    :func:`minutely.model.model_groups`) keep the day model's values online: no gradient, no
    optimizer state.
    """

    name: str = "ctr"
    label: Literal["click", "conversion"] = "click"
    attribution_window_s: int = field(default=600, metadata=_range(0))
    correction_horizon_s: int = field(default=3_600, metadata=_range(0))
    loss: LossName = "bce"
    arch: Literal["lr", "deepfm"] = "deepfm"
    embedding_dim: int = field(default=16, metadata=_range(1, 1024))
    buckets: int = field(default=1 << 15, metadata=_range(2))  # hashed rows per sparse feature
    hidden: tuple[int, ...] = (128, 64)
    distill_alpha: float = field(default=0.1, metadata=_range(0.0, 1.0))
    freeze_hour_level: bool = True
    samples: SamplesConfig = SamplesConfig()

    @property
    def samples_topic(self) -> str:
        return f"samples.{self.name}"


@dataclass(frozen=True)
class TrainConfig:
    window_s: int = field(default=300, metadata=_range(1))
    batch_size: int = field(default=1024, metadata=_range(1))
    lr: float = field(default=1e-3, metadata=_range(0.0))
    embedding_lr: float = field(default=3e-3, metadata=_range(0.0))
    day_epochs: int = field(default=1, metadata=_range(1))
    checkpoint_every_windows: int = field(default=12, metadata=_range(1))
    seed: int = 0


@dataclass(frozen=True)
class ScheduleConfig:
    """When the batch (day or hour) model is trained and the online model restarts from it.

    Every ``cadence`` period, ``at_s`` seconds into it on the event-time clock (the cut), the
    batch model trains on every sample released since the previous cut (labels final for their
    attribution window), is published as a warm-start version, and, with ``online``, the online
    model restarts from its weights and optimizer state at the cut's stream positions. Without
    ``online`` the batch model alone serves until the next cut (the day-only or hourly
    strategy).
    """

    cadence: Literal["day", "hour"] = "day"
    at_s: int = field(default=0, metadata=_range(0))
    online: bool = True

    @property
    def period_s(self) -> int:
        return 86_400 if self.cadence == "day" else 3_600


@dataclass(frozen=True)
class ExportConfig:
    """When the online model publishes, and the gate a candidate must pass.

    A version is due every ``every_min`` event-time minutes once ``min_samples`` samples have
    been trained on since the last export and ``min_trained_min`` minutes of stream since the
    last warm start. With ``gate``, the candidate is scored against the live version on the
    newest window, held back from its training, and published only if its AUC is at most
    ``gate_max_auc_drop`` below the live version's and its PCOC within ``[gate_pcoc_min,
    gate_pcoc_max]``; a window with fewer than ``gate_min_positives`` positives cannot judge AUC.
    """

    every_min: int = field(default=10, metadata=_range(1))
    min_samples: int = field(default=1_000, metadata=_range(0))
    min_trained_min: int = field(default=10, metadata=_range(0))
    keep_versions: int = field(default=24, metadata=_range(1))  # plus base and pinned ones
    gate: bool = True
    gate_max_auc_drop: float = field(default=0.02, metadata=_range(0.0, 1.0))
    gate_pcoc_min: float = field(default=0.6, metadata=_range(0.0))
    gate_pcoc_max: float = field(default=1.67, metadata=_range(0.0))
    gate_min_positives: int = field(default=30, metadata=_range(1))


@dataclass(frozen=True)
class RegistryConfig:
    """Where model versions are published and how they are checked (see :mod:`minutely.registry`).

    ``uri`` is a folder (a relative one is taken inside the run folder) or an object-store URL
    (``s3://bucket/prefix``) opened through fsspec with ``storage_options`` (dotted keys nest:
    ``"client_kwargs.endpoint_url"`` is s3fs's ``client_kwargs={"endpoint_url": ...}``). Every
    file of a version is split into ``chunk_kib`` KiB chunks, each with its sha256 in the
    manifest (what servers fetch from one another). Between full versions the online model
    publishes sparse deltas, at most ``delta_chain_max`` in a row (0: every version full).
    Manifests are signed with the Ed25519 private key in ``signing_key`` and servers verify them
    with ``public_key`` (PEM files; empty: ``<run>/keys/signing.pem`` and ``public.pem``, made by
    the first publisher of the run). New versions and serving changes are announced on
    ``announce_topic`` of the stream log.
    """

    uri: str = "registry"
    storage_options: Mapping[str, str] = field(default_factory=FrozenMap)
    chunk_kib: int = field(default=4_096, metadata=_range(1, 1 << 20))
    delta_chain_max: int = field(default=8, metadata=_range(0, 10_000))
    signing_key: str = ""
    public_key: str = ""
    announce_topic: str = "model-versions"

    def __post_init__(self) -> None:
        if not self.uri.strip():
            raise ConfigError("registry.uri", "a folder or an object-store URL", self.uri)
        if not isinstance(self.storage_options, FrozenMap):
            object.__setattr__(self, "storage_options", FrozenMap(self.storage_options))


@dataclass(frozen=True)
class FleetConfig:
    """Peer-to-peer distribution of versions to the servers of a region (:mod:`minutely.fleet`).

    Each server host runs an agent that fetches new versions chunk by chunk from the peers the
    region's ``tracker`` (its URL; empty: no peers, every agent pulls from the origin) names,
    ``max_transfers`` at a time, into ``cache_dir`` (a relative one inside the run folder), and
    checks the origin every ``poll_interval_s`` besides the announcements. A tracker forgets a
    peer silent for ``peer_ttl_s`` and hands a chunk nobody holds to one agent at a time for
    ``lease_s`` (so a region fetches about one copy from the origin).
    """

    tracker: str = ""
    region: str = "local"
    cache_dir: str = "fleet"
    max_transfers: int = field(default=4, metadata=_range(1, 256))
    poll_interval_s: float = field(default=5.0, metadata=_range(0.01))
    peer_ttl_s: float = field(default=30.0, metadata=_range(0.1))
    lease_s: float = field(default=10.0, metadata=_range(0.01))


@dataclass(frozen=True)
class MonitorConfig:
    """Quality and progress of the live version, and automatic rollback.

    Each trained window's samples (labels matured over their attribution window) are scored by
    the live version and by the latest warm-start version; judged over the last ``windows``
    windows once they hold ``min_positives`` positives, the live version is an anomaly when its
    AUC is more than ``max_auc_drop`` below the warm-start version's or its PCOC is outside
    ``[pcoc_min, pcoc_max]``, each by more than ``confidence_z`` standard errors of the pooled
    windows' noise (0: the plain thresholds); the pipeline is stalled when no window was trained for
    ``stall_timeout_s`` on the service's clock. With ``rollback``, an anomaly points serving back
    to the warm-start version and restarts online training from it.
    """

    enabled: bool = True
    rollback: bool = True
    windows: int = field(default=6, metadata=_range(1))
    min_positives: int = field(default=50, metadata=_range(1))
    max_auc_drop: float = field(default=0.03, metadata=_range(0.0, 1.0))
    pcoc_min: float = field(default=0.7, metadata=_range(0.0))
    pcoc_max: float = field(default=1.4, metadata=_range(0.0))
    confidence_z: float = field(default=2.0, metadata=_range(0.0, 10.0))
    stall_timeout_s: float = field(default=1_800.0, metadata=_range(1.0))


@dataclass(frozen=True)
class ServeConfig:
    """The inference server (``minutely serve``; see :mod:`minutely.serve`).

    ``workers`` processes answer on one port; concurrent requests share a forward pass of at
    most ``batch_max_rows`` rows, waiting at most ``batch_max_wait_ms`` for one another (0
    rows: no batching). The admin endpoints (pin, unpin, rollback) need the bearer token in
    ``admin_token_file`` (empty: admin disabled); predict needs the one in
    ``predict_token_file`` when it is set.
    """

    host: str = "127.0.0.1"
    port: int = field(default=0, metadata=_range(0, 65_535))  # 0: pick a free port
    poll_interval_s: float = field(default=0.2, metadata=_range(0.01))
    workers: int = field(default=1, metadata=_range(1, 256))
    batch_max_rows: int = field(default=1_024, metadata=_range(0))
    batch_max_wait_ms: float = field(default=0.0, metadata=_range(0.0, 1_000.0))
    admin_token_file: str = ""
    predict_token_file: str = ""


@dataclass(frozen=True)
class DemoConfig:
    """``minutely demo``: ``days`` simulated days (the last one replayed online) for the models
    named in ``models`` (every configured model when it is not set)."""

    days: int = field(default=2, metadata=_range(2))
    models: tuple[str, ...] | None = None
    runs_dir: str = "runs"
    score_batch: int = field(default=2_000, metadata=_range(1))
    corrupt_every: int = field(default=20_000, metadata=_range(0))  # 0: a clean stream


@dataclass(frozen=True)
class FeaturesConfig:
    """Feature snapshots in two Delta Lake tables (see :mod:`minutely.features`).

    ``snapshots`` says whether producers write the features of each request to the tables.
    ``replicas`` names the primary and the secondary table: a plain path is a local folder (a
    relative one is taken inside the run folder), a URL (``s3://``, ``gs://``, ``az://``, ...) is
    passed to delta-rs with ``storage_options``, laid over by the replica's own table in
    ``replica_storage_options`` when that array is given (one table per replica). A read that has
    not answered after ``read_timeout_s`` (a write after ``write_timeout_s``) counts as a failure
    of its replica; while reading from the secondary, the primary is checked every
    ``failback_check_s``, and a writer tries a replica that failed again at most that often; a
    request id still absent ``missing_wait_s`` after it was first asked
    for is reported missing. A reader keeps ``cache_buckets`` hourly buckets in memory; a
    writer keeps at most ``max_backlog_rows`` rows for a replica that is down before it refuses
    to write more.
    """

    snapshots: bool = True
    replicas: tuple[str, ...] = ("features/primary", "features/secondary")
    storage_options: Mapping[str, str] = field(default_factory=FrozenMap)
    replica_storage_options: tuple[Mapping[str, str], ...] = ()
    read_timeout_s: float = field(default=5.0, metadata=_range(0.001))
    write_timeout_s: float = field(default=30.0, metadata=_range(0.001))
    failback_check_s: float = field(default=30.0, metadata=_range(0.001))
    missing_wait_s: float = field(default=300.0, metadata=_range(0.0))
    cache_buckets: int = field(default=4, metadata=_range(1, 1024))
    max_backlog_rows: int = field(default=1_000_000, metadata=_range(1))

    def __post_init__(self) -> None:
        # Checked here rather than only at load, so a config built in code is held to the same
        # rules (the loader has already refused bad ranges with the same words).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            tname = type(f.default).__name__
            if lo is not None and not value >= lo:
                raise ConfigError(f"features.{f.name}", f"{tname} >= {lo}", value)
            if hi is not None and not value <= hi:
                raise ConfigError(f"features.{f.name}", f"{tname} <= {hi}", value)
        replicas = self.replicas
        if not isinstance(replicas, tuple) or len(replicas) != 2:
            raise ConfigError(
                "features.replicas", "2 table URLs or paths (a primary and a secondary)", replicas
            )
        for i, url in enumerate(replicas):
            if not isinstance(url, str) or not url.strip():
                raise ConfigError(f"features.replicas[{i}]", "a non-empty table URL or path", url)
        if replicas[0] == replicas[1]:
            raise ConfigError("features.replicas", "2 different tables", replicas)
        if not isinstance(self.storage_options, FrozenMap):
            object.__setattr__(self, "storage_options", FrozenMap(self.storage_options))
        per_replica = tuple(
            m if isinstance(m, FrozenMap) else FrozenMap(m) for m in self.replica_storage_options
        )
        if len(per_replica) not in (0, 2):
            raise ConfigError(
                "features.replica_storage_options",
                "an empty array or one table of options per replica (2)",
                self.replica_storage_options,
            )
        object.__setattr__(self, "replica_storage_options", per_replica)

    def options_for(self, index: int) -> dict[str, str]:
        """The storage options of replica ``index`` (0 primary, 1 secondary)."""
        merged = dict(self.storage_options)
        if self.replica_storage_options:
            merged.update(self.replica_storage_options[index])
        return merged


def _default_models() -> tuple[ModelConfig, ...]:
    return (
        ModelConfig(loss="pu"),
        ModelConfig(
            name="cvr",
            label="conversion",
            attribution_window_s=3_600,
            correction_horizon_s=7 * 86_400,
            loss="pu",
        ),
    )


def check_model(m: ModelConfig) -> None:
    """The rules that tie one model's fields together; raises :class:`ConfigError`.

    Field ranges are checked when the configuration is loaded; this is also called by whatever
    takes a :class:`ModelConfig` built in code (the join), so both paths apply the same rules.

    >>> check_model(ModelConfig(name="ctr", loss="fnw"))
    Traceback (most recent call last):
    ...
    minutely.errors.ConfigError: config field 'models.ctr.attribution_window_s': expected 0 \
(loss 'fnw' trains on samples emitted at once), got 600 (int)
    """
    where = f"models.{m.name}"
    if m.attribution_window_s < 0:
        raise ConfigError(f"{where}.attribution_window_s", "int >= 0", m.attribution_window_s)
    if m.correction_horizon_s < 0:
        raise ConfigError(f"{where}.correction_horizon_s", "int >= 0", m.correction_horizon_s)
    if m.loss in ("fnw", "fnc"):
        if m.attribution_window_s != 0:
            raise ConfigError(
                f"{where}.attribution_window_s",
                f"0 (loss {m.loss!r} trains on samples emitted at once)",
                m.attribution_window_s,
            )
        if m.correction_horizon_s == 0:
            raise ConfigError(
                f"{where}.correction_horizon_s",
                f"int >= 1 (loss {m.loss!r} learns its positives from the duplicates sent "
                "within the horizon)",
                m.correction_horizon_s,
            )


@dataclass(frozen=True)
class Config:
    sim: SimConfig = SimConfig()
    stream: StreamConfig = StreamConfig()
    ingest: IngestConfig = IngestConfig()
    join: JoinConfig = JoinConfig()
    models: tuple[ModelConfig, ...] = field(default_factory=_default_models)
    train: TrainConfig = TrainConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    fleet: FleetConfig = FleetConfig()
    monitor: MonitorConfig = MonitorConfig()
    serve: ServeConfig = ServeConfig()
    demo: DemoConfig = DemoConfig()
    features: FeaturesConfig = FeaturesConfig()

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError("models", f"a model named one of {[m.name for m in self.models]}", name)


# --- loading --------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (TOML; ``None`` for all defaults), apply ``overrides``, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("<file>", "an existing TOML file", str(p)) from exc
        except IsADirectoryError as exc:
            raise ConfigError("<file>", "a TOML file, not a folder", str(p)) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                "<file>", f"UTF-8 text ({exc.reason} at byte {exc.start})", str(p)
            ) from exc
        except OSError as exc:
            raise ConfigError("<file>", f"a readable file ({exc.strerror or exc})", str(p)) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("<file>", f"valid TOML ({exc})", str(p)) from exc
    if overrides:
        data = merge_tables(data, overrides)
    cfg: Config = _build(Config, data, "")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise ConfigError("models", "unique model names", names)
    for m in cfg.models:
        check_model(m)
    if cfg.schedule.at_s >= cfg.schedule.period_s:
        raise ConfigError(
            "schedule.at_s",
            f"int < {cfg.schedule.period_s} (seconds into each {cfg.schedule.cadence})",
            cfg.schedule.at_s,
        )
    if cfg.schedule.at_s % cfg.train.window_s:
        raise ConfigError(
            "schedule.at_s",
            f"a multiple of train.window_s ({cfg.train.window_s}): a cut ends a window",
            cfg.schedule.at_s,
        )
    for section, lo, hi in (
        ("export", cfg.export.gate_pcoc_min, cfg.export.gate_pcoc_max),
        ("monitor", cfg.monitor.pcoc_min, cfg.monitor.pcoc_max),
    ):
        if not lo < hi:
            prefix = "gate_" if section == "export" else ""
            raise ConfigError(f"{section}.{prefix}pcoc_max", f"float > {prefix}pcoc_min ({lo})", hi)
    demo = cfg.demo.models
    if demo is not None:
        unknown = [n for n in demo if n not in names]
        if unknown:
            raise ConfigError("demo.models", f"names of models among {names}", unknown[0])
        if not demo or len(set(demo)) != len(demo):
            raise ConfigError("demo.models", "one or more distinct model names", list(demo))
    return cfg


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, table by table (neither argument is changed)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_tables(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls: type[Any], data: object, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", "a table", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, f"a known field of [{prefix or 'root'}]", data[unknown[0]])
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        where = f"{prefix}.{name}" if prefix else name
        value = _coerce(hints[name], data[name], where)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and value < lo:
                raise ConfigError(where, f"{_tname(hints[name])} >= {lo}", value)
            if hi is not None and value > hi:
                raise ConfigError(where, f"{_tname(hints[name])} <= {hi}", value)
        kwargs[name] = value
    return cls(**kwargs)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(where, f"one of {list(args)}", value)
        return value
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(where, "a table", value)
        items = {k: _coerce(args[1], v, f"{where}.{k}") for k, v in _flatten(value).items()}
        return items if origin is dict else FrozenMap(items)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, "an array", value)
        item_tp = args[0]
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, "a boolean", value)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(where, "int", value)
        # TOML ints are 64-bit, but Python callers and --set overrides are not bound by TOML.
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ConfigError(where, f"int within 64 bits ({_INT64_MIN}..{_INT64_MAX})", value)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(where, "float", value)
        try:
            as_float = float(value)
        except OverflowError:  # an int too large for any float
            as_float = math.inf
        if not math.isfinite(as_float):
            raise ConfigError(where, "a finite float", value)
        return as_float
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, "a string", value)
        return value
    raise ConfigError(where, f"a supported type ({tp})", value)  # pragma: no cover


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A table with its nested tables folded into dotted keys: TOML reads the dotted key
    ``sasl.mechanism = "PLAIN"`` as ``{"sasl": {"mechanism": "PLAIN"}}``, while client options
    are named ``sasl.mechanism``."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
