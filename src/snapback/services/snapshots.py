"""Volume snapshot use-cases: create, list, rollback, delete, protect, unprotect."""

from __future__ import annotations

import contextlib
import uuid

from sqlalchemy import select

from snapback.catalog.models import Snapshot, Volume
from snapback.domain.errors import Conflict, HasDependents, InvalidInput, NotFound
from snapback.domain.models import OperationStatus, SnapshotStatus
from snapback.domain.names import SnapshotRef
from snapback.services import journal
from snapback.services.catalog_queries import (
    clones_of,
    ensure_not_running,
    live_snapshot,
    live_volume,
    volume_label,
)
from snapback.services.context import Context
from snapback.services.views import SnapshotView
from snapback.services.volumes import volume_lock

CREATE = "snapshot.create"
DELETE = "snapshot.delete"


class SnapshotService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _pool(self, pool: str | None) -> str:
        name = pool or self.ctx.settings.default_pool
        self.ctx.pool(name)
        return name

    def _view(self, snap_id: str) -> SnapshotView:
        with self.ctx.sessions() as s:
            snap = s.get(Snapshot, snap_id)
            assert snap is not None
            vol = snap.volume
            size = next(
                (
                    x.size
                    for x in self.ctx.pool(vol.pool).list_snapshots(vol.storage_name)
                    if x.name == snap.storage_name
                ),
                vol.size,
            )
            return SnapshotView(
                id=snap.id,
                volume=vol.name,
                pool=vol.pool,
                name=snap.name,
                protected=snap.protected,
                status=snap.status,
                size=size,
                created_at=snap.created_at,
                children=[volume_label(c) for c in clones_of(s, snap.id)],
            )

    def _resolve(self, ref: SnapshotRef, pool: str | None) -> tuple[Volume, Snapshot]:
        with self.ctx.sessions() as s:
            vol = live_volume(s, self._pool(pool), ref.volume)
            return vol, live_snapshot(s, vol, ref.snapshot)

    def show(self, ref: SnapshotRef, pool: str | None = None) -> SnapshotView:
        return self._view(self._resolve(ref, pool)[1].id)

    def list_snapshots(self, volume: str, pool: str | None = None) -> list[SnapshotView]:
        with self.ctx.sessions() as s:
            vol = live_volume(s, self._pool(pool), volume)
            ids = s.scalars(
                select(Snapshot.id)
                .where(
                    Snapshot.volume_id == vol.id,
                    Snapshot.status != SnapshotStatus.DELETED,
                )
                .order_by(Snapshot.created_at)
            ).all()
        return [self._view(i) for i in ids]

    def create(self, ref: SnapshotRef, pool: str | None = None) -> SnapshotView:
        with self.ctx.sessions() as s:
            vol = live_volume(s, self._pool(pool), ref.volume)
            ensure_not_running(s, vol)
        if vol.read_only:
            raise InvalidInput(f"volume {vol.pool}/{vol.name} is read-only (an image's volume)")
        storage = "s-" + uuid.uuid4().hex[:20]
        with self.ctx.lock(volume_lock(vol.id)):
            with self.ctx.sessions() as s, contextlib.suppress(NotFound):
                live_snapshot(s, vol, ref.snapshot)
                raise Conflict(f"snapshot {vol.pool}/{ref} already exists")
            with journal.operation(
                self.ctx, CREATE, f"{vol.pool}/{ref}", volume_id=vol.id, storage_name=storage
            ) as op:
                self.ctx.pool(vol.pool).create_snapshot(vol.storage_name, storage)
                op.step("stored")
                with self.ctx.transaction() as s:
                    snap = Snapshot(
                        volume_id=vol.id,
                        name=ref.snapshot,
                        storage_name=storage,
                        status=SnapshotStatus.AVAILABLE,
                    )
                    s.add(snap)
                    s.flush()
                    snap_id = snap.id
        return self._view(snap_id)

    def rollback(self, ref: SnapshotRef, pool: str | None = None) -> SnapshotView:
        vol, snap = self._resolve(ref, pool)
        with self.ctx.sessions() as s:
            ensure_not_running(s, vol)
        if vol.read_only:
            raise InvalidInput(f"volume {vol.pool}/{vol.name} is read-only (an image's volume)")
        with self.ctx.lock(volume_lock(vol.id)):
            driver = self.ctx.pool(vol.pool)
            driver.rollback_snapshot(vol.storage_name, snap.storage_name)
            with self.ctx.transaction() as s:
                row = s.get(Volume, vol.id)
                assert row is not None
                row.size = driver.volume_info(vol.storage_name).size
        return self._view(snap.id)

    def set_protected(
        self, ref: SnapshotRef, protected: bool, pool: str | None = None
    ) -> SnapshotView:
        vol, snap = self._resolve(ref, pool)
        with self.ctx.lock(volume_lock(vol.id)):
            if not protected:
                with self.ctx.sessions() as s:
                    clones = [volume_label(c) for c in clones_of(s, snap.id)]
                if clones:
                    raise HasDependents(f"cannot unprotect {vol.pool}/{ref}: it has clones", clones)
            driver = self.ctx.pool(vol.pool)
            if protected:
                driver.protect_snapshot(vol.storage_name, snap.storage_name)
            else:
                driver.unprotect_snapshot(vol.storage_name, snap.storage_name)
            with self.ctx.transaction() as s:
                row = s.get(Snapshot, snap.id)
                assert row is not None
                row.protected = protected
        return self._view(snap.id)

    def delete(self, ref: SnapshotRef, pool: str | None = None, *, defer: bool = False) -> str:
        """Delete a snapshot; returns ``deleted`` or ``deferred``."""
        vol, snap = self._resolve(ref, pool)
        with self.ctx.lock(volume_lock(vol.id)):
            with self.ctx.sessions() as s:
                snap = live_snapshot(s, vol, ref.snapshot)  # again, under the lock
                ensure_not_running(s, vol)
                clones = [volume_label(c) for c in clones_of(s, snap.id)]
            if clones and defer:
                with self.ctx.transaction() as s:
                    row = s.get(Snapshot, snap.id)
                    assert row is not None
                    row.status = SnapshotStatus.PENDING_DELETE
                return "deferred"
            if clones:
                raise HasDependents(
                    f"snapshot {vol.pool}/{ref} has clones (use --defer to delete "
                    "it once they are gone)",
                    clones,
                )
            if snap.protected:
                raise Conflict(f"snapshot {vol.pool}/{ref} is protected; unprotect it first")
            self.remove(snap.id)
            return "deleted"

    def remove(self, snap_id: str) -> None:
        """Remove a snapshot nothing depends on (unprotecting it if needed)."""
        with self.ctx.sessions() as s:
            snap = s.get(Snapshot, snap_id)
            assert snap is not None
            vol = snap.volume
            target = f"{vol.pool}/{vol.name}@{snap.name}"
        with journal.operation(self.ctx, DELETE, target, snapshot_id=snap_id) as op:
            op.step("removing")
            _remove_storage(self.ctx, snap_id)
            op.step("removed")
            _forget(self.ctx, snap_id)


