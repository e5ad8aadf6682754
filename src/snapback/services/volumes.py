"""Volume use-cases: create, import, clone, flatten, resize, export, delete
(volume_delete.py)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from sqlalchemy import select

from snapback.catalog.models import Snapshot, Volume
from snapback.domain.errors import Conflict, InvalidInput
from snapback.domain.models import (
    DiskFormat,
    OperationStatus,
    SnapshotStatus,
    VolumeStatus,
)
from snapback.domain.names import SnapshotRef, validate_name
from snapback.drivers.imagefmt.inspector import InspectedImage, inspect
from snapback.drivers.storage.base import CreateOptions, ProgressFn
from snapback.services import journal, volume_delete
from snapback.services.catalog_queries import (
    LIVE_VOLUME,
    clones_of,
    ensure_not_running,
    live_snapshot,
    live_volume,
    volume_label,
)
from snapback.services.context import Context
from snapback.services.views import VolumeView

# re-exported: instances, images, image_create_rbd and backup_restore import it from here
from snapback.services.volume_delete import purge as purge

CREATE = "volume.create"
FLATTEN = "volume.flatten"


def storage_name() -> str:
    return "v-" + uuid.uuid4().hex[:20]


def volume_lock(vol_id: str) -> str:
    return f"volume-{vol_id}"


class VolumeService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _pool_name(self, pool: str | None) -> str:
        name = pool or self.ctx.settings.default_pool
        self.ctx.pool(name)  # raises NotFound for an unknown pool
        return name

    # -- views -----------------------------------------------------------
    def view(self, vol: Volume) -> VolumeView:
        with self.ctx.sessions() as s:
            vol = s.get(Volume, vol.id) or vol
            info = self.ctx.pool(vol.pool).volume_info(vol.storage_name)
            parent = None
            if vol.parent_snapshot_id:
                snap = s.get(Snapshot, vol.parent_snapshot_id)
                if snap is not None:
                    parent = f"{snap.volume.pool}/{snap.volume.name}@{snap.name}"
            snaps = [x.name for x in vol.snapshots if x.status == SnapshotStatus.AVAILABLE]
            driver = self.ctx.pool(vol.pool)
            layout = driver.layout(vol.storage_name) if driver.layouts else None
            return VolumeView(
                id=vol.id,
                name=vol.name,
                pool=vol.pool,
                size=info.size,
                allocated=info.allocated,
                status=vol.status,
                kind=vol.kind,
                read_only=vol.read_only,
                parent=parent,
                snapshots=snaps,
                created_at=vol.created_at,
                layout=dataclasses.asdict(layout) if layout else None,
            )

    def show(self, name: str, pool: str | None = None) -> VolumeView:
        with self.ctx.sessions() as s:
            vol = live_volume(s, self._pool_name(pool), name)
        return self.view(vol)

    def list_volumes(self, pool: str | None = None, *, all_kinds: bool = False) -> list[VolumeView]:
        with self.ctx.sessions() as s:
            q = (
                select(Volume)
                .where(Volume.status.in_(LIVE_VOLUME))
                .order_by(Volume.pool, Volume.name)
            )
            if pool:
                q = q.where(Volume.pool == pool)
            if not all_kinds:
                q = q.where(Volume.kind == "volume")
            vols = list(s.scalars(q))
        return [self.view(v) for v in vols]

    # -- creation (one journal kind for create, import and clone) ---------
    def _new_row(
        self,
        name: str,
        pool: str,
        size: int,
        kind: str = "volume",
        parent_snapshot_id: str | None = None,
    ) -> Volume:
        validate_name(name, "volume name")
        with self.ctx.transaction() as s:
            exists = s.scalars(
                select(Volume.id).where(
                    Volume.pool == pool, Volume.name == name, Volume.status.in_(LIVE_VOLUME)
                )
            ).first()
            if exists:
                raise Conflict(f"volume {pool}/{name} already exists")
            vol = Volume(
                name=name,
                pool=pool,
                storage_name=storage_name(),
                size=size,
                status=VolumeStatus.CREATING,
                kind=kind,
                parent_snapshot_id=parent_snapshot_id,
            )
            s.add(vol)
        return vol

    def _mark_available(self, vol_id: str, size: int) -> None:
        with self.ctx.transaction() as s:
            vol = s.get(Volume, vol_id)
            assert vol is not None
            vol.status, vol.size = VolumeStatus.AVAILABLE, size

    def create(
        self,
        name: str,
        size: int,
        pool: str | None = None,
        options: CreateOptions | None = None,
    ) -> VolumeView:
        pool = self._pool_name(pool)
        if options is not None and not options.is_default() and not self.ctx.pool(pool).layouts:
            raise InvalidInput(f"pool {pool} has no object size or striping settings (RBD has)")
        vol = self._new_row(name, pool, size)
        with journal.operation(self.ctx, CREATE, f"{pool}/{name}", volume_id=vol.id) as op:
            op.step("row")
            info = self.ctx.pool(pool).create_volume(vol.storage_name, size, options)
            op.step("stored")
            self._mark_available(vol.id, info.size)
        return self.show(name, pool)

    def import_file(
        self,
        name: str,
        path: str,
        fmt: DiskFormat | None,
        pool: str | None = None,
        progress: ProgressFn | None = None,
    ) -> VolumeView:
        image: InspectedImage = inspect(path, fmt)  # before qemu-img ever sees the file
        pool = self._pool_name(pool)
        vol = self._new_row(name, pool, image.virtual_size)
        with journal.operation(self.ctx, CREATE, f"{pool}/{name}", volume_id=vol.id) as op:
            op.step("row")
            info = self.ctx.pool(pool).import_volume(vol.storage_name, path, image, progress)
            op.step("stored")
            self._mark_available(vol.id, info.size)
        return self.show(name, pool)

    def clone(
        self, ref: SnapshotRef, new_name: str, pool: str | None = None, dest_pool: str | None = None
    ) -> VolumeView:
        src_pool = self._pool_name(pool)
        dest = self._pool_name(dest_pool or src_pool)
        with self.ctx.sessions() as s:
            parent = live_volume(s, src_pool, ref.volume)
        with self.ctx.lock(volume_lock(parent.id)):
            with self.ctx.sessions() as s:
                snap = live_snapshot(s, parent, ref.snapshot)
                if not snap.protected:
                    raise InvalidInput(
                        f"snapshot {ref} is not protected; protect it before cloning"
                    )
            vol = self._new_row(new_name, dest, parent.size, parent_snapshot_id=snap.id)
            with journal.operation(self.ctx, CREATE, f"{dest}/{new_name}", volume_id=vol.id) as op:
                op.step("row")
                info = self.ctx.pool(src_pool).clone(
                    parent.storage_name, snap.storage_name, self.ctx.pool(dest), vol.storage_name
                )
                op.step("stored")
                self._mark_available(vol.id, info.size)
        return self.show(new_name, dest)

    # -- changes ---------------------------------------------------------
    def resize(
        self, name: str, size: int, pool: str | None = None, allow_shrink: bool = False
    ) -> VolumeView:
        pool = self._pool_name(pool)
        with self.ctx.sessions() as s:
            vol = live_volume(s, pool, name)
            ensure_not_running(s, vol)
        if vol.read_only:
            raise InvalidInput(f"volume {pool}/{name} is read-only (an image's volume)")
        with self.ctx.lock(volume_lock(vol.id)):
            info = self.ctx.pool(pool).resize_volume(
                vol.storage_name, size, allow_shrink=allow_shrink
            )
            with self.ctx.transaction() as s:
                row = s.get(Volume, vol.id)
                assert row is not None
                row.size = info.size
        return self.show(name, pool)

    def flatten(
        self, name: str, pool: str | None = None, progress: ProgressFn | None = None
    ) -> VolumeView:
        pool = self._pool_name(pool)
        with self.ctx.sessions() as s:
            vol = live_volume(s, pool, name)
            ensure_not_running(s, vol)
            if vol.parent_snapshot_id is None:
                raise InvalidInput(f"volume {pool}/{name} has no parent; nothing to flatten")
        with (
            self.ctx.lock(volume_lock(vol.id)),
            journal.operation(self.ctx, FLATTEN, f"{pool}/{name}", volume_id=vol.id) as op,
        ):
            op.step("copying")
            self.ctx.pool(pool).flatten(vol.storage_name, progress)
            op.step("flattened")
            with self.ctx.transaction() as s:
                row = s.get(Volume, vol.id)
                assert row is not None
                row.parent_snapshot_id = None
        return self.show(name, pool)

    def export(
        self,
        name: str,
        dest: str,
        fmt: DiskFormat,
        pool: str | None = None,
        snapshot: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        pool = self._pool_name(pool)
        with self.ctx.sessions() as s:
            vol = live_volume(s, pool, name)
            snap_storage = live_snapshot(s, vol, snapshot).storage_name if snapshot else None
        self.ctx.pool(pool).export_volume(
            vol.storage_name, dest, fmt, snapshot=snap_storage, progress=progress
        )

    def children(self, name: str, snapshot: str | None, pool: str | None = None) -> list[str]:
        pool = self._pool_name(pool)
        with self.ctx.sessions() as s:
            vol = live_volume(s, pool, name)
            snaps = (
                [live_snapshot(s, vol, snapshot)]
                if snapshot
                else [x for x in vol.snapshots if x.status != SnapshotStatus.DELETED]
            )
            return [
                f"{volume_label(c)} (from @{sn.name})" if not snapshot else volume_label(c)
                for sn in snaps
                for c in clones_of(s, sn.id)
            ]

    # -- deletion (volume_delete.py) --------------------------------------
    def delete(
        self,
        name: str,
        pool: str | None = None,
        *,
        defer: bool = False,
        kinds: tuple[str, ...] = ("volume",),
    ) -> str:
        """Delete a volume; returns ``deleted`` or ``deferred``."""
        pool = self._pool_name(pool)
        vol = volume_delete.check_deletable(self.ctx, pool, name, kinds)
        with self.ctx.lock(volume_lock(vol.id)):
            return volume_delete.delete_locked(self.ctx, vol, pool, name, defer=defer)

    def dependents(self, vol_id: str) -> list[str]:
        return volume_delete.dependents(self.ctx, vol_id)

    def _set_status(self, vol_id: str, status: VolumeStatus) -> None:
        volume_delete.set_status(self.ctx, vol_id, status)

    def remove(self, vol_id: str) -> None:
        """Remove a volume that nothing depends on: storage first, then the catalogue."""
        volume_delete.remove(self.ctx, vol_id)


@journal.recovery(CREATE)
def _recover_create(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """Undo a volume creation that did not reach ``available``."""
    with ctx.sessions() as s:
        vol = s.get(Volume, op.payload["volume_id"])
        if vol is not None and vol.status == VolumeStatus.AVAILABLE:
            return OperationStatus.RECOVERED
    purge(ctx, op.payload["volume_id"])
    return OperationStatus.ROLLED_BACK


@journal.recovery(FLATTEN)
def _recover_flatten(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """Let the driver finish or drop its half copy, then make the catalogue agree with it."""
    with ctx.sessions() as s:
        vol = s.get(Volume, op.payload["volume_id"])
        if vol is None:
            return OperationStatus.ROLLED_BACK
        pool, storage = vol.pool, vol.storage_name
    driver = ctx.pool(pool)
    driver.recover()
    for item in driver.find_debris():
        path = Path(item.path)
        if storage in (path.name, path.parent.name):
            driver.remove_debris(item)
    flattened = driver.parent(storage) is None
    if flattened:
        with ctx.transaction() as s:
            row = s.get(Volume, op.payload["volume_id"])
            assert row is not None
            row.parent_snapshot_id = None
    return OperationStatus.RECOVERED if flattened else OperationStatus.ROLLED_BACK
