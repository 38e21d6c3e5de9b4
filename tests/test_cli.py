"""``minutely demo`` on bad input: a one-line error naming the culprit and exit status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import minutely.demo.run
from minutely.cli import main, parse_override


@pytest.fixture
def demo_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records demo starts instead of running the demo (these inputs must never reach it)."""
    calls: list[dict[str, Any]] = []

    def fake_run_demo(cfg: object, **kwargs: Any) -> dict[str, Any]:
        calls.append({"cfg": cfg, **kwargs})
        return {}

    monkeypatch.setattr(minutely.demo.run, "run_demo", fake_run_demo)
    return calls


def test_overrides_parse_as_toml_literals() -> None:
    assert parse_override("sim.seed=3") == {"sim": {"seed": 3}}
    assert parse_override("stream.path=a/b.sqlite") == {"stream": {"path": "a/b.sqlite"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sim.seed=99999999999999999999999",
            "config field 'sim.seed': expected int within 64 bits",
        ),
        ("train.lr=nan", "config field 'train.lr': expected a finite float, got nan"),
        ("train.lr=inf", "config field 'train.lr': expected a finite float, got inf"),
        ("train.lr=-inf", "config field 'train.lr': expected a finite float, got -inf"),
    ],
)
def test_out_of_range_numbers_exit_2_before_the_demo_starts(
    override: str,
    message: str,
    demo_calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--set", override, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minutely: error: ")
    assert message in err
    assert demo_calls == []


def test_a_config_path_that_is_a_folder_exits_2(
    tmp_path: Path, demo_calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"expected a TOML file, not a folder, got '{tmp_path}'" in err
    assert demo_calls == []


def test_a_valid_override_reaches_the_demo(
    tmp_path: Path, demo_calls: list[dict[str, Any]]
) -> None:
    assert main(["demo", "--set", "sim.seed=11", "--run-dir", str(tmp_path), "--no-progress"]) == 0
    assert len(demo_calls) == 1
    assert demo_calls[0]["cfg"].sim.seed == 11
    assert demo_calls[0]["run_dir"] == tmp_path


def test_a_run_dir_that_is_a_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_folder = tmp_path / "taken"
    not_a_folder.write_text("a file, not a folder")
    assert main(["demo", "--run-dir", str(not_a_folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minutely: error: run folder {not_a_folder}: expected a writable folder")
    assert "got a file in the way" in err
    assert not_a_folder.read_text() == "a file, not a folder"


def test_a_runs_root_below_a_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").write_text("")
    runs = tmp_path / "taken" / "runs"
    assert main(["demo", "--set", f'demo.runs_dir="{runs}"', "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"runs folder {runs}: expected a writable folder" in err
    assert "got a file where a parent folder should be" in err


def test_keys_writes_a_pair_once_and_serve_needs_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["serve", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "registry.public_key" in err
    assert str(run / "keys" / "public.pem") in err
    assert main(["keys", "--out", str(run / "keys")]) == 0
    out = capsys.readouterr().out
    assert "key id " in out
    assert (run / "keys" / "signing.pem").stat().st_mode & 0o777 == 0o600
    assert (run / "keys" / "public.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert main(["keys", "--out", str(run / "keys")]) == 2  # never overwrites a key
    assert "signing.pem" in capsys.readouterr().err
