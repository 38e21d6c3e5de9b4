import pytest

from minutely.clock import ReplayClock, WallClock, floor_window


def test_replay_clock_moves_only_forward() -> None:
    c = ReplayClock(start_ms=100)
    c.advance_to(50)
    assert c.now_ms() == 100
    c.advance_to(500)
    c.advance(25)
    assert c.now_ms() == 525


def test_replay_clock_rejects_negative_step() -> None:
    with pytest.raises(ValueError, match="expected delta_ms >= 0, got -1"):
        ReplayClock().advance(-1)


def test_wall_clock_is_epoch_ms() -> None:
    assert WallClock().now_ms() > 1_700_000_000_000


def test_floor_window() -> None:
    assert floor_window(299_999, 300_000) == 0
    assert floor_window(300_000, 300_000) == 300_000
