"""Every docstring example in the package runs and holds."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import minutely

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(minutely.__path__, prefix="minutely.")
    if not m.name.endswith("__main__")
)


def test_the_package_has_modules_with_examples() -> None:
    assert len(MODULES) > 40


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
