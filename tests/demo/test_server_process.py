import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minutely.demo.server import ServerProcess
from minutely.errors import ServeError
from minutely.model.artifact import model_config_doc

pytestmark = pytest.mark.integration


def test_a_server_without_versions_reports_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    with ServerProcess(tmp_path / "registry", ["ctr"], tmp_path, 0.05) as server:
        assert server.status("ctr").get("version") is None
        with pytest.raises(ServeError, match=r"did not load ctr v00000001 in 0\.3 s"):
            server.wait_for_version("ctr", "v00000001", timeout_s=0.3)
        with pytest.raises(ServeError, match="predict failed with HTTP 503"):
            server.predict("ctr", [{"user_id": 1}])


def test_a_server_that_cannot_start_names_its_log(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match=r"exited with code \d+ at start; see .*server\.log"):
        ServerProcess(tmp_path / "registry", ["bad/name"], tmp_path, 0.05)


def test_a_refused_version_fails_at_once_with_the_reason(tmp_path: Path) -> None:

    from minutely.config import ModelConfig
    from minutely.model import build_model
    from minutely.registry import Registry
    from minutely.schema import default_schema

    reg = Registry(tmp_path / "registry")
    cfg = ModelConfig(arch="lr", buckets=64)
    schema = default_schema()
    man = reg.publish(
        "ctr",
        build_model(cfg, schema).state_dict(),
        created_ms=0,
        arch="lr",
        model_config=model_config_doc(cfg),
        schema=schema,
        metrics={},
        samples_seen=0,
    )
    weights = tmp_path / "registry" / "ctr" / man.version / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with ServerProcess(tmp_path / "registry", ["ctr"], tmp_path, 0.05) as server:
        with pytest.raises(ServeError, match=f"refused ctr {man.version}: .*sha256"):
            server.wait_for_version("ctr", man.version, timeout_s=30)
        server._proc.kill()
        server._proc.wait()
        with pytest.raises(ServeError, match="did not answer"):
            server.status("ctr")
        with pytest.raises(ServeError, match="did not answer"):
            server.predict("ctr", [{"user_id": 1}])


def test_a_server_slower_than_its_start_timeout_is_stopped(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    with pytest.raises(ServeError, match=r"did not start in 0\.01 s"):
        ServerProcess(tmp_path / "registry", ["ctr"], tmp_path, 0.05, start_timeout_s=0.01)


DEMO_PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from minutely.demo.server import ServerProcess

    run_dir = Path(sys.argv[1])
    server = ServerProcess(run_dir / "registry", ["ctr"], run_dir, 0.05)
    print(server._proc.pid, flush=True)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie nobody reaped yet is gone


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_the_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", DEMO_PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    server_pid = None
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())  # printed once the server listens
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server_pid), f"server {server_pid} outlived the killed demo"
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
        if server_pid is not None and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
