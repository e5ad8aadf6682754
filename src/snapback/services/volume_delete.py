"""Deleting volumes: the checks that refuse or defer a delete (an instance using the
volume, clones of its snapshots, protected snapshots), the journaled removal, and
``purge``, where every recovery path ends. ``VolumeService`` delegates here and
holds the volume's lock."""

from __future__ import annotations

import contextlib

from snapback.catalog.models import Volume
from snapback.domain.errors import Conflict, HasDependents, InvalidInput, NotFound
from snapback.domain.models import OperationStatus, SnapshotStatus, VolumeStatus
from snapback.services import journal
from snapback.services.catalog_queries import clones_of, instance_using, live_volume, volume_label
from snapback.services.context import Context

DELETE = "volume.delete"


def check_deletable(ctx: Context, pool: str, name: str, kinds: tuple[str, ...]) -> Volume:
    """The live volume ``pool/name``; refused when an instance uses it or its kind is not
    one of ``kinds`` (an image's volume)."""
    with ctx.sessions() as s:
        vol = live_volume(s, pool, name)
        user = instance_using(s, vol.id)
        if user is not None:
            raise Conflict(
                f"volume {pool}/{name} is attached to instance {user.name}; "
                "detach it or delete the instance first"
            )
        if vol.kind not in kinds:
            raise InvalidInput(f"{pool}/{name} belongs to an image; delete the image instead")
    return vol


def delete_locked(ctx: Context, vol: Volume, pool: str, name: str, *, defer: bool) -> str:
    """Delete ``vol`` (``pool/name``) under its lock; returns ``deleted`` or ``deferred``.

    Clones of its snapshots refuse the delete, or with ``defer`` leave it
    ``pending_delete`` for gc; protected snapshots refuse it unless ``defer``.
    """
    clones = dependents(ctx, vol.id)
    if clones and not defer:
        raise HasDependents(
            f"volume {pool}/{name} has snapshots with clones "
            "(use --defer to delete it once they are gone)",
            clones,
        )
    if clones:
        _defer(ctx, vol, pool)
        return "deferred"
    protected = protected_snapshots(ctx, vol.id)
    if protected and not defer:
        raise HasDependents(
            f"volume {pool}/{name} has protected snapshots; unprotect them first (or use --defer)",
            protected,
        )
    remove(ctx, vol.id)
    return "deleted"


def _defer(ctx: Context, vol: Volume, pool: str) -> None:
    driver = ctx.pool(pool)
    if driver.supports_trash:
        # RBD: into the trash at once (the name is free, clones keep reading);
        # gc empties it once the clones are gone and the delay has passed
        driver.trash_volume(vol.storage_name, ctx.settings.pools[pool].trash_delay)
    set_status(ctx, vol.id, VolumeStatus.PENDING_DELETE)


def dependents(ctx: Context, vol_id: str) -> list[str]:
    with ctx.sessions() as s:
        vol = s.get(Volume, vol_id)
        assert vol is not None
        return [volume_label(c) for sn in vol.snapshots for c in clones_of(s, sn.id)]


def protected_snapshots(ctx: Context, vol_id: str) -> list[str]:
    with ctx.sessions() as s:
        vol = s.get(Volume, vol_id)
        assert vol is not None
        return [
            f"{vol.name}@{x.name}"
            for x in vol.snapshots
            if x.protected and x.status != SnapshotStatus.DELETED
        ]


def set_status(ctx: Context, vol_id: str, status: VolumeStatus) -> None:
    with ctx.transaction() as s:
        vol = s.get(Volume, vol_id)
        assert vol is not None
        vol.status = status


def remove(ctx: Context, vol_id: str) -> None:
    """Remove a volume that nothing depends on: storage first, then the catalogue."""
    with ctx.sessions() as s:
        vol = s.get(Volume, vol_id)
        assert vol is not None
        target = f"{vol.pool}/{vol.name}"
    with journal.operation(ctx, DELETE, target, volume_id=vol_id) as op:
        op.step("removing")
        purge(ctx, vol_id)
        op.step("removed")


def purge(ctx: Context, vol_id: str) -> None:
    """Remove a volume's storage (unprotecting its snapshots) if it is there, then mark the
    volume and its snapshots deleted. Safe to repeat: every recovery path ends here."""
    with ctx.sessions() as s:
        vol = s.get(Volume, vol_id)
        if vol is None:
            return
        pool, storage = vol.pool, vol.storage_name
    driver = ctx.pool(pool)
    if storage in driver.list_volumes():
        for snap in driver.list_snapshots(storage):
            if snap.protected:
                driver.unprotect_snapshot(storage, snap.name)
        with contextlib.suppress(NotFound):  # gone meanwhile
            driver.delete_volume(storage)
    with ctx.transaction() as s:
        row = s.get(Volume, vol_id)
        assert row is not None
        row.status = VolumeStatus.DELETED
        for snap_row in row.snapshots:
            snap_row.status = SnapshotStatus.DELETED


@journal.recovery(DELETE)
def _recover_delete(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """A delete that was started is finished: the user asked for it."""
    purge(ctx, op.payload["volume_id"])
    return OperationStatus.RECOVERED
