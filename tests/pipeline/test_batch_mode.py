"""``minutely train --mode day|hour``: a batch run over a closed range of released samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_helpers import make_pipeline

from minutely.cli import main, parse_time
from minutely.clock import MS_PER_HOUR
from minutely.config import Config
from minutely.errors import ConfigError, StorageError
from minutely.pipeline.commands import run_batch
from minutely.registry import Registry


def _joined(cfg: Config, run_dir: Path, hours: int) -> None:
    """``hours`` of simulated traffic joined into the samples topics of ``run_dir``."""
    pipe, log = make_pipeline(cfg, run_dir)
    for h in range(1, hours + 1):
        pipe.tick(cfg.sim.start_ms + h * MS_PER_HOUR, train=False, export=False)
    pipe.close()
    log.close()


def test_an_hour_run_publishes_a_warm_start_version_and_the_next_continues_it(
    tmp_path: Path, small_cfg: Config
) -> None:
    _joined(small_cfg, tmp_path, 4)
    t0 = small_cfg.sim.start_ms
    first = run_batch(
        small_cfg, tmp_path, model="ctr", mode="hour", end_ms=t0 + 2 * MS_PER_HOUR, start_ms=None
    )
    # The first hour is skipped (released before --start), the second trained on.
    assert first.report.samples > 100
    assert first.version.mode == "hour"
    assert first.version.warm_start
    second = run_batch(
        small_cfg, tmp_path, model="ctr", mode="hour", end_ms=t0 + 3 * MS_PER_HOUR, start_ms=None
    )
    registry = Registry(tmp_path / "registry")
    assert registry.warm_start_versions("ctr") == [first.version.version, second.version.version]
    assert second.version.parent == first.version.version
    assert second.version.samples_seen == first.version.samples_seen + second.report.samples
    first_pos = {int(p): o for p, o in first.version.resume_positions.items()}
    second_pos = {int(p): o for p, o in second.version.resume_positions.items()}
    assert all(second_pos[p] >= first_pos[p] for p in first_pos)
    assert second_pos != first_pos


def test_a_range_the_join_has_not_reached_is_refused(tmp_path: Path, small_cfg: Config) -> None:
    _joined(small_cfg, tmp_path, 2)
    end = small_cfg.sim.start_ms + 5 * MS_PER_HOUR
    with pytest.raises(StorageError, match=rf"expected samples released up to {end} on every"):
        run_batch(small_cfg, tmp_path, model="ctr", mode="hour", end_ms=end, start_ms=None)
    assert Registry(tmp_path / "registry").versions("ctr") == []


def test_a_start_after_the_end_is_refused(tmp_path: Path, small_cfg: Config) -> None:
    with pytest.raises(ConfigError, match=r"'--start': expected a time before --end \(5\)"):
        run_batch(small_cfg, tmp_path, model="ctr", mode="day", end_ms=5, start_ms=9)


def test_times_parse_as_epoch_ms_or_iso_8601() -> None:
    assert parse_time("2026-01-02T00:00:00Z", "--end") == 1_767_312_000_000
    assert parse_time("2026-01-02T01:00:00+01:00", "--end") == 1_767_312_000_000
    assert parse_time("2026-01-02", "--end") == 1_767_312_000_000
    assert parse_time("1767312000000", "--end") == 1_767_312_000_000
    with pytest.raises(ConfigError, match=r"'--end': expected epoch milliseconds or an ISO"):
        parse_time("yesterday", "--end")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "day"], "config field '--end': expected the end of the day range"),
        (
            ["--mode", "online", "--end", "5"],
            "config field '--end': expected no range for --mode online",
        ),
        (["--mode", "hour", "--end", "soon"], "'--end': expected epoch milliseconds or an ISO"),
    ],
)
def test_train_mode_arguments_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["train", "--model", "ctr", "--run-dir", str(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err
