"""The StoragePool port: what every storage driver offers.

The words follow RBD, whose model is the strictest of our back ends: a volume
has snapshots ``volume@snap``; a protected snapshot cannot be removed; a clone
is a copy-on-write volume whose parent is a protected snapshot (clone v1);
flatten copies the parent's data in and ends the dependency. Drivers know
nothing of the catalogue. Every foreign error leaves a driver as one of
``snapback.domain.errors``, its cause kept.

Names given to a driver are storage names chosen by the services (ids), but a
driver still validates them, since a name must never become a path unchecked.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

from snapback.domain.errors import InvalidInput, NotFound
from snapback.domain.models import DiskFormat, ParentRef, Progress, SnapshotInfo, VolumeInfo
from snapback.drivers.imagefmt.inspector import InspectedImage

# Change trackers (qcow2 dirty bitmaps) that backups own are named this plus the
# backup's id; a pool lists and sweeps only those.
TRACKER_PREFIX = "snapback-"

ProgressFn = Callable[[Progress], None]
TakeSnapshot = Callable[[], None]  # StoragePool.prepare_snapshot's second step


@dataclass(frozen=True)
class Debris:
    """A storage object no volume or snapshot of the pool explains."""

    path: str  # a file path for local, an image or snapshot spec for rbd
    reason: str


@dataclass(frozen=True)
class Attachment:
    """How a hypervisor reaches a volume: ``file`` + path for local, ``network`` for rbd.

    For ``network``: ``source`` is the protocol's name (rbd: ``pool[/namespace]/image``),
    ``hosts`` the monitors as ``(address, port)``.
    """

    type: str
    source: str
    format: str
    protocol: str | None = None
    hosts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class CreateOptions:
    """Layout settings at create (RBD's; a driver without them refuses non-defaults)."""

    object_size: int | None = None
    stripe_unit: int | None = None
    stripe_count: int | None = None

    def is_default(self) -> bool:
        return self.object_size is None and self.stripe_unit is None and self.stripe_count is None


@dataclass(frozen=True)
class TrashEntry:
    id: str
    name: str
    deferred_until: float


class BlockHandle(abc.ABC):
    """Byte access to a volume or a snapshot (read-only for a snapshot)."""

    parallel_writes = False  # True: write() may be called from several threads at once
    parallel_reads = False  # True: read() and read_into() may be, too

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` from ``offset`` (a handle that can, reads straight into it)."""
        buf[:] = self.read(offset, len(buf))

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...

    def write_view(self, offset: int, data: memoryview) -> None:
        """``write`` from a buffer the caller reuses once this returns (a handle that
        can, writes straight from it)."""
        self.write(offset, data.tobytes())

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoragePool(abc.ABC):
    """One pool of volumes served by one driver."""

    driver: str
    name: str
    supports_clone_v2 = False
    supports_trash = False
    layouts = False  # object size and striping at create (RBD)

    # -- volumes ---------------------------------------------------------
    @abc.abstractmethod
    def create_volume(
        self, name: str, size: int, options: CreateOptions | None = None
    ) -> VolumeInfo:
        """Create a thin volume of ``size`` bytes; Conflict if the name exists."""

    @abc.abstractmethod
    def volume_info(self, name: str) -> VolumeInfo: ...

    @abc.abstractmethod
    def list_volumes(self) -> list[str]: ...

    @abc.abstractmethod
    def resize_volume(self, name: str, size: int, *, allow_shrink: bool = False) -> VolumeInfo:
        """Grow (or, with ``allow_shrink``, shrink) a volume."""

    @abc.abstractmethod
    def delete_volume(self, name: str) -> None:
        """Remove a volume with its unprotected snapshots.

        HasDependents when a snapshot is protected or has clones: the message
        names them and nothing is removed.
        """

    @abc.abstractmethod
    def import_volume(
        self,
        name: str,
        source: str,
        image: InspectedImage,
        progress: ProgressFn | None = None,
        *,
        consume: bool = False,
    ) -> VolumeInfo:
        """Create a volume from a file that ``inspect()`` has passed (``image``).

        ``consume``: the caller hands the file over (a temporary file of ours);
        a driver may move it into place instead of copying it.
        """

    @abc.abstractmethod
    def export_volume(
        self,
        name: str,
        dest: str,
        fmt: DiskFormat,
        *,
        snapshot: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Write the volume (or one of its snapshots) to a new file ``dest``."""

    @abc.abstractmethod
    def open(
        self, name: str, *, snapshot: str | None = None, read_only: bool = False
    ) -> BlockHandle:
        """Byte access to a volume (read-write unless ``read_only``) or a snapshot
        (always read-only)."""

    def open_new(self, name: str) -> BlockHandle:
        """Write access to a volume just created and never written (a restore fills
        it): a driver may write it by its own means, faster than ``open``. Reads
        see what was written through the handle; the content is whole once it has
        closed without error."""
        return self.open(name)

    @abc.abstractmethod
    def attachment(self, name: str) -> Attachment:
        """Where a VM reads and writes the volume now (changes when the volume changes)."""

    # -- snapshots -------------------------------------------------------
    @abc.abstractmethod
    def prepare_snapshot(
        self, volume: str, snapshot: str, *, protect: bool = False
    ) -> contextlib.AbstractContextManager[TakeSnapshot]:
        """A snapshot in two steps, so that several (of one or more pools) can be
        taken inside one short hold of a guest. Entering opens or locks the volume
        and checks the name: Conflict when it is taken, before anything is held. The
        callable it gives takes the snapshot (call it once), and nothing else.
        Leaving protects it when ``protect`` and no error came after the call, then
        closes. Left without the call, nothing is made and the name stays free."""

    @abc.abstractmethod
    def snapshot_info(self, volume: str, snapshot: str) -> SnapshotInfo:
        """One snapshot of the volume; NotFound when it has none of that name."""

    def create_snapshot(
        self,
        volume: str,
        snapshot: str,
        *,
        protect: bool = False,
        around: contextlib.AbstractContextManager[object] | None = None,
    ) -> SnapshotInfo:
        """Take snapshot ``snapshot`` of the volume; Conflict when the name is taken.

        ``protect``: protected at once, in the same step where the storage can.
        ``around``: entered just before the storage takes the snapshot and left
        just after, so a guest frozen by it stays frozen for that moment only, not
        while the volume is opened, closed or looked up; an error on entering it
        takes no snapshot."""
        hold = around if around is not None else contextlib.nullcontext()
        with self.prepare_snapshot(volume, snapshot, protect=protect) as take, hold:
            take()
        return self.snapshot_info(volume, snapshot)

    @abc.abstractmethod
    def list_snapshots(self, volume: str) -> list[SnapshotInfo]: ...

    @abc.abstractmethod
    def rollback_snapshot(self, volume: str, snapshot: str) -> None:
        """Make the volume read exactly what it held when the snapshot was taken."""

    @abc.abstractmethod
    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        """Remove a snapshot; HasDependents when protected. Data later
        snapshots or clones read is kept."""

    @abc.abstractmethod
    def protect_snapshot(self, volume: str, snapshot: str) -> None: ...

    @abc.abstractmethod
    def unprotect_snapshot(self, volume: str, snapshot: str) -> None:
        """HasDependents (naming the clones) when the snapshot has clones."""

    # -- clones ----------------------------------------------------------
    @abc.abstractmethod
    def clone(
        self, volume: str, snapshot: str, child_pool: StoragePool, child: str, *, v2: bool = False
    ) -> VolumeInfo:
        """Create ``child`` in ``child_pool`` as a copy-on-write clone of a snapshot.

        v1 (default): the snapshot must be protected (InvalidInput otherwise).
        v2 (``supports_clone_v2``): no protection needed; removing the snapshot
        keeps it hidden until its last clone goes.
        """

    @abc.abstractmethod
    def children(self, volume: str, snapshot: str) -> list[str]:
        """Clones of a snapshot, as ``pool/volume``."""

    @abc.abstractmethod
    def parent(self, volume: str) -> ParentRef | None: ...

    @abc.abstractmethod
    def flatten(self, volume: str, progress: ProgressFn | None = None) -> None:
        """Copy the parent's data into a clone so it no longer depends on it."""

    def layout(self, name: str) -> CreateOptions | None:
        return None

    # -- deferred deletion and change tracking (optional) ----------------
    def trash_volume(self, name: str, delay: int) -> None:
        """Move a volume to the pool's trash, removable after ``delay`` seconds."""
        raise InvalidInput(f"pool {self.name} ({self.driver}) has no trash")

    def empty_trash(self, *, expired_only: bool = True) -> list[str]:
        """Remove trashed volumes (expired ones only by default); what was removed."""
        return []

    def trash(self) -> list[TrashEntry]:
        return []

    def allocated_extents(self, volume: str, snapshot: str) -> list[tuple[int, int]]:
        """(offset, length) ranges of a snapshot that may hold data (parents included);
        the rest reads as zeroes. Default: everything."""
        for snap in self.list_snapshots(volume):
            if snap.name == snapshot:
                return [(0, snap.size)]
        raise NotFound(f"snapshot {self.name}/{volume}@{snapshot} does not exist")

    def changed_extents(
        self, volume: str, snapshot: str, since: str | None
    ) -> list[tuple[int, int, bool]]:
        """Extents of ``snapshot`` that differ from ``since`` (None: allocated ones):
        (offset, length, holds data)."""
        raise InvalidInput(f"pool {self.name} ({self.driver}) does not track changes")

    # -- change tracking between backups (docs/backups.md) -------------------
    #: how the pool tells what changed since a backup: "snapshot" (keep the backup's
    #: snapshot and diff against it: RBD) or "bitmap" (a persistent dirty bitmap on
    #: the volume itself, started when the backup reads it: local qcow2)
    tracks_changes_by = "snapshot"

    def start_tracking(self, volume: str, name: str) -> None:
        """Start recording the ranges written to ``volume`` from now on, as ``name``."""
        raise InvalidInput(f"pool {self.name} ({self.driver}) has no dirty bitmaps")

    def open_tracking(self, volume: str, name: str, *, drop: Sequence[str] = ()) -> BlockHandle:
        """``volume`` read-only as it is now, with ``start_tracking(volume, name)`` at
        that same point (and ``stop_tracking`` of each of ``drop``): a backup's point in
        time on a volume nothing else writes. The volume stays locked until the handle
        closes; a driver may do the tracking while the handle is read, and then the
        close waits for it and raises its error."""
        self.start_tracking(volume, name)
        for old in drop:
            self.stop_tracking(volume, old)
        return self.open(volume, read_only=True)

    def tracked_changes(self, volume: str, name: str) -> list[tuple[int, int]] | None:
        """(offset, length) ranges written since ``start_tracking(volume, name)``, or
        None when that record is lost (never started, inconsistent after a crash,
        cut by a rollback)."""
        return None

    def stop_tracking(self, volume: str, name: str) -> None:
        """Forget the record ``name`` (nothing to do when it is gone)."""
        return None

    def trackers(self, volume: str) -> list[str]:
        """The records of changes ``volume`` carries now (gc looks for forgotten ones);
        Busy while another operation holds the volume."""
        return []

    # -- housekeeping ----------------------------------------------------
    @abc.abstractmethod
    def find_debris(self) -> list[Debris]:
        """Storage objects no volume or snapshot explains (left by a crash)."""

    @abc.abstractmethod
    def remove_debris(self, item: Debris) -> None: ...

    @abc.abstractmethod
    def recover(self) -> list[str]:
        """Finish or undo the driver's own half-done steps; return what was done."""
