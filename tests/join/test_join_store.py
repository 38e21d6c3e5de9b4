"""The join's state on disk: checkpoint and resume give the outputs of an uninterrupted run,
each checkpoint writes only what changed, and a store that does not fit is refused."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_joiner_properties import Case, Tick, cases, collect, feed

from minutely.config import JoinConfig, ModelConfig
from minutely.data.samples import Sample
from minutely.errors import CheckpointError, StorageError
from minutely.events import Click, Conversion, Event, Impression
from minutely.join import Joiner, JoinStats, LateEvent
from minutely.join.store import JoinStore, encode_impression
from minutely.schema import default_schema

S = 1_000
CTR = ModelConfig(name="ctr", attribution_window_s=10, correction_horizon_s=100)
CVR = ModelConfig(
    name="cvr", label="conversion", attribution_window_s=50, correction_horizon_s=1_000
)


def joined(case: Case, hot: int) -> JoinConfig:
    return JoinConfig(
        allowed_lateness_s=case.cfg.allowed_lateness_s,
        max_click_delay_s=case.cfg.max_click_delay_s,
        hot_impressions=hot,
    )


Result = tuple[dict[str, list[Sample]], list[LateEvent], JoinStats]


def uninterrupted(case: Case, drains: set[int]) -> Result:
    j = Joiner(case.models, case.cfg, default_schema())
    got: dict[str, list[Sample]] = {}
    late: list[LateEvent] = []
    for i, step in enumerate(case.steps):
        if i in drains:
            collect(j, got)
            late += j.drain_late()
        feed(j, [step])
    j.flush_all()
    collect(j, got)
    late += j.drain_late()
    return got, late, j.stats


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases(), st.data())
def test_checkpoints_and_resumes_give_the_uninterrupted_outputs(
    case: Case, data: st.DataObject
) -> None:
    """At each cut the joiner checkpoints; at some it then goes on for a few events, as if it
    crashed there (at some of those after checkpointing once more, which the store rolls back),
    and a new joiner resumes from the store and goes on from the cut."""
    n = len(case.steps)
    hot = data.draw(st.sampled_from([0, 1, 3, 1_000]), label="hot_impressions")
    cuts = set(data.draw(st.lists(st.integers(0, n), max_size=4), label="cuts"))
    crashes = set(data.draw(st.lists(st.sampled_from(sorted(cuts) or [0]), max_size=2)))
    undone = set(data.draw(st.lists(st.sampled_from(sorted(crashes) or [0]), max_size=1)))
    drains = set(data.draw(st.lists(st.integers(0, n), max_size=4), label="drains"))
    cfg = joined(case, hot)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p0.sqlite"
        store = JoinStore.create(path, undo=True)
        j = Joiner(case.models, cfg, default_schema(), store=store)
        got: dict[str, list[Sample]] = {}
        late: list[LateEvent] = []
        for i, step in enumerate(case.steps):
            if i in cuts:
                size = j.state_size()
                j.checkpoint()
                generation = store.generation()
                if i in crashes:  # the lost incarnation joins on
                    feed(j, case.steps[i : i + 3])
                    j.drain()
                    if i in undone:
                        j.checkpoint()
                store.close()
                store = JoinStore.open(path, undo=True)
                if store.generation() != generation:
                    assert store.roll_back() == generation
                j = Joiner.resume(case.models, cfg, default_schema(), store)
                assert j.state_size() == size
            if i in drains:
                collect(j, got)
                late += j.drain_late()
            feed(j, [step])
        j.flush_all()
        collect(j, got)
        late += j.drain_late()
        stats = j.stats
        j.checkpoint()
        assert store.row_counts() == (0, 0)  # everything expired: the store is empty
        store.close()
    assert (got, late, stats) == uninterrupted(case, drains)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_a_full_snapshot_of_a_joiner_with_a_store_holds_what_the_store_holds(case: Case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = JoinStore.create(Path(tmp) / "p0.sqlite")
        cfg = joined(case, 0)
        j = Joiner(case.models, cfg, default_schema(), store=store)
        half = len(case.steps) // 2
        feed(j, case.steps[:half])
        j.checkpoint()  # every impression and emitted entry now only in the store
        copy = Joiner.restore(case.models, cfg, default_schema(), j.snapshot())
        assert copy.state_size() == j.state_size()
        rest = [s for s in case.steps[half:] if not isinstance(s, Tick)]
        for joiner in (j, copy):
            feed(joiner, rest)
            joiner.flush_all()
        assert copy.drain() == j.drain()
        assert copy.stats == j.stats
        store.close()


def features(i: int) -> dict[str, int | float | list[int]]:
    """About a kilobyte of features."""
    return {"user_id": i, "ad_id": i % 977, "dense": 0.5, "user_interests": list(range(150))}


def test_a_checkpoint_writes_the_changes_not_the_state(tmp_path: Path) -> None:
    path = tmp_path / "p0.sqlite"
    store = JoinStore.create(path)
    cfg = JoinConfig(allowed_lateness_s=0, max_click_delay_s=60)
    j = Joiner([CTR, CVR], cfg, default_schema(), store=store)
    events: list[Event] = []
    for i in range(3_000):
        events.append(Impression(i, i * 20, features(i)))
        if i % 10 == 0:
            events.append(Click(i, i * 20 + 5))
    j.process_many(events)
    j.drain()
    first = j.checkpoint()
    assert first.rows_written > 3_000 * 0.9
    state_bytes = first.bytes_written
    # Fold the log into the file, so the next commit's pages are all the WAL holds.
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert Path(f"{path}-wal").stat().st_size == 0
    t = 3_000 * 20
    j.process_many([Impression(10_000 + k, t + k, features(k)) for k in range(5)])
    j.process_many([Conversion(2_990, t + 10)])
    second = j.checkpoint()
    assert second.generation == first.generation + 1
    assert second.rows_written <= 10
    assert second.bytes_written < state_bytes / 50
    wal = Path(f"{path}-wal").stat().st_size
    assert 0 < wal < path.stat().st_size / 10, (wal, path.stat().st_size)
    store.close()


def test_memory_keeps_only_the_hot_impressions_after_a_checkpoint(tmp_path: Path) -> None:
    store = JoinStore.create(tmp_path / "p0.sqlite")
    cfg = JoinConfig(allowed_lateness_s=0, max_click_delay_s=3_600, hot_impressions=100)
    ctr = ModelConfig(name="ctr", attribution_window_s=10, correction_horizon_s=3_600)
    j = Joiner([ctr, CVR], cfg, default_schema(), store=store)
    j.process_many([Impression(i, i * S, {"user_id": i}) for i in range(1_000)])
    j.process_many([Click(i, 1_000 * S + i) for i in range(0, 1_000, 100)])  # old: in the store
    assert j.memory_entries() == 1_000 + 10  # nothing written yet: everything in memory
    j.advance_to(2_000 * S)  # every pCVR window emitted
    j.checkpoint()
    assert j.memory_entries() == 100  # the newest impressions; emitted entries are on disk
    assert store.row_counts() == (1_000, 10)
    # A conversion and a click for impressions whose rows are only in the store still join.
    j.process_many([Conversion(200, 2_000 * S), Click(5, 2_000 * S)])
    j.flush_all()
    out = j.drain()
    assert [(s.sample_id, s.label, s.is_correction) for s in out["cvr"] if s.label] == [
        (200, 1, True)
    ]
    assert (5, 1, True) in [(s.sample_id, s.label, s.is_correction) for s in out["ctr"]]
    store.close()


# --- refusals -----------------------------------------------------------------------------


def stored(tmp_path: Path) -> Path:
    """A store with one checkpoint of a few events."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "p0.sqlite"
    store = JoinStore.create(path)
    j = Joiner([CTR, CVR], JoinConfig(), default_schema(), store=store)
    j.process_many([Impression(i, i * S, {"user_id": i}) for i in range(200)])
    j.process_many([Click(3, 4 * S)])
    j.checkpoint()
    store.close()
    return path


