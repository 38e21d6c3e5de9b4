"""Serving depends on the model and registry, never on the training code."""

from __future__ import annotations

import doctest
import subprocess
import sys

import minutely.serve.app as app_mod


def test_serve_never_imports_train() -> None:
    code = (
        "import sys, minutely.serve, minutely.serve.cli, minutely.serve.torch_predictor\n"
        "print(sorted(m for m in sys.modules if m.startswith('minutely.train')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_app_docstring_example_runs() -> None:
    result = doctest.testmod(app_mod)
    assert result.attempted > 0
    assert result.failed == 0
