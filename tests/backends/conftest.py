"""Backends for the repository backend contract suite: every backend gets the same tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snapback.repository.backends import Backend
from snapback.repository.backends.local import LocalBackend


@pytest.fixture(params=["local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield LocalBackend(tmp_path / "repo")
        return
    raise AssertionError(request.param)