def resume(path: Path, models: tuple[ModelConfig, ...] = (CTR, CVR)) -> Joiner:
    return Joiner.resume(models, JoinConfig(), default_schema(), JoinStore.open(path))


def test_a_store_resumes_only_with_the_models_it_was_written_with(tmp_path: Path) -> None:
    path = stored(tmp_path)
    assert resume(path).state_size() > 0
    with pytest.raises(CheckpointError, match=r"join store .*p0\.sqlite: the joiner's models"):
        resume(path, (CTR,))


def test_garbage_in_place_of_a_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p0.sqlite"
    path.write_bytes(b"not a database at all " * 100)
    with pytest.raises(CheckpointError, match=r"join store .*p0\.sqlite: cannot open it"):
        JoinStore.open(path)


def test_a_damaged_store_is_refused(tmp_path: Path) -> None:
    path = stored(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = db.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    assert len(data) > 4 * page
    data[2 * page : 4 * page] = b"\xa5" * (2 * page)  # two pages of the tables overwritten
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"join store .*p0\.sqlite: (failed|unreadable)"):
        JoinStore.open(path)


def test_a_truncated_store_is_refused(tmp_path: Path) -> None:
    path = stored(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"join store .*p0\.sqlite: .*malformed"):
        JoinStore.open(path)


