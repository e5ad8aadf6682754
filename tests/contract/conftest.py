"""Pools for the driver contract suite: every driver gets the same tests.

``local``: folders under the test's tmp dir. ``rbd``: two RADOS pools of the
session's throwaway cluster (``vols``, ``others``), emptied after each test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from snapback.drivers.storage.base import StoragePool
from snapback.drivers.storage.local import LocalPool
from snapback.drivers.storage.rbd import RbdPool
from snapback.drivers.storage.rbd.cluster import cluster
from tests.ceph_fixture import CephCluster

PoolFactory = Callable[[str], StoragePool]
RBD_POOLS = ("vols", "others")


def wipe(pools: list[RbdPool]) -> None:
    """Remove every image, snapshot and trash entry (clones first, as RBD wants)."""
    import rbd

    for _ in range(10):
        left = 0
        for pool in pools:
            io = pool.ioctx()
            for entry in rbd.RBD().trash_list(io):
                with contextlib.suppress(rbd.Error):
                    rbd.RBD().trash_remove(io, entry["id"], force=True)
            for name in rbd.RBD().list(io):
                left += 1
                with contextlib.suppress(rbd.Error), rbd.Image(io, name) as img:
                    for snap in list(img.list_snaps()):
                        with contextlib.suppress(rbd.Error):
                            if img.is_protected_snap(snap["name"]):
                                img.unprotect_snap(snap["name"])
                            img.remove_snap(snap["name"])
                with contextlib.suppress(rbd.Error):
                    rbd.RBD().remove(io, name)
        if not left:
            return
    raise AssertionError("could not empty the contract pools")


@pytest.fixture(scope="session")
def rbd_conf(ceph_cluster: CephCluster) -> str:
    handle: Any = cluster(str(ceph_cluster.conf))
    for name in RBD_POOLS:
        if not handle.pool_exists(name):
            handle.create_pool(name)
            handle.open_ioctx(name).application_enable("rbd")
    return str(ceph_cluster.conf)


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
