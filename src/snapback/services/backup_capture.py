"""One disk of a backup: its point in time, what changed since the parent, and
how change tracking carries on (docs/backups.md, "Change tracking").

- RBD (``tracks_changes_by == "snapshot"``): the backup reads a snapshot it takes;
  the snapshot is kept as the next backup's diff base (``rbd diff``), and the
  one it replaces is dropped once the record is written (as cinder-backup does).
- local qcow2 (``"bitmap"``): the volume is not in use (its instance is stopped
  and snapback holds its lock), so the backup reads the head itself and starts a
  persistent dirty bitmap ``snapback-<backup id>`` on it at that moment (while
  it reads: nothing writes in between); the next backup reads the ranges it
  marks, and drops it — an instance's backup once its record is written, a
  volume's while the backup after it reads (``keeps_parent_tracker``).

When the base is gone (snapshot deleted, bitmap missing or stored uncleanly
after a crash) the backup compares chunk hashes with the parent's index, says
so in the record's ``note``, and tracking starts again from this backup.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from snapback.catalog.models import Snapshot, Volume
from snapback.domain.errors import NotFound
from snapback.domain.models import SnapshotStatus
from snapback.drivers.storage.base import TRACKER_PREFIX, BlockHandle, StoragePool, TakeSnapshot
from snapback.services.context import Context

# A backup of an RBD volume keeps its snapshot as the next one's diff base, catalogued
# as the snapshot ``backup-<backup id>`` (storage name ``b-…``; a user's are ``s-…``).
DIFF_BASE_NAME, DIFF_BASE_STORAGE = "backup-", "b-"
LOST = {
    "snapshot": "the last backup's snapshot is gone",
    "bitmap": "the volume's dirty bitmap for the last backup is missing or was not stored cleanly",
}


@dataclass
class DiskPlan:
    """What one disk's backup does; journaled, so a recovery can undo or finish it."""

    target: str
    volume_id: str
    volume: str
    pool: str
    storage: str
    parent: str | None  # the parent backup's id when it has this disk
    parent_index: str | None
    by: str  # "snapshot" | "bitmap" | "checkpoint" (a libvirt backup job's)
    snap: str | None = None  # snapshot read (and kept) by this backup: RBD
    since: str | None = None  # the parent's kept snapshot (or the old chain's): RBD
    tracker: str | None = None  # bitmap started by this backup: local
    parent_tracker: str | None = None
    # bitmaps of no more use: dropped while this backup reads (a volume's chain), or
    # once its record is written, through libvirt (an instance's: keeps_parent_tracker)
    stale: list[str] = field(default_factory=list)
    tracking: str = "none"
    note: str | None = None
    domain: str | None = None  # the instance's libvirt domain, for its checkpoints

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DiskPlan:
        return cls(**doc)


def plan_disk(
    driver: StoragePool,
    vol: Volume,
    target: str,
    backup_id: str,
    parent: dict[str, Any] | None,
    *,
    domain: str | None = None,
    live: bool = False,
    replaces: dict[str, Any] | None = None,
) -> DiskPlan:
    """Name this backup's point in time and find the base of the parent's, if any
    (``live``: a running guest's, whose local disks a libvirt backup job reads;
    ``replaces``: the newest backup of the source, when this one is a full backup
    that starts a new chain)."""
    by = driver.tracks_changes_by
    if live and by == "bitmap":
        by = "checkpoint"
    mine = _parent_disk(parent, vol.id, target)
    plan = DiskPlan(
        target=target,
        volume_id=vol.id,
        volume=vol.name,
        pool=vol.pool,
        storage=vol.storage_name,
        parent=str(parent["id"]) if parent is not None and mine is not None else None,
        parent_index=str(mine["index"]) if mine is not None else None,
        by=by,
        domain=domain,
    )
    if by == "snapshot":
        plan.snap = DIFF_BASE_STORAGE + uuid.uuid4().hex[:20]
    else:
        plan.tracker = TRACKER_PREFIX + backup_id
    if mine is not None and parent is not None:
        _follow(driver, plan, parent, mine)
    elif replaces is not None:
        _replace(driver, plan, replaces)
    return plan


