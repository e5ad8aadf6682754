"""Snapshots and clones of local volumes, for ``LocalPool`` (kept apart to stay readable).

A snapshot freezes the head layer (read-only from then on) under a new empty
head; a rollback puts a new head on the snapshot's layer; a deleted snapshot's
layer is merged away (``layers.finish_pending``). A clone is a new volume whose
bottom layer is backed by the snapshot's layer, named relative to the root, so
only protected snapshots clone and only into a pool of the same root.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from snapback.domain.errors import Conflict, HasDependents, InvalidInput, NotFound
from snapback.domain.models import SnapshotInfo, VolumeInfo
from snapback.domain.names import validate_name
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.storage.local import layers, tracking
from snapback.drivers.storage.local.layers import READ_ONLY, new_layer_id
from snapback.drivers.storage.local.meta import (
    META,
    ParentMeta,
    Pending,
    SnapMeta,
    VolumeMeta,
    load,
)

if TYPE_CHECKING:
    from snapback.drivers.storage.local.pool import LocalPool


# -- snapshots -------------------------------------------------------------------
def lookup(pool: LocalPool, meta: VolumeMeta, snapshot: str) -> SnapMeta:
    """The record of ``snapshot`` in ``meta``; NotFound when it has none."""
    validate_name(snapshot, "snapshot name")
    if snapshot not in meta.snapshots:
        raise NotFound(f"snapshot {pool.name}/{meta.name}@{snapshot} does not exist")
    return meta.snapshots[snapshot]


@contextlib.contextmanager
def prepare_snapshot(
    pool: LocalPool, volume: str, snapshot: str, *, protect: bool = False
) -> Iterator[Callable[[], None]]:
    """The volume's lock is held from the name check to the end; the callable freezes
    the head layer and makes a new one on top (new layer, tracking carried over,
    metadata saved, under the pools' metadata lock). Leaving makes the frozen layer
    read-only and, when no error came, records the protection."""
    validate_name(snapshot, "snapshot name")
    with pool.locked(volume) as meta:
        if snapshot in meta.snapshots:
            raise Conflict(f"snapshot {pool.name}/{volume}@{snapshot} already exists")
        frozen: list[str] = []

        def take() -> None:
            with pool.meta_lock():
                now = pool.load(volume)  # read again under the lock every save takes
                if snapshot in now.snapshots:
                    raise Conflict(f"snapshot {pool.name}/{volume}@{snapshot} already exists")
                below, head = now.head, new_layer_id()
                qemu_img.create(
                    str(pool.layer_path(volume, head)), now.size, backing=f"{below}.qcow2"
                )
                tracking.carry(pool.layer_path(volume, below), pool.layer_path(volume, head))
                now.snapshots[snapshot] = SnapMeta(
                    layer=below, size=now.size, created_at=time.time(), protected=False
                )
                now.layers[head] = below
                now.head = head
                pool.save(now)
            frozen.append(below)

        try:
            yield take
        finally:
            for layer in frozen:
                os.chmod(pool.layer_path(volume, layer), READ_ONLY)
        if frozen and protect:
            with pool.meta_lock():
                now = pool.load(volume)
                now.snapshots[snapshot].protected = True
                pool.save(now)


def snapshot_info(pool: LocalPool, volume: str, snapshot: str) -> SnapshotInfo:
    meta = pool.load(volume)
    lookup(pool, meta, snapshot)
    return _snapshot_info(pool, meta, snapshot)


def _snapshot_info(pool: LocalPool, meta: VolumeMeta, snapshot: str) -> SnapshotInfo:
    snap = meta.snapshots[snapshot]
    return SnapshotInfo(
        name=snapshot,
        size=snap.size,
        protected=snap.protected,
        created_at=snap.created_at,
        children=tuple(pool.children(meta.name, snapshot)),
    )


def list_snapshots(pool: LocalPool, volume: str) -> list[SnapshotInfo]:
    meta = pool.load(volume)
    snaps = sorted(meta.snapshots, key=lambda s: (meta.snapshots[s].created_at, s))
    return [_snapshot_info(pool, meta, s) for s in snaps]


def rollback_snapshot(pool: LocalPool, volume: str, snapshot: str) -> None:
    with pool.locked(volume) as meta, pool.meta_lock():
        snap = lookup(pool, meta, snapshot)
        old, head = meta.head, new_layer_id()
        qemu_img.create(
            str(pool.layer_path(volume, head)), snap.size, backing=f"{snap.layer}.qcow2"
        )
        del meta.layers[old]
        meta.layers[head] = snap.layer
        meta.head, meta.size = head, snap.size
        pool.save(meta)
        pool.layer_path(volume, old).unlink()


def delete_snapshot(pool: LocalPool, volume: str, snapshot: str) -> None:
    with pool.locked(volume) as meta:
        with pool.meta_lock():
            snap = lookup(pool, meta, snapshot)
            clones = pool.children(volume, snapshot)
            if clones:
                raise HasDependents(f"snapshot {volume}@{snapshot} has clones", clones)
            if snap.protected:
                raise Conflict(f"snapshot {volume}@{snapshot} is protected; unprotect it first")
            del meta.snapshots[snapshot]
            meta.pending = Pending("merge", snap.layer)
            pool.save(meta)
        layers.finish_pending(pool, meta)


def set_protected(pool: LocalPool, volume: str, snapshot: str, protected: bool) -> None:
    with pool.locked(volume) as meta, pool.meta_lock():
        snap = lookup(pool, meta, snapshot)
        if not protected:
            clones = pool.children(volume, snapshot)
            if clones:
                raise HasDependents(f"cannot unprotect {volume}@{snapshot}: it has clones", clones)
        snap.protected = protected
        pool.save(meta)


# -- clones ----------------------------------------------------------------------
def clone(
    pool: LocalPool, volume: str, snapshot: str, child_pool: LocalPool, child: str
) -> VolumeInfo:
    """Clone into ``child_pool`` (the caller checked it is a local pool of the same root)."""
    with pool.locked(volume) as meta, pool.meta_lock():
        snap = lookup(pool, meta, snapshot)
        if not snap.protected:
            raise InvalidInput(
                f"snapshot {volume}@{snapshot} is not protected; protect it before cloning"
            )
        vdir = child_pool._reserve(child)
        layer = new_layer_id()
        backing = f"../../{pool.name}/{volume}/{snap.layer}.qcow2"
        qemu_img.create(str(vdir / f"{layer}.qcow2"), snap.size, backing=backing)
        child_pool.save(
            VolumeMeta(
                name=child,
                head=layer,
                size=snap.size,
                layers={layer: None},
                parent=ParentMeta(pool.name, volume, snapshot),
            )
        )
    return child_pool.volume_info(child)


def children(pool: LocalPool, volume: str, snapshot: str) -> list[str]:
    """Every volume under the pool's root whose parent is ``volume@snapshot``."""
    found = []
    for pool_dir in sorted(p for p in pool.root.iterdir() if p.is_dir()):
        for vdir in sorted(p for p in pool_dir.iterdir() if (p / META).is_file()):
            parent = load(vdir).parent
            if parent == ParentMeta(pool.name, volume, snapshot):
                found.append(f"{pool_dir.name}/{vdir.name}")
    return found
