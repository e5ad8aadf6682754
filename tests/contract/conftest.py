"""Pools for the driver contract suite: every driver gets the same tests.

``local``: folders under the test's tmp dir. ``rbd``: two RADOS pools of the
session's throwaway cluster (``vols``, ``others``), emptied after each test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapback.drivers.storage.base import StoragePool
from snapback.drivers.storage.local import LocalPool
from snapback.drivers.storage.rbd import RbdPool
from tests.rbd_fixtures import RBD_POOLS, wipe

PoolFactory = Callable[[str], StoragePool]


@pytest.fixture(params=["local", "rbd"])
def make_pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PoolFactory]:
    """Returns a function giving the pool of a name; pools of one factory can clone across."""
    if request.param == "local":
        yield lambda name: LocalPool(tmp_path / "pools", name, lock_timeout=5)
        return
    conf = request.getfixturevalue("rbd_conf")
    made: list[RbdPool] = []

    def factory(name: str) -> StoragePool:
        assert name in RBD_POOLS, name
        pool = RbdPool(name, conffile=conf)
        made.append(pool)
        return pool

    yield factory
    wipe(made or [RbdPool(n, conffile=conf) for n in RBD_POOLS])


@pytest.fixture
def pool(make_pool: PoolFactory) -> StoragePool:
    return make_pool("vols")
