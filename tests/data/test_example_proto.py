"""The committed protobuf code is what protoc makes of the committed .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "minutely/data/proto/example.proto"


def test_the_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'src'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "src" / PROTO),
        ],
        check=True,
        capture_output=True,
    )
    for suffix in ("_pb2.py", "_pb2.pyi"):
        made = (tmp_path / PROTO.replace(".proto", suffix)).read_text()
        committed = (ROOT / "src" / PROTO.replace(".proto", suffix)).read_text()
        # The committed files start with a comment naming the command.
        body = committed[committed.index("# -*- coding") :] if suffix == "_pb2.py" else committed
        assert made.strip() in body, suffix
