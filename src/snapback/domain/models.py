"""Value objects and states shared by every layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class BootFileFormat(enum.StrEnum):
    """Files an instance boots from directly (glance's kernel and ramdisk images)."""

    AKI = "aki"  # a kernel
    ARI = "ari"  # an initial ramdisk


IMAGE_FORMATS = [f.value for f in DiskFormat] + [f.value for f in BootFileFormat]


class ImageStatus(enum.StrEnum):
    """glance's image lifecycle: queued -> saving -> active; killed when an upload fails."""

    QUEUED = "queued"
    SAVING = "saving"
    ACTIVE = "active"
    KILLED = "killed"
    PENDING_DELETE = "pending_delete"
    DELETED = "deleted"


class VolumeStatus(enum.StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    PENDING_DELETE = "pending_delete"  # deferred: waits in the trash for its dependents
    DELETED = "deleted"


class SnapshotStatus(enum.StrEnum):
    AVAILABLE = "available"
    PENDING_DELETE = "pending_delete"
    DELETED = "deleted"


class OperationStatus(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # failed and cleaned up
    ROLLED_BACK = "rolled_back"  # recovered after a crash by undoing
    RECOVERED = "recovered"  # recovered after a crash by finishing


@dataclass(frozen=True)
class VolumeInfo:
    """What a storage pool says about one of its volumes."""

    name: str
    size: int  # virtual size in bytes
    allocated: int  # bytes actually used on storage (by this volume's own layers)
    parent: ParentRef | None = None  # set for a clone that has not been flattened


@dataclass(frozen=True)
class ParentRef:
    """The snapshot a clone reads through to."""

    pool: str
    volume: str
    snapshot: str

    def __str__(self) -> str:
        return f"{self.pool}/{self.volume}@{self.snapshot}"


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    size: int
    protected: bool
    created_at: float
    children: tuple[str, ...] = field(default_factory=tuple)  # "pool/volume" of clones


@dataclass(frozen=True)
class Progress:
    """A progress report of a long copy."""

    done: int
    total: int
