from pathlib import Path

import pytest

from minutely.demo.server import ServerProcess
from minutely.errors import ServeError

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