def _follow(
    driver: StoragePool, plan: DiskPlan, parent: dict[str, Any], mine: dict[str, Any]
) -> None:
    """The base the parent kept for this disk: its snapshot or its bitmap."""
    if plan.by == "snapshot":
        plan.since = _kept_snapshot(driver, plan, parent, mine)
        if plan.since is not None:
            plan.tracking = "rbd-diff"
        return
    plan.parent_tracker = TRACKER_PREFIX + str(parent["id"])
    plan.tracking = "dirty-bitmap"
    if keeps_parent_tracker(plan) and parent.get("parent"):
        plan.stale.append(TRACKER_PREFIX + str(parent["parent"]))


def _replace(driver: StoragePool, plan: DiskPlan, old: dict[str, Any]) -> None:
    """A full backup starts a new chain: no backup will follow the old one's base, which
    goes like a parent's: bitmaps as this one reads, the RBD snapshot once the record
    is written (``since``, never read: a full backup has no parent)."""
    if keeps_parent_tracker(plan):
        plan.stale = [TRACKER_PREFIX + str(old[k]) for k in ("id", "parent") if old.get(k)]
        return
    if plan.tracker is not None:  # an instance's disk: its old chain keeps one checkpoint
        plan.stale = [TRACKER_PREFIX + str(old["id"])]
        return
    disk = _parent_disk(old, plan.volume_id, plan.target)
    if plan.by == "snapshot" and disk is not None:
        plan.since = _kept_snapshot(driver, plan, old, disk)


def _kept_snapshot(
    driver: StoragePool, plan: DiskPlan, record: dict[str, Any], disk: dict[str, Any]
) -> str | None:
    """The snapshot ``record`` kept of this disk as the next diff base, if still there."""
    kept = disk.get("snapshot") or record.get("source_snapshot")
    if kept and any(s.name == kept for s in driver.list_snapshots(plan.storage)):
        return str(kept)
    return None


def keeps_parent_tracker(plan: DiskPlan) -> bool:
    """A stopped volume's chain keeps its parent's bitmap after the record is written
    (the next backup drops it while it reads; at once if it is lost): no ``qemu-img``
    after the record, and a backup deleted later leaves the one before it still
    tracked. An instance's chain drops it once the record is written, through
    libvirt, which may know it as a checkpoint."""
    return plan.by == "bitmap" and plan.domain is None


def _parent_disk(
    parent: dict[str, Any] | None, volume_id: str, target: str
) -> dict[str, Any] | None:
    if parent is None:
        return None
    disks: list[dict[str, Any]] = parent.get("disks", [])
    for d in disks:
        if d.get("volume_id") == volume_id:
            return d
    legacy = parent.get("source", {}).get("volume_id") == volume_id and len(disks) == 1
    return disks[0] if legacy else None


def lost(plan: DiskPlan) -> None:
    gone = plan.parent_tracker
    if gone is not None and keeps_parent_tracker(plan) and gone not in plan.stale:
        plan.stale.append(gone)  # of no more use: dropped as this one reads
    plan.tracking = "hash-compare"
    plan.note = (
        f"change tracking lost ({LOST[plan.by]}): compared chunk hashes; "
        "tracking starts again from this backup"
    )


def changes(driver: StoragePool, plan: DiskPlan) -> list[tuple[int, int]] | None:
    """Ranges changed since the parent (call at the point in time); None: read all
    allocated ranges (a full backup, or the hash-compare fallback)."""
    if plan.parent is None:
        return None
    if plan.by == "snapshot":
        if plan.since is None:
            lost(plan)
            return None
        assert plan.snap is not None
        return [(o, n) for o, n, _ in driver.changed_extents(plan.storage, plan.snap, plan.since)]
    assert plan.parent_tracker is not None
    found = driver.tracked_changes(plan.storage, plan.parent_tracker)
    if found is None:
        lost(plan)
    return found


@contextlib.contextmanager
def prepare_point(driver: StoragePool, plan: DiskPlan) -> Iterator[TakeSnapshot]:
    """The disk's point in time in two steps (``StoragePool.prepare_snapshot``): a
    snapshot, its volume opened and the name checked on entering, taken by the
    callable. A stopped local disk has nothing to take here: nothing writes it while
    the backup holds its lock, and its bitmap starts when it is opened (open_point)."""
    if plan.snap is not None:
        with driver.prepare_snapshot(plan.storage, plan.snap) as take:
            yield take
        return
    yield lambda: None


