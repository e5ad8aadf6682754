"""Garbage collection: recover abandoned operations, finish deferred deletes,
and find (and remove) storage objects nothing in the catalogue explains.

This is the clean answer to OpenStack's leftover ``_to_be_deleted_by_glance``
volumes: a delete that must wait is recorded (``pending_delete``) and ``gc``
finishes it once the last dependent is gone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

from sqlalchemy import select

from snapback.catalog.models import (
    BackupEntry,
    Image,
    ImageProperty,
    Instance,
    Operation,
    Snapshot,
    Volume,
)
from snapback.domain.errors import Busy, HasDependents, NotFound, SnapbackError
from snapback.domain.models import (
    ImageStatus,
    OperationStatus,
    SnapshotStatus,
    VolumeStatus,
)
from snapback.domain.names import SnapshotRef
from snapback.drivers.storage.base import TRACKER_PREFIX
from snapback.services import backup_capture as cap
from snapback.services import (
    backup_restore,
    backups,
    image_create_recovery,
    images,
    instances,
    journal,
    volumes,
)
from snapback.services.catalog_queries import clones_of, volume_label
from snapback.services.context import Context
from snapback.services.image_create_rbd import (
    SOURCE_PROP,
    drop_snapshot,
    finish_flatten,
    release_source_snapshot,
)
from snapback.services.snapshots import SnapshotService
from snapback.services.views import GcReport
from snapback.services.volumes import VolumeService

# the modules above register their flows' recovery functions with the journal
_RECOVERING = (backup_restore, backups, image_create_recovery, images, instances, volumes)


def recover_interrupted(ctx: Context) -> list[str]:
    """Finish or undo operations whose process died; what was done, one line each."""
    return journal.recover_abandoned(ctx)


class GcService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.volumes = VolumeService(ctx)
        self.snapshots = SnapshotService(ctx)

    def run(self, *, dry_run: bool = False) -> GcReport:
        report = GcReport(dry_run=dry_run)
        report.recovered.extend(journal.recover_abandoned(self.ctx, dry_run=dry_run))
        if not dry_run:
            for name in self.ctx.settings.pools:
                report.recovered.extend(self.ctx.pool(name).recover())
        self._flattens(report, dry_run)
        self._release_sources(report, dry_run)
        self._deferred(report, dry_run)
        self._release_sources(report, dry_run)
        self._trash(report, dry_run)
        self._orphans(report, dry_run)
        return report

    # -- direct-flow images: background flattens, source snapshots, RBD trash -------
    def _flattens(self, report: GcReport, dry_run: bool) -> None:
        with self.ctx.sessions() as s:
            pending = s.scalars(
                select(ImageProperty.image_id).where(
                    ImageProperty.key == "snapback.flatten",
                    ImageProperty.value.in_(("background", "running")),
                )
            ).all()
        for image_id in pending:
            if dry_run:
                report.deleted.append(f"would flatten image {image_id}")
                continue
            try:
                finish_flatten(self.ctx, image_id)
                report.recovered.append(f"flattened image {image_id}")
            except Busy:
                report.waiting.append(f"image {image_id} is being flattened by its job")

    def _release_sources(self, report: GcReport, dry_run: bool) -> None:
        with self.ctx.sessions() as s:
            rows = s.execute(
                select(ImageProperty.image_id, ImageProperty.value)
                .join(Image, Image.id == ImageProperty.image_id)
                .where(
                    ImageProperty.key == SOURCE_PROP,
                    Image.status.in_((ImageStatus.DELETED, ImageStatus.KILLED)),
                )
            ).all()
            live = [
                image_id
                for image_id, snap_id in rows
                if (snap := s.get(Snapshot, snap_id)) is not None
                and snap.status != SnapshotStatus.DELETED
            ]
        for image_id in live:
            if dry_run:
                report.deleted.append(f"would release the source snapshot of image {image_id}")
            elif release_source_snapshot(self.ctx, image_id):
                report.deleted.append(f"released the source snapshot of image {image_id}")

    def _trash(self, report: GcReport, dry_run: bool) -> None:
        for name in self.ctx.settings.pools:
            driver = self.ctx.pool(name)
            if not driver.supports_trash:
                continue
            if dry_run:
                report.waiting.extend(
                    f"trash {name}/{e.name} until {e.deferred_until:.0f}" for e in driver.trash()
                )
                continue
            report.deleted.extend(f"emptied trash: {x}" for x in driver.empty_trash())

    # -- deferred deletions ---------------------------------------------
    def _deferred(self, report: GcReport, dry_run: bool) -> None:
        progress = True
        while progress:  # removing a clone may free its parent: repeat until nothing moves
            progress = False
            with self.ctx.sessions() as s:
                snaps = s.scalars(
                    select(Snapshot).where(Snapshot.status == SnapshotStatus.PENDING_DELETE)
                ).all()
                vols = s.scalars(
                    select(Volume).where(Volume.status == VolumeStatus.PENDING_DELETE)
                ).all()
                waits = {sn.id: [volume_label(c) for c in clones_of(s, sn.id)] for sn in snaps}
                labels = {sn.id: f"{sn.volume.pool}/{sn.volume.name}@{sn.name}" for sn in snaps}
            for snap in snaps:
                progress |= self._try(
                    report,
                    dry_run,
                    labels[snap.id],
                    waits[snap.id],
                    partial(self.snapshots.remove, snap.id),
                )
            for vol in vols:
                deps = self.volumes.dependents(vol.id)
                progress |= self._try(
                    report,
                    dry_run,
                    f"volume {vol.pool}/{vol.name}",
                    deps,
                    partial(self.volumes.remove, vol.id),
                )
            progress = progress and not dry_run
        self._finish_images()

    def _try(
        self,
        report: GcReport,
        dry_run: bool,
        label: str,
        deps: list[str],
        remove: Callable[[], None],
    ) -> bool:
        if deps:
            report.waiting.append(f"{label} waits for {', '.join(deps)}")
            return False
        if dry_run:
            report.deleted.append(f"would delete {label}")
            return False
        try:
            remove()
        except (HasDependents, Busy) as exc:
            report.waiting.append(f"{label}: {exc}")
            return False
        report.deleted.append(f"deleted {label}")
        return True

    def _finish_images(self) -> None:
        with self.ctx.transaction() as s:
            for img in s.scalars(select(Image).where(Image.status == ImageStatus.PENDING_DELETE)):
                vol = s.get(Volume, img.volume_id) if img.volume_id else None
                if vol is None or vol.status == VolumeStatus.DELETED:
                    img.status = ImageStatus.DELETED

    # -- orphans ---------------------------------------------------------
    def _in_flight(self) -> set[str]:
        """Storage names that running operations are creating right now."""
        names: set[str] = set()
        with self.ctx.sessions() as s:
            for op in s.scalars(
                select(Operation).where(Operation.status == OperationStatus.RUNNING)
            ):
                payload = json.loads(op.payload)
                names.update(str(v) for v in payload.values())
                for step in op.steps:
                    names.update(str(v) for v in json.loads(step.data).values())
        return names

    def _orphan_boot_files(self, report: GcReport, dry_run: bool, busy: set[str]) -> None:
        store = self.ctx.settings.home / "boot-files"
        if not store.is_dir():
            return
        with self.ctx.sessions() as s:
            live = set(s.scalars(select(Image.id).where(Image.status != ImageStatus.DELETED)))
        for blob in sorted(store.iterdir()):
            if blob.name not in live and str(blob) not in busy:
                self._orphan(
                    report,
                    dry_run,
                    str(blob),
                    "boot file no image explains",
                    partial(blob.unlink, missing_ok=True),
                )

    def _orphan_trackers(
        self, report: GcReport, dry_run: bool, busy: set[str], volumes: list[Volume]
    ) -> None:
        """Change tracking of backups this catalogue no longer knows (deleted, pruned,
        their repository forgotten): QEMU would mark writes in it for ever. Volumes of
        running instances keep theirs (libvirt's checkpoints: see docs/backups.md)."""
        with self.ctx.sessions() as s:
            known = set(s.scalars(select(BackupEntry.backup_id)))
            running = {
                d.volume_id
                for i in s.scalars(
                    select(Instance).where(
                        Instance.status.in_([x for x in instances.LIVE if x != "shutoff"])
                    )
                )
                for d in i.disks
            }
        for vol in volumes:
            driver = self.ctx.pool(vol.pool)
            if driver.tracks_changes_by != "bitmap" or vol.id in running:
                continue
            try:
                names = driver.trackers(vol.storage_name)
            except (Busy, NotFound):
                continue  # a backup or another operation holds it now
            for name in names:
                backup_id = name.removeprefix(TRACKER_PREFIX)
                if backup_id in known or backup_id in busy:
                    continue
                self._orphan(
                    report,
                    dry_run,
                    f"{vol.pool}/{vol.name} bitmap {name}",
                    "change tracking of a backup this catalogue does not know",
                    partial(driver.stop_tracking, vol.storage_name, name),
                )

    def _orphan_diff_bases(self, report: GcReport, dry_run: bool, busy: set[str]) -> None:
        """RBD snapshots kept as the diff base of a backup this catalogue no longer knows
        (deleted, pruned): they would hold their data for ever. The next backup of the
        volume compares hashes instead, and says so."""
        with self.ctx.sessions() as s:
            known = set(s.scalars(select(BackupEntry.backup_id)))
            rows = s.execute(
                select(Volume.name, Volume.pool, Volume.id, Snapshot.name)
                .join(Snapshot, Snapshot.volume_id == Volume.id)
                .where(
                    Volume.status != VolumeStatus.DELETED,
                    Snapshot.status == SnapshotStatus.AVAILABLE,
                    Snapshot.name.startswith(cap.DIFF_BASE_NAME),
                    Snapshot.storage_name.startswith(cap.DIFF_BASE_STORAGE),
                )
            ).all()
        for vol_name, pool, vol_id, snap_name in rows:
            backup_id = snap_name.removeprefix(cap.DIFF_BASE_NAME)
            if backup_id in known or backup_id in busy or vol_id in busy:
                continue
            ref = SnapshotRef(vol_name, snap_name)
            self._orphan(
                report,
                dry_run,
                f"{pool}/{ref}",
                "diff base of a backup this catalogue does not know",
                partial(SnapshotService(self.ctx).delete, ref, pool),
            )

    def _orphans(self, report: GcReport, dry_run: bool) -> None:
        busy = self._in_flight()
        self._orphan_boot_files(report, dry_run, busy)
        with self.ctx.sessions() as s:
            known = {
                (v.pool, v.storage_name): v
                for v in s.scalars(select(Volume).where(Volume.status != VolumeStatus.DELETED))
            }
            snaps = {
                (sn.volume_id, sn.storage_name)
                for sn in s.scalars(
                    select(Snapshot).where(Snapshot.status != SnapshotStatus.DELETED)
                )
            }
            busy |= {v.id for v in known.values()} & busy
        self._orphan_trackers(report, dry_run, busy, list(known.values()))
        self._orphan_diff_bases(report, dry_run, busy)
        for pool_name in self.ctx.settings.pools:
            self._orphans_in_pool(report, dry_run, pool_name, known, snaps, busy)

    def _orphans_in_pool(
        self,
        report: GcReport,
        dry_run: bool,
        pool_name: str,
        known: dict[tuple[str, str], Volume],
        snaps: set[tuple[str, str]],
        busy: set[str],
    ) -> None:
        """Volumes, snapshots and debris of one pool that no catalogue entry explains;
        catalogued volumes whose storage is missing are reported, not touched."""
        driver = self.ctx.pool(pool_name)
        for storage in driver.list_volumes():
            vol = known.get((pool_name, storage))
            if vol is None:
                if storage not in busy:
                    self._orphan(
                        report,
                        dry_run,
                        f"{pool_name}/{storage}",
                        "volume no catalogue entry explains",
                        partial(driver.delete_volume, storage),
                    )
                continue
            for snap in driver.list_snapshots(storage):
                if (vol.id, snap.name) not in snaps and snap.name not in busy:
                    self._orphan(
                        report,
                        dry_run,
                        f"{pool_name}/{storage}@{snap.name}",
                        "snapshot no catalogue entry explains",
                        partial(drop_snapshot, driver, storage, snap.name),
                    )
        for item in driver.find_debris():
            self._orphan(
                report, dry_run, item.path, item.reason, partial(driver.remove_debris, item)
            )
        present = set(driver.list_volumes()) | {e.name for e in driver.trash()}
        for (pool, storage), vol in known.items():
            if (
                pool == pool_name
                and storage not in present
                and vol.id not in busy
                and vol.status != VolumeStatus.CREATING
            ):
                report.problems.append(
                    f"volume {pool}/{vol.name} is catalogued but its storage {storage} is missing"
                )

    def _orphan(
        self, report: GcReport, dry_run: bool, what: str, reason: str, remove: Callable[[], object]
    ) -> None:
        if dry_run:
            report.debris.append(f"{what}: {reason}")
            return
        try:
            remove()
            report.debris.append(f"removed {what}: {reason}")
        except (Busy, NotFound):
            pass  # in use by a running operation, or gone meanwhile
        except SnapbackError as exc:
            report.problems.append(f"cannot remove {what}: {exc}")
