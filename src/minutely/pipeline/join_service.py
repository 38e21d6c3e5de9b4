"""``minutely join``: raw topic -> one samples topic per model (+ dead letters), as a service.

Any number of join processes form one consumer group on the raw topic and split its partitions.
Everything about one raw partition (its position, its joiner's state, its exactly-once writers'
states, its counts) is one :class:`~minutely.pipeline.join_stage.PartitionJoin`, checkpointed on
its own into its store ``<run>/checkpoints/join/p<N>.sqlite``
(:class:`~minutely.join.store.JoinStore`): each checkpoint commits, in one transaction, what
changed since the previous one with the partition's position, writer states, counts and the
settings. When the group gives a process a partition, the process opens that partition's store,
whoever wrote it, and seeks to its position; before a partition is taken away (rebalance, clean
stop) the process checkpoints it and closes the store. A process killed with SIGKILL loses its
partitions after the group's session timeout; the member that takes them over resumes from their
last checkpoints (the store holds the last committed one: a commit is one SQLite transaction),
and the exactly-once writers verify and skip what the dead process had written after them.

The join's time is its partitions' own: each partition's clock is the newest impression time it
has seen, so what the join emits depends only on the partition's records, never on when they
were read; that is what lets a restored partition reproduce, message for message, what its
predecessor wrote.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from minutely.config import Config
from minutely.features import open_resolver
from minutely.join.store import JoinStore
from minutely.pipeline.join_stage import JoinSettings, PartitionJoin
from minutely.pipeline.settings import check_settings, output_settings
from minutely.schema import default_schema
from minutely.stream import Log, Record

_log = logging.getLogger("minutely.join")


class JoinService:
    """One member of the join group."""

    def __init__(
        self,
        cfg: Config,
        log: Log,
        run_dir: Path,
        *,
        group: str = "minutely-join",
        checkpoint_every_records: int = 100_000,
        checkpoint_every_s: float = 10.0,
        poll_records: int = 20_000,
    ) -> None:
        self.cfg = cfg
        self._log = log
        self._schema = default_schema()
        self._dir = run_dir / "checkpoints" / "join"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._settings = output_settings(cfg, "join")
        self._join_settings = JoinSettings.from_config(cfg)
        # Impressions published by reference get their features from the snapshot tables.
        self._resolver = open_resolver(cfg, self._schema, run_dir)
        self._every_records = checkpoint_every_records
        self._every_s = checkpoint_every_s
        self._poll_records = poll_records
        self.parts: dict[int, PartitionJoin] = {}
        self._since: dict[int, int] = {}
        self._saved_at: dict[int, float] = {}
        raw = cfg.stream.raw_topic
        log.create_topic(raw, cfg.stream.partitions)
        for m in cfg.models:
            log.create_topic(m.samples_topic, cfg.stream.partitions)
        log.create_topic(cfg.stream.dead_letter_topic, 1)
        self._consumer = log.consumer(
            raw, group=group, on_assign=self._assigned, on_revoke=self._revoked
        )

    # -- running ----------------------------------------------------------------------------------

    def step(self, timeout_s: float = 0.0) -> int:
        """Join one poll's worth of raw records; returns how many were read."""
        records = self._consumer.poll(self._poll_records, timeout_s)
        by_part: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            by_part[r.partition].append(r)
        now = time.monotonic()
        for p, recs in by_part.items():
            part = self.parts.get(p)
            if part is None:  # revoked inside this poll: the next owner reads them again
                continue
            part.process(recs)
            self._since[p] = self._since.get(p, 0) + len(recs)
        for p in list(self.parts):
            if (
                self._since.get(p, 0) >= self._every_records
                or now - self._saved_at.get(p, now) >= self._every_s
            ):
                self._save(p)
        return len(records)

    def close(self) -> None:
        """Checkpoint every owned partition and leave the group (its partitions move at once)."""
        for p in list(self.parts):
            self._save(p)
            self.parts[p].close()
        self.parts.clear()  # saved: the revocation inside close has nothing left to save
        self._consumer.close()
        if self._resolver is not None:
            self._resolver.close()

    def abandon(self) -> None:
        """Let every partition go without a checkpoint (after the log failed mid-step, the
        state in memory may be ahead of what was written): the next owner, or this process
        started again, resumes from the last checkpoints."""
        for part in self.parts.values():
            part.close()
        self.parts.clear()
        self._consumer.close()
        if self._resolver is not None:
            self._resolver.close()

    def lag(self) -> int:
        ends = self._consumer.end_offsets()
        at = self._consumer.positions()
        return sum(max(0, ends[p] - at.get(p, 0)) for p in ends)

    def status(self) -> dict[str, Any]:
        """Owned partitions, positions, lag and counts, for ``minutely up``'s status line."""
        events = sum(p.stats.events for p in self.parts.values())
        dead = sum(p.stats.dead_letters for p in self.parts.values())
        samples: dict[str, int] = defaultdict(int)
        for part in self.parts.values():
            for name, n in part.stats.samples.items():
                samples[name] += n
        return {
            "partitions": sorted(self.parts),
            "positions": {str(p): part.position for p, part in self.parts.items()},
            "lag": self.lag(),
            "events": events,
            "dead_letters": dead,
            "samples": dict(samples),
        }

    # -- the group's callbacks ------------------------------------------------------------------

    def _path(self, p: int) -> Path:
        return self._dir / f"p{p}.sqlite"

    def _assigned(self, partitions: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for p in partitions:
            store, state = self._load(p)
            try:
                part = PartitionJoin(
                    self._log,
                    self._join_settings,
                    self._schema,
                    p,
                    state=None if state is None else state["join"],
                    store=store,
                    resolver=self._resolver,
                )
            except BaseException:
                store.close()
                raise
            self.parts[p] = part
            self._since[p] = 0
            self._saved_at[p] = time.monotonic()
            out[p] = part.position
            _log.info("partition %d assigned, resuming at offset %d", p, part.position)
        return out

    def _revoked(self, partitions: list[int]) -> None:
        for p in partitions:
            if p in self.parts:
                self._save(p)
                self.parts.pop(p).close()
                _log.info("partition %d revoked", p)

    def _save(self, p: int) -> None:
        self.parts[p].checkpoint({"settings": self._settings})
        self._since[p] = 0
        self._saved_at[p] = time.monotonic()

    def _load(self, p: int) -> tuple[JoinStore, dict[str, Any] | None]:
        """Partition ``p``'s store and its last checkpoint (``None``: a new store, or one that
        never committed, which starts the partition afresh)."""
        path = self._path(p)
        if not path.exists():
            return JoinStore.create(path), None
        store = JoinStore.open(path)
        try:
            state = PartitionJoin.stored_state(store)
            if state is None:
                store.close()
                return JoinStore.create(path), None
            check_settings(state.get("settings"), self._settings, f"join checkpoint {path}")
        except BaseException:
            store.close()
            raise
        return store, state
