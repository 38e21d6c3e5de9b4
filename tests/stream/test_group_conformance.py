"""Consumer groups on every log backend.

Members in separate processes (spawn, as separate stage processes) split a topic's partitions,
hand them over on a clean close or after a death, and start each partition they gain from the
position the caller's checkpoint gives (``on_assign``), saved when partitions leave (``on_revoke``).
Every wait is bounded by the backend's session timeout, read from the factory's configuration.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import pytest
from stream_backends import LogFactory

from minutely.stream import Consumer, Log, Message, Record

NewTopic = Callable[[str], str]

_MP = multiprocessing.get_context("spawn")
_PARTITIONS = 4
ALL = frozenset(range(_PARTITIONS))


def wait_s(factory: LogFactory) -> float:
    """A bound for a rebalance: a few session timeouts and process start-up."""
    return 30.0 + 3 * factory.cfg.session_timeout_s


def fill(log: Log, topic: str, per_partition: int, tag: str) -> None:
    for p in range(log.partitions(topic)):
        batch: list[Message] = [
            (None, f"{tag}{p}-{i}".encode(), i + 1) for i in range(per_partition)
        ]
        log.append(topic, batch, partition=p)


def everything(log: Log, topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of every record in the topic."""
    out: set[tuple[int, int]] = set()
    for p in range(log.partitions(topic)):
        position = 0
        while batch := log.read(topic, p, position, 1_000):
            out.update((p, r.offset) for r in batch)
            position = batch[-1].offset + 1
    return out


# --- a member process -------------------------------------------------------------------------


def load(ckpt: Path, parts: list[int]) -> dict[int, int]:
    return {p: int((ckpt / str(p)).read_text()) for p in parts if (ckpt / str(p)).exists()}


def save(ckpt: Path, positions: Mapping[int, int]) -> None:
    for p, off in positions.items():
        tmp = ckpt / f"{p}.tmp-{os.getpid()}"
        tmp.write_text(str(off))
        os.replace(tmp, ckpt / str(p))


def _member(
    factory: LogFactory,
    topic: str,
    name: str,
    ckpt: Path,
    events: Any,
    stop: MpEvent,
    save_every_batch: bool,
) -> None:
    """Polls in group ``g`` until ``stop``; reports what happens as (kind, name, time, data)."""
    log = factory.open()
    holder: list[Consumer] = []

    def on_assign(parts: list[int]) -> Mapping[int, int]:
        starts = load(ckpt, parts)
        events.put(("assign", name, time.monotonic(), {p: starts.get(p, 0) for p in parts}))
        return starts

    def on_revoke(parts: list[int]) -> None:
        positions = holder[0].positions()
        kept = {p: positions[p] for p in parts if p in positions}
        save(ckpt, kept)
        events.put(("revoke", name, time.monotonic(), kept))

    try:
        consumer = log.consumer(topic, group=f"g-{topic}", on_assign=on_assign, on_revoke=on_revoke)
        holder.append(consumer)
        while not stop.is_set():
            got = consumer.poll(50, timeout_s=0.05)
            if got:
                if save_every_batch:  # saved before reported: whatever is reported is saved
                    positions = consumer.positions()
                    save(ckpt, {r.partition: positions[r.partition] for r in got})
                done = [(r.partition, r.offset) for r in got]
                events.put(("records", name, time.monotonic(), done))
        consumer.close()
        events.put(("closed", name, time.monotonic(), None))
    except BaseException as exc:
        events.put(("error", name, time.monotonic(), repr(exc)))
        raise
    finally:
        log.close()


