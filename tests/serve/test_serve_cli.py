"""The command line: schema selection and start-up failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minutely.errors import SchemaError
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.serve.cli import load_schema, main


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
