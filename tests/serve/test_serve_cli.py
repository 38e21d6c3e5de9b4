"""The command line: schema selection and start-up failures."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest

from minutely.errors import SchemaError
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.serve.cli import load_schema, load_token, main


def test_default_schema_unless_a_file_is_given(tmp_path: Path) -> None:
    assert load_schema(None) == default_schema()
    custom = Schema((FeatureSpec("ad_id", "sparse"), FeatureSpec("bid", "dense")))
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(custom.to_dict()))
    assert load_schema(path) == custom


def test_unreadable_schema_file_is_a_schema_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(SchemaError, match=rf"--schema {missing}: expected a JSON schema file"):
        load_schema(missing)
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(SchemaError, match=rf"--schema {path}: expected a JSON object, got list"):
        load_schema(path)
    path.write_text('{"features": []}')
    with pytest.raises(SchemaError, match="expected at least one feature"):
        load_schema(path)


def test_bad_configuration_exits_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--registry", str(tmp_path), "--model", "ctr", "--model", "ctr", "--port", "0"])
    assert status == 2
    assert "serve.models': expected unique model names" in capsys.readouterr().err


def test_bad_thread_count_exits_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--registry", str(tmp_path), "--model", "ctr", "--torch-threads", "0"])
    assert status == 2
    assert "--torch-threads: expected >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "0"], "--workers: expected >= 1, got 0"),
        (["--batch-max-rows", "-1"], "'serve.batch_max_rows': expected an int >= 0, got -1"),
        (
            ["--batch-max-wait-ms", "2000"],
            "'serve.batch_max_wait_ms': expected a float in [0, 1000], got 2000.0",
        ),
    ],
)
def test_bad_worker_and_batch_settings_exit_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["--registry", str(tmp_path), "--model", "ctr", *extra]) == 2
    assert message in capsys.readouterr().err


def test_unusable_token_files_exit_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.token"
    status = main(
        ["--registry", str(tmp_path), "--model", "ctr", "--admin-token-file", str(missing)]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "config field '--admin-token-file': expected a readable token file" in err
    assert str(missing) in err
    empty = tmp_path / "empty.token"
    empty.write_text(" \n")
    status = main(
        ["--registry", str(tmp_path), "--model", "ctr", "--predict-token-file", str(empty)]
    )
    assert status == 2
    assert (
        "config field '--predict-token-file': expected a file holding a token, "
        f"got '{empty} (empty)'" in capsys.readouterr().err
    )


def test_tokens_are_read_without_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("  abc\n")
    assert load_token(path, "--admin-token-file") == "abc"
    assert load_token(None, "--admin-token-file") is None


def test_an_unreadable_public_key_exits_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    status = main(["--registry", str(tmp_path), "--model", "ctr", "--public-key", str(key)])
    assert status == 2
    assert "expected an Ed25519 public key in PEM" in capsys.readouterr().err


def test_workers_on_a_port_in_use_exit_with_status_1(tmp_path: Path) -> None:
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--registry", str(tmp_path), "--model", "ctr", "--workers", "2"]
        assert main([*argv, "--port", str(port)]) == 1
    # the parent's signal handlers are those it found once it returns
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
