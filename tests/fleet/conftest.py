"""Fixtures of the fleet tests: a signed origin registry folder, and a fleet of in-process
trackers and agents stopped at the end of each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import CHUNK_BYTES, Fleet, Origin

from minutely.registry import Registry, Signer


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    """An origin registry folder whose versions are signed, and the public key file."""
    signer = Signer.generate()
    public_key = tmp_path / "publisher.pub"
    public_key.write_bytes(signer.public_key_pem())
    root = tmp_path / "origin"
    return Origin(root, signer, public_key, Registry(root, signer=signer, chunk_bytes=CHUNK_BYTES))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()
