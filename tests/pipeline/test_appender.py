from pathlib import Path

from minutely.pipeline.appender import IdempotentAppender
from minutely.stream import SqliteLog


def msgs(lo: int, hi: int) -> list[tuple[bytes | None, bytes, int]]:
    return [(i.to_bytes(8, "big"), f"m{i}".encode(), i) for i in range(lo, hi)]


def read_all(log: SqliteLog, topic: str) -> list[bytes]:
    out: list[bytes] = []
    for p in range(log.partitions(topic)):
        out += [r.value for r in log.read(topic, p, 0, 10_000)]
    return sorted(out)


def test_replayed_messages_past_the_checkpoint_are_written_once(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic("t", 3)
    first = IdempotentAppender(log, "t")
    first.append_keyed(msgs(0, 10))
    ends = first.ends()
    first.append_keyed(msgs(10, 15))  # written, then the process dies before its checkpoint
    second = IdempotentAppender(log, "t", ends)
    assert sum(second.pending_skips().values()) == 5
    assert second.ends() == ends
    written = second.append_keyed(msgs(10, 15)) + second.append_keyed(msgs(15, 18))
    assert written == 3
    assert read_all(log, "t") == sorted(f"m{i}".encode() for i in range(18))
    assert sum(second.pending_skips().values()) == 0
    log.close()


def test_without_checkpoint_nothing_is_skipped(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic("t", 1)
    app = IdempotentAppender(log, "t")
    assert app.append_to(0, msgs(0, 4)) == 4
    assert app.ends() == {0: 4}
    log.close()