def test_a_store_with_a_garbled_joiner_state_is_refused(tmp_path: Path) -> None:
    path = stored(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = x'c1c1c1' WHERE key = 'joiner'")
    with pytest.raises(CheckpointError, match=r"p0\.sqlite: cannot decode the state"):
        resume(path)


def test_a_store_of_another_format_is_refused(tmp_path: Path) -> None:
    path = stored(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'format'")
    with pytest.raises(CheckpointError, match=r"expected store format 1, got 99"):
        JoinStore.open(path)


def test_an_other_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE records (x)")
    with pytest.raises(CheckpointError, match=r"expected tables meta, imps and entries"):
        JoinStore.open(path)


def test_a_missing_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"p0\.sqlite: expected a file, found none"):
        JoinStore.open(tmp_path / "p0.sqlite")


def test_a_store_without_a_checkpoint_cannot_be_resumed(tmp_path: Path) -> None:
    JoinStore.create(tmp_path / "p0.sqlite").close()
    with pytest.raises(CheckpointError, match=r"expected a checkpoint, found none"):
        resume(tmp_path / "p0.sqlite")


def test_a_new_joiner_refuses_a_used_store(tmp_path: Path) -> None:
    path = stored(tmp_path)
    with pytest.raises(CheckpointError, match=r"expected an empty store, got one at generation 1"):
        Joiner([CTR, CVR], JoinConfig(), default_schema(), store=JoinStore.open(path))


def test_a_roll_back_returns_to_the_generation_before_once(tmp_path: Path) -> None:
    path = tmp_path / "p0.sqlite"
    store = JoinStore.create(path, undo=True)
    j = Joiner([CTR, CVR], JoinConfig(), default_schema(), store=store)
    j.process_many([Impression(i, i * S, {"user_id": i}) for i in range(100)])
    j.process(Click(90, 91 * S))
    j.checkpoint()
    before = (store.row_counts(), store.joiner_state())
    j.process_many([Impression(i, i * S, {"user_id": i}) for i in range(100, 400)])
    j.process_many([Click(300, 301 * S), Conversion(90, 302 * S)])
    j.checkpoint()
    assert store.row_counts() != before[0]
    assert store.roll_back() == 1
    assert (store.row_counts(), store.joiner_state()) == before
    with pytest.raises(CheckpointError, match=r"p0\.sqlite: expected the last commit to be rev"):
        store.roll_back()
    store.close()
    plain = JoinStore.open(stored(tmp_path / "plain"))  # committed without undo
    with pytest.raises(CheckpointError, match=r"got none to undo at generation 1"):
        plain.roll_back()


def test_checkpoint_needs_a_store_and_restore_needs_a_full_snapshot(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"expected a joiner with a store, got one without"):
        Joiner([CTR], JoinConfig(), default_schema()).checkpoint()
    path = stored(tmp_path)
    with sqlite3.connect(path) as db:
        (blob,) = db.execute("SELECT value FROM meta WHERE key = 'joiner'").fetchone()
    with pytest.raises(CheckpointError, match=r"expected a full snapshot, got a store's"):
        Joiner.restore([CTR, CVR], JoinConfig(), default_schema(), bytes(blob))


def cold(tmp_path: Path) -> tuple[JoinStore, Joiner]:
    """A joiner whose 20 impressions are only in the store (nothing hot)."""
    store = JoinStore.create(tmp_path / "p0.sqlite")
    cfg = JoinConfig(allowed_lateness_s=0, hot_impressions=0)
    j = Joiner([CTR], cfg, default_schema(), store=store)
    j.process_many([Impression(i, i * S, {"user_id": i}) for i in range(20)])
    j.advance_to(20 * S)  # every impression behind the watermark
    j.checkpoint()
    assert j.memory_entries() == 0
    return store, j


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ("x'c1'", r"p0\.sqlite: impression 5: undecodable"),
        ("x'07'", r"p0\.sqlite: impression 5: expected an impression record, got int"),
        (
            "x'81a474797065aa696d7072657373696f6e'",
            r"impression 5: expected an impression record \(",
        ),
        (
            f"x'{encode_impression(Impression(6, 5 * S, {})).hex()}'",
            r"impression 5: expected that id in its record, got 6",
        ),
    ],
)
def test_a_stored_impression_that_does_not_decode_stops_the_join(
    tmp_path: Path, features: str, message: str
) -> None:
    store, j = cold(tmp_path)
    with sqlite3.connect(store.path) as db:
        db.execute(f"UPDATE imps SET imp = {features} WHERE iid = ?", (5 - 2**63,))
    failures: list[Exception] = []
    with pytest.raises(CheckpointError, match=message):
        j.process_clocked([(Click(5, 6 * S), 10**15)], lambda _, exc: failures.append(exc))
    assert failures == []  # the store failed, not the event: no dead letter