class Members:
    """Member processes of one group and what they reported."""

    def __init__(self, factory: LogFactory, topic: str, ckpt: Path) -> None:
        self.factory, self.topic, self.ckpt = factory, topic, ckpt
        self.events: Any = _MP.Queue()
        self.procs: dict[str, Any] = {}
        self.stops: dict[str, MpEvent] = {}
        self.owned: dict[str, set[int]] = {}
        self.seen: list[tuple[str, str, float, Any]] = []
        self.killed: dict[str, float] = {}

    def start(self, name: str, *, save_every_batch: bool = False) -> None:
        self.stops[name] = _MP.Event()
        self.owned[name] = set()
        args = (self.factory, self.topic, name, self.ckpt, self.events, self.stops[name])
        proc = _MP.Process(target=_member, args=(*args, save_every_batch))
        self.procs[name] = proc
        proc.start()

    def wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + wait_s(self.factory)
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting until {what}; owned {self.owned}"
            try:
                event = self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            kind, name, _, data = event
            assert kind != "error", f"member {name} failed: {data}"
            self.seen.append(event)
            if kind == "assign":
                self.owned[name] |= set(data)
            elif kind == "revoke":
                self.owned[name] -= set(data)

    def consumed(self) -> Counter[tuple[int, int]]:
        return Counter(r for kind, _, _, data in self.seen if kind == "records" for r in data)

    def stop(self, name: str) -> float:
        """Close member ``name`` cleanly; when it had left the group."""
        self.stops[name].set()
        self.wait(lambda: any(e[0] == "closed" and e[1] == name for e in self.seen), f"{name} left")
        self.procs[name].join(wait_s(self.factory))
        assert self.procs[name].exitcode == 0
        return next(e[2] for e in self.seen if e[0] == "closed" and e[1] == name)

    def kill(self, name: str) -> None:
        self.killed[name] = time.monotonic()
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].join(wait_s(self.factory))
        self.owned[name] = set()

    def shutdown(self) -> None:
        for name, proc in self.procs.items():
            self.stops[name].set()
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def check_no_two_owners(self) -> None:
        """Ownership spans (on_assign to on_revoke, or to the kill) of different members never
        overlap on a partition, and every record was read inside its reader's span."""
        spans: dict[int, list[tuple[float, float, str]]] = {p: [] for p in ALL}
        open_: dict[tuple[str, int], float] = {}
        for kind, name, t, data in self.seen:
            if kind == "assign":
                for p in data:
                    open_[(name, p)] = t
            elif kind == "revoke":
                for p in data:
                    spans[p].append((open_.pop((name, p)), t, name))
        for (name, p), t in open_.items():
            spans[p].append((t, self.killed.get(name, float("inf")), name))
        for p, ps in spans.items():
            ps.sort()
            for (_, end, a), (start, _, b) in itertools.pairwise(ps):
                assert end <= start, f"partition {p}: {a} and {b} owned it at once"
        for kind, name, t, data in self.seen:
            if kind == "records":
                for p, off in data:
                    assert any(s <= t <= e and n == name for s, e, n in spans[p]), (
                        f"{name} read partition {p} offset {off} without owning it"
                    )


@pytest.fixture
def members(log_factory: LogFactory, tmp_path: Path, new_topic: NewTopic) -> Any:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    group = Members(log_factory, new_topic("events"), ckpt)
    try:
        yield group
    finally:
        group.shutdown()


def assigned(group: Members, name: str) -> list[tuple[float, dict[int, int]]]:
    return [(t, data) for kind, n, t, data in group.seen if kind == "assign" and n == name]


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_members_split_the_partitions_and_a_clean_close_hands_them_over(
    members: Members, log_factory: LogFactory
) -> None:
    log = log_factory.open()
    try:
        log.create_topic(members.topic, _PARTITIONS)
        fill(log, members.topic, 10, "a")
        members.start("a")
        members.wait(lambda: members.owned["a"] == ALL, "a owns every partition")
        members.start("b")
        members.wait(
            lambda: (
                len(members.owned["a"]) == len(members.owned["b"]) == _PARTITIONS // 2
                and members.owned["a"] | members.owned["b"] == ALL
            ),
            "a and b own half each",
        )
        fill(log, members.topic, 10, "b")
        want = everything(log, members.topic)
        members.wait(lambda: set(members.consumed()) == want, "every record is read")
        left_at = members.stop("a")
        members.wait(lambda: members.owned["b"] == ALL, "b owns every partition")
        took_at = assigned(members, "b")[-1][0]
        fill(log, members.topic, 5, "c")
        want = everything(log, members.topic)
        members.wait(lambda: set(members.consumed()) == want, "every record is read")
        members.stop("b")
    finally:
        log.close()
    # A clean leave hands over at once, not after the session timeout of a dead member.
    assert took_at - left_at < log_factory.cfg.session_timeout_s
    members.check_no_two_owners()
    # Each member resumed from the other's checkpoint: every record read exactly once.
    assert members.consumed() == Counter(want)


