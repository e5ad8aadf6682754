"""Look-ups of catalogue rows by the names users give, shared by the services."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from snapback.catalog.models import Instance, InstanceDisk, Snapshot, Volume
from snapback.domain.errors import Conflict, NotFound
from snapback.domain.models import SnapshotStatus, VolumeStatus
from snapback.domain.names import validate_name

LIVE_VOLUME = (VolumeStatus.CREATING, VolumeStatus.AVAILABLE)


def live_volume(s: Session, pool: str, name: str) -> Volume:
    validate_name(name, "volume name")
    vol = s.scalars(
        select(Volume).where(
            Volume.pool == pool, Volume.name == name, Volume.status.in_(LIVE_VOLUME)
        )
    ).first()
    if vol is None:
        raise NotFound(f"volume {pool}/{name} does not exist")
    return vol


def live_snapshot(s: Session, vol: Volume, name: str) -> Snapshot:
    validate_name(name, "snapshot name")
    snap = s.scalars(
        select(Snapshot).where(
            Snapshot.volume_id == vol.id,
            Snapshot.name == name,
            Snapshot.status == SnapshotStatus.AVAILABLE,
        )
    ).first()
    if snap is None:
        raise NotFound(f"snapshot {vol.pool}/{vol.name}@{name} does not exist")
    return snap


def clones_of(s: Session, snapshot_id: str) -> list[Volume]:
    """Catalogued volumes (live or waiting to be deleted) cloned from a snapshot."""
    return list(
        s.scalars(
            select(Volume)
            .where(Volume.parent_snapshot_id == snapshot_id, Volume.status != VolumeStatus.DELETED)
            .order_by(Volume.name)
        )
    )


def volume_label(vol: Volume) -> str:
    suffix = "" if vol.status in LIVE_VOLUME else f" ({vol.status})"
    return f"{vol.pool}/{vol.name}{suffix}"


def instance_using(s: Session, vol_id: str) -> Instance | None:
    """The live instance a volume is attached to, if any."""
    return s.scalars(
        select(Instance)
        .join(InstanceDisk)
        .where(InstanceDisk.volume_id == vol_id, Instance.status != "deleted")
    ).first()


def ensure_not_running(s: Session, vol: Volume) -> None:
    """Storage changes under a running VM go through libvirt (restore points), not here."""
    inst = instance_using(s, vol.id)
    if inst is not None and inst.status == "active":
        raise Conflict(
            f"volume {vol.pool}/{vol.name} is in use by running instance {inst.name}; "
            "stop the instance first"
        )
