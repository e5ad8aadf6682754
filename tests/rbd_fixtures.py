"""RBD helpers for tests: the contract pools on the session's cluster, and a wiper."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from snapback.drivers.storage.rbd import RbdPool
from snapback.drivers.storage.rbd.cluster import cluster
from tests.ceph_fixture import CephCluster

RBD_POOLS = ("vols", "others")


def wipe(pools: list[RbdPool]) -> None:
    """Remove every image, snapshot and trash entry (clones first, as RBD wants)."""
    import rbd

    from snapback.drivers.storage.rbd import closing

    for _ in range(10):
        closing.settle()  # this process's images closed late still watch theirs
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