@pytest.mark.integration
def test_a_killed_members_partitions_move_after_the_session_timeout_from_its_checkpoint(
    members: Members, log_factory: LogFactory
) -> None:
    if log_factory.cfg.backend == "kafka":
        # noida-db 0.2.3, the only Kafka-protocol broker installable here, never expires a member
        # that dies without leaving (its heartbeat handler checks only the caller's own session),
        # so its partitions never move; a Kafka broker moves them after the session timeout.
        pytest.skip("the test broker (noida-db 0.2.3) does not expire dead group members")
    session = log_factory.cfg.session_timeout_s
    log = log_factory.open()
    try:
        log.create_topic(members.topic, _PARTITIONS)
        fill(log, members.topic, 10, "a")
        members.start("a", save_every_batch=True)
        members.wait(lambda: members.owned["a"] == ALL, "a owns every partition")
        members.start("b", save_every_batch=True)
        members.wait(
            lambda: len(members.owned["a"]) == len(members.owned["b"]) == _PARTITIONS // 2,
            "a and b own half each",
        )
        want = everything(log, members.topic)
        members.wait(lambda: set(members.consumed()) == want, "every record is read")
        orphans = set(members.owned["a"])
        checkpoint = load(members.ckpt, sorted(orphans))
        members.kill("a")
        fill(log, members.topic, 10, "b")  # written while nobody reads a's partitions
        want = everything(log, members.topic)
        members.wait(lambda: members.owned["b"] == ALL, "b owns every partition")
        members.wait(lambda: set(members.consumed()) == want, "every record is read")
        members.stop("b")
    finally:
        log.close()
    took_at, starts = assigned(members, "b")[-1]
    assert took_at - members.killed["a"] > session / 2  # a dead member is noticed by its silence
    assert {p: starts[p] for p in orphans} == checkpoint
    members.check_no_two_owners()
    # b went on from a's positions: nothing lost, nothing read twice.
    assert members.consumed() == Counter(want)


def test_a_member_that_restarts_from_its_checkpoint_neither_loses_nor_repeats(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    log.create_topic(t, 3)
    fill(log, t, 10, "x")
    checkpoint: dict[int, int] = {}
    calls: list[tuple[str, list[int]]] = []
    holder: list[Consumer] = []

    def on_assign(parts: list[int]) -> Mapping[int, int]:
        calls.append(("assign", parts))
        return {p: checkpoint[p] for p in parts if p in checkpoint}

    def on_revoke(parts: list[int]) -> None:
        calls.append(("revoke", parts))
        checkpoint.update({p: holder[-1].positions()[p] for p in parts})

    def read(consumer: Consumer, count: int) -> list[Record]:
        out: list[Record] = []
        deadline = time.monotonic() + 60.0
        while len(out) < count and time.monotonic() < deadline:
            out += consumer.poll(min(5, count - len(out)), timeout_s=0.5)
        return out

    first = log.consumer(t, group=f"g-{t}", on_assign=on_assign, on_revoke=on_revoke)
    holder.append(first)
    early = read(first, 12)
    first.close()
    assert calls == [("assign", [0, 1, 2]), ("revoke", [0, 1, 2])]
    for p in range(3):
        mine = [r.offset for r in early if r.partition == p]
        assert checkpoint[p] == (mine[-1] + 1 if mine else 0)
    second = log.consumer(t, group=f"g-{t}", on_assign=on_assign, on_revoke=on_revoke)
    holder.append(second)
    try:
        late = read(second, 30 - len(early))
        assert second.poll(10, timeout_s=0.2) == []
    finally:
        second.close()
    got = Counter((r.partition, r.offset) for r in early + late)
    assert got == Counter(everything(log, t))