def test_a_held_impression_missing_from_the_store_stops_the_join(tmp_path: Path) -> None:
    store, j = cold(tmp_path)
    with sqlite3.connect(store.path) as db:
        db.execute("DELETE FROM imps WHERE iid = ?", (5 - 2**63,))
    with pytest.raises(CheckpointError, match=r"p0\.sqlite: impression 5 is held but not stored"):
        j.process(Click(5, 6 * S))


def test_a_checkpoint_into_a_closed_store_fails_naming_it(tmp_path: Path) -> None:
    store, j = cold(tmp_path)
    store.close()
    with pytest.raises(CheckpointError, match=r"p0\.sqlite: commit failed \(Cannot operate"):
        j.checkpoint()
    with pytest.raises(CheckpointError, match=r"p0\.sqlite: read failed \(Cannot operate"):
        store.generation()


def test_a_store_with_a_bad_generation_is_refused(tmp_path: Path) -> None:
    path = stored(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = -3 WHERE key = 'generation'")
    with pytest.raises(CheckpointError, match=r"expected a generation >= 0, got -3"):
        JoinStore.open(path)


def test_a_store_cannot_be_created_where_a_folder_is(tmp_path: Path) -> None:
    (tmp_path / "p0.sqlite").mkdir()
    with pytest.raises(StorageError, match=r"join store .*p0\.sqlite: cannot create it \(.*EISDIR"):
        JoinStore.create(tmp_path / "p0.sqlite")


def test_a_full_snapshot_in_a_store_is_not_resumed(tmp_path: Path) -> None:
    path = stored(tmp_path)
    full = Joiner([CTR, CVR], JoinConfig(), default_schema()).snapshot()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'joiner'", (full,))
    with pytest.raises(CheckpointError, match=r"expected a store's checkpoint state, got a full"):
        resume(path)


def test_every_field_of_an_impression_survives_the_store(tmp_path: Path) -> None:
    store = JoinStore.create(tmp_path / "p0.sqlite")
    j = Joiner([CTR, CVR], JoinConfig(hot_impressions=0), default_schema(), store=store)
    held = Impression(2**64 - 1, 0, {"user_id": 3, "dense": 0.25, "ids": [1, 2]}, request_id=42)
    j.process_many([held, Click(2**64 - 1, 1)])
    j.advance_to(100 * S)  # the pCVR window emitted: its entry goes to the store too
    j.checkpoint()
    assert j.memory_entries() == 0
    assert store.impression(2**64 - 1) == held
    stored = store.entry(0, 2**64 - 1, 0)
    assert stored is not None
    assert stored.imp == held
    store.close()


def test_a_creation_cut_short_leaves_no_partial_store_behind(tmp_path: Path) -> None:
    """A store is built aside and renamed into place: what a process killed while creating one
    leaves (a half-built ``.creating`` file) is never opened, and the next create replaces it."""
    import sqlite3

    partial = tmp_path / "p0.sqlite.creating"
    db = sqlite3.connect(partial)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    db.commit()
    db.close()
    assert not (tmp_path / "p0.sqlite").exists()
    store = JoinStore.create(tmp_path / "p0.sqlite")
    store.close()
    assert not partial.exists()
    JoinStore.open(tmp_path / "p0.sqlite").close()  # complete: every table, the format
