"""Pools for the driver contract suite: every driver gets the same tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from snapback.drivers.storage.base import StoragePool
from snapback.drivers.storage.local import LocalPool

PoolFactory = Callable[[str], StoragePool]


@pytest.fixture(params=["local"])
def make_pool(request: pytest.FixtureRequest, tmp_path: Path) -> PoolFactory:
    """Returns a function giving the pool of a name; pools of one factory can clone across."""
    if request.param == "local":
        return lambda name: LocalPool(tmp_path / "pools", name, lock_timeout=5)
    raise AssertionError(request.param)


@pytest.fixture
def pool(make_pool: PoolFactory) -> StoragePool:
    return make_pool("vols")
