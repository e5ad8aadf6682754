"""The RBD trash, change tracking and debris, for ``RbdPool`` (kept apart to stay readable).

- deferred deletion: ``trash_move`` with a delay; an expired entry is removed
  once none of its snapshots has clones (its snapshots are dropped first);
- ``diff_iterate`` between two snapshots (or everything allocated), which
  incremental backups read;
- debris: images a crash left under the temporary import name.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from snapback.domain.errors import Conflict, HasDependents, InvalidInput
from snapback.drivers.storage.base import Debris, TrashEntry
from snapback.drivers.storage.rbd import snapshots
from snapback.drivers.storage.rbd.cluster import bindings, translated

if TYPE_CHECKING:
    from snapback.drivers.storage.rbd.pool import RbdPool

IMPORT_SUFFIX = ".importing"


def trash_volume(pool: RbdPool, name: str, delay: int) -> None:
    _, rbd = bindings()
    pool.settle(name)
    with translated(pool._spec(name)):
        rbd.RBD().trash_move(pool.ioctx(), name, delay)


def trash(
    pool: RbdPool,
) -> list[TrashEntry]:
    _, rbd = bindings()
    with translated(f"trash of {pool.where}"):
        entries = list(rbd.RBD().trash_list(pool.ioctx()))
    return [TrashEntry(e["id"], e["name"], e["deferment_end_time"].timestamp()) for e in entries]


def empty_trash(pool: RbdPool, *, expired_only: bool = True) -> list[str]:
    _, rbd = bindings()
    done = []
    now = time.time()
    for entry in trash(pool):
        if expired_only and entry.deferred_until > now:
            continue
        try:
            with translated(f"trashed image {pool.where}/{entry.name}"):
                if not _drop_trashed_snaps(pool, entry.id):
                    continue  # a snapshot still has clones: it waits
                pool.settle_trashed(entry.id)
                rbd.RBD().trash_remove(pool.ioctx(), entry.id, force=not expired_only)
        except (Conflict, HasDependents):
            continue  # still has clones: it waits
        done.append(f"{pool.name}/{entry.name}")
    return done


def _drop_trashed_snaps(pool: RbdPool, image_id: str) -> bool:
    """Remove a trashed image's snapshots; False while one of them has clones."""
    with pool.image_by_id(image_id) as img:
        for snap in snapshots.user_snaps(img):
            name = snap["name"]
            if img.is_protected_snap(name):
                with pool.image_by_id(image_id, snapshot=name, read_only=True) as at:
                    if list(at.list_children2()):
                        return False
                img.unprotect_snap(name)
            img.remove_snap(name)
    return True


def changed_extents(
    pool: RbdPool, volume: str, snapshot: str, since: str | None
) -> list[tuple[int, int, bool]]:
    extents: list[tuple[int, int, bool]] = []
    with pool.image(volume, snapshot=snapshot, read_only=True) as img:
        if since is not None:
            snapshots.has_snap(pool, img, volume, since)

        def add(offset: int, length: int, exists: bool) -> None:
            extents.append((offset, length, bool(exists)))

        img.diff_iterate(0, int(img.size()), since, add, include_parent=True)
    return extents


def find_debris(
    pool: RbdPool,
) -> list[Debris]:
    _, rbd = bindings()
    with translated(f"rados pool {pool.where}"):
        names = rbd.RBD().list(pool.ioctx())
    return [
        Debris(f"{pool.where}/{n}", "half-imported image (import interrupted)")
        for n in names
        if n.endswith(IMPORT_SUFFIX)
    ]


def remove_debris(pool: RbdPool, item: Debris) -> None:
    _, rbd = bindings()
    name = item.path.rsplit("/", 1)[1]
    if not name.endswith(IMPORT_SUFFIX):
        raise InvalidInput(f"{item.path} is not debris of this driver")
    with pool.image(name) as img:
        for snap in snapshots.user_snaps(img):
            img.remove_snap(snap["name"])
    pool.settle(name)
    with translated(item.path):
        rbd.RBD().remove(pool.ioctx(), name)
