"""The ``local`` pool: each volume is a folder holding a chain of qcow2 layers.

The writable *head* layer is backed by read-only layers; each snapshot is the
layer that was the head when it was taken. A clone's bottom layer is backed by
its parent snapshot's layer in another volume (or pool). docs/local-pool.md
explains the choice.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from snapback.domain.errors import Conflict, HasDependents, InvalidInput, NotFound, StorageError
from snapback.domain.models import DiskFormat, ParentRef, SnapshotInfo, VolumeInfo
from snapback.domain.names import validate_name
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.imagefmt.inspector import InspectedImage
from snapback.drivers.storage.base import (
    Attachment,
    BlockHandle,
    CreateOptions,
    Debris,
    ProgressFn,
    StoragePool,
    TakeSnapshot,
)
from snapback.drivers.storage.local import direct, fresh, layers, snapshots, tracking
from snapback.drivers.storage.local.layers import new_layer_id
from snapback.drivers.storage.local.meta import (
    LOCK,
    META,
    VolumeMeta,
    flock,
    load,
    save,
)
from snapback.drivers.storage.nbd import NbdHandle


class LocalPool(StoragePool):
    driver = "local"

    def __init__(self, root: Path | str, name: str, *, lock_timeout: float = 30.0) -> None:
        self.root = Path(root)
        self.name = validate_name(name, "pool name")
        self.dir = self.root / self.name
        self.lock_timeout = lock_timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)

    # -- paths and locks -------------------------------------------------
    def vdir(self, volume: str) -> Path:
        return self.dir / validate_name(volume, "volume name")

    def layer_path(self, volume: str, layer: str) -> Path:
        return self.vdir(volume) / f"{layer}.qcow2"

    def sibling(self, pool: str) -> LocalPool:
        return self if pool == self.name else LocalPool(self.root, pool)

    def meta_lock(self) -> contextlib.AbstractContextManager[None]:
        """Serialises metadata changes across every local pool under one root."""
        return flock(self.root / LOCK, timeout=None, what="local pool metadata")

    @contextlib.contextmanager
    def locked(self, volume: str, timeout: float | None = None) -> Iterator[VolumeMeta]:
        """Hold a volume's operation lock and yield its current metadata."""
        self.load(volume)
        wait = self.lock_timeout if timeout is None else timeout
        with flock(self.vdir(volume) / LOCK, timeout=wait, what=f"volume {self.name}/{volume}"):
            yield self.load(volume)

    def load(self, volume: str) -> VolumeMeta:
        vdir = self.vdir(volume)
        if not (vdir / META).is_file():
            raise NotFound(f"volume {self.name}/{volume} does not exist")
        return load(vdir)

    def save(self, meta: VolumeMeta) -> None:
        save(self.vdir(meta.name), meta)

    def backing_of(self, meta: VolumeMeta, layer: str) -> str | None:
        """The backing-file string (relative) for ``layer``: the layer below it, if any."""
        base = meta.layers[layer]
        if base is not None:
            return f"{base}.qcow2"
        if meta.parent is not None:
            p = meta.parent
            parent_meta = self.sibling(p.pool).load(p.volume)
            return f"../../{p.pool}/{p.volume}/{parent_meta.snapshots[p.snapshot].layer}.qcow2"
        return None

    # -- volumes ---------------------------------------------------------
    def create_volume(
        self, name: str, size: int, options: CreateOptions | None = None
    ) -> VolumeInfo:
        if options is not None and not options.is_default():
            raise InvalidInput("local pools have no object size or striping settings")
        with self.meta_lock():
            vdir = self._reserve(name)
            with _undo_reserve(vdir):
                layer = new_layer_id()
                qemu_img.create(str(vdir / f"{layer}.qcow2"), size)
                meta = VolumeMeta(name=name, head=layer, size=size, layers={layer: None})
                self.save(meta)
        return self.volume_info(name)

    def _reserve(self, name: str) -> Path:
        vdir = self.vdir(name)
        if (vdir / META).exists():
            raise Conflict(f"volume {self.name}/{name} already exists")
        if vdir.exists():
            raise Conflict(f"{vdir} is left over from an unfinished operation; run 'snapback gc'")
        vdir.mkdir(mode=0o755)
        return vdir

    def volume_info(self, name: str) -> VolumeInfo:
        meta = self.load(name)
        allocated = 0
        for layer in meta.layers:
            with contextlib.suppress(FileNotFoundError):
                allocated += self.layer_path(name, layer).stat().st_blocks * 512
        parent = None
        if meta.parent:
            parent = ParentRef(meta.parent.pool, meta.parent.volume, meta.parent.snapshot)
        return VolumeInfo(name=name, size=meta.size, allocated=allocated, parent=parent)

    def list_volumes(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if (p / META).is_file())

    def resize_volume(self, name: str, size: int, *, allow_shrink: bool = False) -> VolumeInfo:
        with self.locked(name) as meta:
            if size < meta.size and not allow_shrink:
                raise InvalidInput(
                    f"shrinking {self.name}/{name} from {meta.size} to {size} bytes loses the data "
                    "past the new end; pass --allow-shrink to do it anyway"
                )
            qemu_img.resize(str(self.layer_path(name, meta.head)), size, shrink=size < meta.size)
            meta.size = size
            with self.meta_lock():
                self.save(meta)
        return self.volume_info(name)

    def delete_volume(self, name: str) -> None:
        with self.locked(name) as meta, self.meta_lock():
            protected = [f"{name}@{s}" for s, m in meta.snapshots.items() if m.protected]
            clones = [c for s in meta.snapshots for c in self.children(name, s)]
            if clones:
                raise HasDependents(f"volume {self.name}/{name} has snapshots with clones", clones)
            if protected:
                raise HasDependents(
                    f"volume {self.name}/{name} has protected snapshots; unprotect them first",
                    protected,
                )
            vdir = self.vdir(name)
            (vdir / META).unlink()  # from here on the volume is gone; the rest is debris
            layers.remove_tree(vdir)

    def import_volume(
        self,
        name: str,
        source: str,
        image: InspectedImage,
        progress: ProgressFn | None = None,
        *,
        consume: bool = False,
    ) -> VolumeInfo:
        with self.meta_lock():
            vdir = self._reserve(name)
        with _undo_reserve(vdir), flock(vdir / LOCK, timeout=0, what=f"volume {self.name}/{name}"):
            layer = new_layer_id()
            dest = vdir / f"{layer}.qcow2"
            if not (consume and image.format is DiskFormat.QCOW2 and _move(source, dest)):
                qemu_img.convert(
                    source,
                    image.format.value,
                    str(dest),
                    "qcow2",
                    progress=progress,
                    total=image.virtual_size,
                )
            with self.meta_lock():
                self.save(
                    VolumeMeta(name=name, head=layer, size=image.virtual_size, layers={layer: None})
                )
        return self.volume_info(name)

    def export_volume(
        self,
        name: str,
        dest: str,
        fmt: DiskFormat,
        *,
        snapshot: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        with self.locked(name) as meta:
            layer = snapshots.lookup(self, meta, snapshot).layer if snapshot else meta.head
            size = meta.snapshots[snapshot].size if snapshot else meta.size
            layers.export_file(
                str(self.layer_path(name, layer)), dest, fmt, progress=progress, total=size
            )

    def open(
        self, name: str, *, snapshot: str | None = None, read_only: bool = False
    ) -> BlockHandle:
        with contextlib.ExitStack() as stack:  # the lock goes with the handle, or on error
            meta = stack.enter_context(self.locked(name))
            layer = snapshots.lookup(self, meta, snapshot).layer if snapshot else meta.head
            path = str(self.layer_path(name, layer))
            if read_only or snapshot is not None:  # nothing writes these files meanwhile
                handle = direct.open_read_only(path)
            else:
                handle = NbdHandle(path, read_only=False)
            return layers.LockedHandle(handle, stack.pop_all())

    def open_new(self, name: str) -> BlockHandle:
        """The new volume's only layer is written by ``fresh.FreshQcow2``, not by
        qemu-nbd; a volume with snapshots or data is refused."""
        with contextlib.ExitStack() as stack:
            meta = stack.enter_context(self.locked(name))
            path = str(self.layer_path(name, meta.head))
            if (
                meta.snapshots
                or len(meta.layers) != 1
                or any(e.data for e in qemu_img.map_extents(path, "qcow2"))
            ):
                raise Conflict(f"volume {self.name}/{name} is not new and empty")
            handle = fresh.FreshQcow2(path, meta.size)
            return layers.LockedHandle(handle, stack.pop_all())

    def allocated_extents(self, volume: str, snapshot: str | None) -> list[tuple[int, int]]:
        with self.locked(volume) as meta:
            layer = snapshots.lookup(self, meta, snapshot).layer if snapshot else meta.head
            extents = qemu_img.map_extents(str(self.layer_path(volume, layer)), "qcow2")
        return [(e.start, e.length) for e in extents if e.data]

    # -- change tracking (local/tracking.py) ------------------------------
    tracks_changes_by = "bitmap"

    def start_tracking(self, volume: str, name: str) -> None:
        with self.locked(volume) as meta:
            tracking.start(self.layer_path(volume, meta.head), name)

    def open_tracking(self, volume: str, name: str, *, drop: Sequence[str] = ()) -> BlockHandle:
        with contextlib.ExitStack() as stack:  # the lock goes with the handle, or on error
            meta = stack.enter_context(self.locked(volume))
            head = self.layer_path(volume, meta.head)
            handle = tracking.open_tracking(head, name, stack, drop=drop)
            return layers.LockedHandle(handle, stack.pop_all())  # closes, waits, unlocks

    def tracked_changes(self, volume: str, name: str) -> list[tuple[int, int]] | None:
        with self.locked(volume) as meta:
            return tracking.changes(self, meta, name)

    def stop_tracking(self, volume: str, name: str) -> None:
        with self.locked(volume) as meta:
            tracking.stop(self.layer_path(volume, meta.head), name)

    def trackers(self, volume: str) -> list[str]:
        with self.locked(volume, timeout=0) as meta:
            return tracking.names(self.layer_path(volume, meta.head))

    def attachment(self, name: str) -> Attachment:
        return Attachment("file", str(self.layer_path(name, self.load(name).head)), "qcow2")

    # -- snapshots and clones (local/snapshots.py) -----------------------
    def prepare_snapshot(
        self, volume: str, snapshot: str, *, protect: bool = False
    ) -> contextlib.AbstractContextManager[TakeSnapshot]:
        return snapshots.prepare_snapshot(self, volume, snapshot, protect=protect)

    def snapshot_info(self, volume: str, snapshot: str) -> SnapshotInfo:
        return snapshots.snapshot_info(self, volume, snapshot)

    def list_snapshots(self, volume: str) -> list[SnapshotInfo]:
        return snapshots.list_snapshots(self, volume)

    def rollback_snapshot(self, volume: str, snapshot: str) -> None:
        snapshots.rollback_snapshot(self, volume, snapshot)

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        snapshots.delete_snapshot(self, volume, snapshot)

    def protect_snapshot(self, volume: str, snapshot: str) -> None:
        snapshots.set_protected(self, volume, snapshot, True)

    def unprotect_snapshot(self, volume: str, snapshot: str) -> None:
        snapshots.set_protected(self, volume, snapshot, False)

    def clone(
        self, volume: str, snapshot: str, child_pool: StoragePool, child: str, *, v2: bool = False
    ) -> VolumeInfo:
        if v2:
            raise InvalidInput("local pools clone protected snapshots only (no clone v2)")
        if not isinstance(child_pool, LocalPool) or child_pool.root != self.root:
            raise InvalidInput(
                "a local volume can only be cloned into a local pool of the same root"
            )
        return snapshots.clone(self, volume, snapshot, child_pool, child)

    def children(self, volume: str, snapshot: str) -> list[str]:
        return snapshots.children(self, volume, snapshot)

    def parent(self, volume: str) -> ParentRef | None:
        return self.volume_info(volume).parent

    def flatten(self, volume: str, progress: ProgressFn | None = None) -> None:
        with self.locked(volume) as meta:
            if meta.parent is None:
                raise InvalidInput(f"volume {self.name}/{volume} has no parent; nothing to flatten")
            layers.flatten(self, meta, progress)

    # -- housekeeping ----------------------------------------------------
    def find_debris(self) -> list[Debris]:
        with self.meta_lock():
            return layers.find_debris(self)

    def remove_debris(self, item: Debris) -> None:
        layers.remove_debris(self, item)

    def recover(self) -> list[str]:
        done = []
        for volume in self.list_volumes():
            if self.load(volume).pending is None:
                continue
            with contextlib.suppress(Conflict), self.locked(volume, timeout=0) as meta:
                done += layers.finish_pending(self, meta)
        return done


def _move(source: str, dest: Path) -> bool:
    """Move a self-contained qcow2 of ours into place; False across file systems."""
    try:
        os.rename(source, dest)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise StorageError(f"cannot move {source} into the pool: {exc.strerror}") from exc
    os.chmod(dest, 0o644)
    return True


@contextlib.contextmanager
def _undo_reserve(vdir: Path) -> Iterator[None]:
    """Remove a reserved volume folder when its create or import fails (a kill leaves
    it to ``find_debris``)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):  # the original error matters; gc finds the rest
            layers.remove_tree(vdir)
        raise