def open_point(driver: StoragePool, plan: DiskPlan) -> BlockHandle:
    """The disk at its point in time: the backup's snapshot, or the stopped volume
    itself with this backup's bitmap started on it as it is read."""
    if plan.snap is not None:
        return driver.open(plan.storage, snapshot=plan.snap)
    assert plan.tracker is not None
    drop = plan.stale if keeps_parent_tracker(plan) else []
    return driver.open_tracking(plan.storage, plan.tracker, drop=drop)


def point_size(driver: StoragePool, plan: DiskPlan) -> int:
    if plan.snap is not None:
        return next(s.size for s in driver.list_snapshots(plan.storage) if s.name == plan.snap)
    return driver.volume_info(plan.storage).size


def allocated(driver: StoragePool, plan: DiskPlan) -> list[tuple[int, int]]:
    return driver.allocated_extents(plan.storage, plan.snap)  # type: ignore[arg-type]


def undo(ctx: Context, plan: DiskPlan) -> None:
    """No record was written: drop this backup's snapshot or bitmap."""
    driver = ctx.pool(plan.pool)
    if not _volume_alive(ctx, plan.volume_id):
        return
    if plan.snap and any(x.name == plan.snap for x in driver.list_snapshots(plan.storage)):
        driver.delete_snapshot(plan.storage, plan.snap)
    if plan.tracker and plan.by == "checkpoint":
        _drop_checkpoint(ctx, plan, plan.tracker)
    elif plan.tracker:
        driver.stop_tracking(plan.storage, plan.tracker)


def _drop_checkpoint(ctx: Context, plan: DiskPlan, name: str) -> None:
    """Remove a checkpoint with its bitmaps through libvirt; when libvirt cannot (the
    domain is gone or will not), its metadata and the bitmap one by one."""
    from snapback.drivers.hypervisor import backup_job
    from snapback.drivers.hypervisor.libvirt_driver import DomainState, HypervisorError

    hv = ctx.hypervisor
    if plan.domain:
        with contextlib.suppress(HypervisorError, NotFound):
            backup_job.delete_checkpoint(hv, plan.domain, name)
        with contextlib.suppress(HypervisorError, NotFound):
            backup_job.delete_checkpoint(hv, plan.domain, name, metadata_only=True)
        if hv.state(plan.domain) in (DomainState.RUNNING, DomainState.PAUSED):
            return  # QEMU holds the file; libvirt removed what it knew of
    ctx.pool(plan.pool).stop_tracking(plan.storage, name)


def finish(ctx: Context, plan: DiskPlan, backup_id: str) -> None:
    """The record is written: keep this backup's base; drop the parent's (an RBD
    snapshot, an instance's checkpoint: a volume's bitmap goes in its next backup)."""
    if not _volume_alive(ctx, plan.volume_id):
        return
    if plan.snap is not None:
        _rotate_snapshots(ctx, plan, backup_id)
    if plan.domain and plan.tracker is not None:  # an instance's local disk: libvirt may
        for old in [plan.parent_tracker, *plan.stale]:  # know them as checkpoints
            if old is not None:
                _drop_checkpoint(ctx, plan, old)


def _volume_alive(ctx: Context, vol_id: str) -> bool:
    with ctx.sessions() as s:
        vol = s.get(Volume, vol_id)
        return vol is not None and vol.status != "deleted"


def _rotate_snapshots(ctx: Context, plan: DiskPlan, backup_id: str) -> None:
    """Catalogue the kept snapshot (so gc explains it); drop the one it replaces."""
    assert plan.snap is not None
    with ctx.transaction() as s:
        vol = s.get(Volume, plan.volume_id)
        assert vol is not None
        if not any(x.storage_name == plan.snap and x.status == "available" for x in vol.snapshots):
            name = DIFF_BASE_NAME + backup_id
            s.add(Snapshot(volume_id=vol.id, name=name, storage_name=plan.snap,
                           status=SnapshotStatus.AVAILABLE))  # fmt: skip
        for row in vol.snapshots:
            if plan.since and row.storage_name == plan.since:
                row.status = SnapshotStatus.DELETED
    if plan.since:
        driver = ctx.pool(plan.pool)
        if any(x.name == plan.since for x in driver.list_snapshots(plan.storage)):
            driver.delete_snapshot(plan.storage, plan.since)