def _remove_storage(ctx: Context, snap_id: str) -> None:
    with ctx.sessions() as s:
        snap = s.get(Snapshot, snap_id)
        assert snap is not None
        vol_storage, pool, storage = snap.volume.storage_name, snap.volume.pool, snap.storage_name
    driver = ctx.pool(pool)
    present = {x.name: x for x in driver.list_snapshots(vol_storage)}
    if storage in present:
        if present[storage].protected:
            driver.unprotect_snapshot(vol_storage, storage)
        driver.delete_snapshot(vol_storage, storage)


def _forget(ctx: Context, snap_id: str) -> None:
    with ctx.transaction() as s:
        row = s.get(Snapshot, snap_id)
        if row is not None:
            row.status = SnapshotStatus.DELETED


@journal.recovery(CREATE)
def _recover_create(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    with ctx.sessions() as s:
        exists = s.scalars(
            select(Snapshot.id).where(Snapshot.storage_name == op.payload["storage_name"])
        ).first()
        vol = s.get(Volume, op.payload["volume_id"])
    if exists or vol is None:
        return OperationStatus.RECOVERED
    driver = ctx.pool(vol.pool)
    with contextlib.suppress(NotFound):
        names = {x.name for x in driver.list_snapshots(vol.storage_name)}
        if op.payload["storage_name"] in names:
            driver.delete_snapshot(vol.storage_name, op.payload["storage_name"])
    return OperationStatus.ROLLED_BACK


@journal.recovery(DELETE)
def _recover_delete(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    _remove_storage(ctx, op.payload["snapshot_id"])
    _forget(ctx, op.payload["snapshot_id"])
    return OperationStatus.RECOVERED
