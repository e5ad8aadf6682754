"""The ``rbd`` pool driver: volumes are RBD images in one RADOS pool (and namespace).

Everything the StoragePool port names is native here: thin images with their
own layout (object size, striping), snapshots, protection, clone v1 (from a
protected snapshot) and v2 (no protection; a removed parent snapshot waits in
the trash namespace until its last clone goes), flatten, children across
pools and namespaces, the trash with an expiry, and ``diff_iterate``.

A snapback pool maps to ``(rados pool, namespace)``; ``labels`` turns another
RBD location into the name of the snapback pool that serves it, so parents and
children read ``pool/volume`` like everywhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from snapback.domain.errors import HasDependents, InvalidInput
from snapback.domain.models import DiskFormat, ParentRef, SnapshotInfo, VolumeInfo
from snapback.domain.names import validate_name
from snapback.drivers.imagefmt.inspector import InspectedImage
from snapback.drivers.storage.base import (
    Attachment,
    BlockHandle,
    CreateOptions,
    Debris,
    ProgressFn,
    StoragePool,
    TakeSnapshot,
    TrashEntry,
)
from snapback.drivers.storage.rbd import access, closing, housekeeping, snapshots
from snapback.drivers.storage.rbd.cluster import bindings, cluster, translated
from snapback.drivers.storage.rbd.handle import RbdHandle
from snapback.drivers.storage.rbd.housekeeping import IMPORT_SUFFIX

LabelFn = Callable[[str, str], str | None]  # (rados pool, namespace) -> snapback pool


class RbdPool(StoragePool):
    driver = "rbd"
    supports_clone_v2 = True
    supports_trash = True
    layouts = True

    def __init__(
        self,
        name: str,
        *,
        conffile: str,
        rados_pool: str | None = None,
        namespace: str = "",
        labels: LabelFn | None = None,
    ) -> None:
        self.name = validate_name(name, "pool name")
        self.conffile = conffile
        self.rados_pool = rados_pool or name
        self.namespace = namespace
        self._labels = labels
        self._ioctx: Any = None

    # -- plumbing ----------------------------------------------------------------
    @property
    def where(self) -> str:
        ns = f"/{self.namespace}" if self.namespace else ""
        return f"{self.rados_pool}{ns}"

    def ioctx(self) -> Any:
        if self._ioctx is None:
            _, rbd = bindings()
            with translated(f"rados pool {self.rados_pool}"):
                io = cluster(self.conffile).open_ioctx(self.rados_pool)
                if self.namespace and not rbd.RBD().namespace_exists(io, self.namespace):
                    rbd.RBD().namespace_create(io, self.namespace)
                io.set_namespace(self.namespace)
            self._ioctx = io
        return self._ioctx

    def label(self, rados_pool: str, namespace: str) -> str:
        if (rados_pool, namespace) == (self.rados_pool, self.namespace):
            return self.name
        found = self._labels(rados_pool, namespace) if self._labels else None
        if found:
            return found
        return f"{rados_pool}/{namespace}" if namespace else rados_pool

    def _spec(self, volume: str, snapshot: str | None = None) -> str:
        snap = f"@{snapshot}" if snapshot else ""
        return f"rbd {self.where}/{volume}{snap}"

    def _key(self, volume: str) -> tuple[str, ...]:
        return (self.conffile, self.where, volume)

    @staticmethod
    def _id_key(image_id: str) -> str:
        return "id:" + image_id  # a trashed image has no name; no name has a ':'

    def image(
        self, volume: str, *, snapshot: str | None = None, read_only: bool = False
    ) -> contextlib.AbstractContextManager[Any]:
        """An open ``rbd.Image``, closed late (``closing``) when the block ends."""
        validate_name(volume, "volume name")
        if snapshot is not None:
            validate_name(snapshot, "snapshot name")
        what = self._spec(volume, snapshot)
        return self._opened(what, volume, name=volume, snapshot=snapshot, read_only=read_only)

    def image_by_id(
        self, image_id: str, *, snapshot: str | None = None, read_only: bool = False
    ) -> contextlib.AbstractContextManager[Any]:
        """A trashed image, which has only its id."""
        what = f"trashed image {self.where} id {image_id}"
        return self._opened(
            what, self._id_key(image_id), image_id=image_id, snapshot=snapshot, read_only=read_only
        )

    def _open(self, what: str, key: str, **how: Any) -> RbdHandle:
        """Open an image (closed late: ``closing``); a snapshot is always read-only."""
        _, rbd = bindings()
        closing.reap()
        how["read_only"] = bool(how.get("read_only")) or how.get("snapshot") is not None
        with translated(what):
            img = rbd.Image(self.ioctx(), **how)
        return RbdHandle(img, what, self._key(key), how["read_only"])

    @contextlib.contextmanager
    def _opened(self, what: str, key: str, **how: Any) -> Iterator[Any]:
        handle = self._open(what, key, **how)
        try:
            with translated(what):
                yield handle.image
        finally:
            handle.close()

    def settle(self, volume: str) -> None:
        """Close this process's late images of ``volume`` (before it must have no watcher)."""
        closing.settle(self._key(volume))

    def settle_trashed(self, image_id: str) -> None:
        closing.settle(self._key(self._id_key(image_id)))

    # -- volumes -------------------------------------------------------------------
    def create_volume(
        self, name: str, size: int, options: CreateOptions | None = None
    ) -> VolumeInfo:
        validate_name(name, "volume name")
        opts = options or CreateOptions()
        _, rbd = bindings()
        order = None
        if opts.object_size is not None:
            order = opts.object_size.bit_length() - 1
            if 1 << order != opts.object_size or not 12 <= order <= 25:
                raise InvalidInput("object size must be a power of two from 4 KiB to 32 MiB")
        with translated(self._spec(name)):
            rbd.RBD().create(
                self.ioctx(),
                name,
                size,
                order=order,
                old_format=False,
                features=snapshots.features(rbd),
                stripe_unit=opts.stripe_unit,
                stripe_count=opts.stripe_count,
            )
        return self.volume_info(name)

    def volume_info(self, name: str) -> VolumeInfo:
        with self.image(name, read_only=True) as img:
            size = int(img.size())
            used = 0

            def count(_offset: int, length: int, exists: bool) -> None:
                nonlocal used
                used += length if exists else 0

            img.diff_iterate(0, size, None, count, include_parent=False)
            return VolumeInfo(name=name, size=size, allocated=used, parent=self._parent(img))

    def layout(self, name: str) -> CreateOptions:
        with self.image(name, read_only=True) as img:
            return CreateOptions(
                object_size=1 << int(img.stat()["order"]),
                stripe_unit=int(img.stripe_unit()),
                stripe_count=int(img.stripe_count()),
            )

    def _parent(self, img: Any) -> ParentRef | None:
        _, rbd = bindings()
        try:
            spec = img.get_parent_image_spec()
        except rbd.ImageNotFound:
            return None
        pool = self.label(spec["pool_name"], spec.get("pool_namespace", ""))
        return ParentRef(pool, spec["image_name"], spec["snap_name"])

    def list_volumes(self) -> list[str]:
        _, rbd = bindings()
        with translated(f"rados pool {self.where}"):
            return sorted(n for n in rbd.RBD().list(self.ioctx()) if not n.endswith(IMPORT_SUFFIX))

    def resize_volume(self, name: str, size: int, *, allow_shrink: bool = False) -> VolumeInfo:
        with self.image(name) as img:
            if size < img.size() and not allow_shrink:
                raise InvalidInput(
                    f"shrinking {self.name}/{name} from {img.size()} to {size} bytes loses the "
                    "data past the new end; pass --allow-shrink to do it anyway"
                )
            img.resize(size, allow_shrink=allow_shrink)
        return self.volume_info(name)

    def delete_volume(self, name: str) -> None:
        validate_name(name, "volume name")
        _, rbd = bindings()
        self.settle(name)
        try:  # most volumes have no snapshot: nothing to open first
            with translated(self._spec(name)):
                rbd.RBD().remove(self.ioctx(), name)
            return
        except HasDependents:
            pass  # its snapshots go first, if none has clones or is protected
        self._check_deletable(name)
        with self.image(name) as img:
            for snap in snapshots.user_snaps(img):
                img.remove_snap(snap["name"])
        self.settle(name)
        with translated(self._spec(name)):
            rbd.RBD().remove(self.ioctx(), name)

    def _check_deletable(self, name: str) -> None:
        snaps = self.list_snapshots(name)
        clones = sorted(c for s in snaps for c in s.children)
        if clones:
            raise HasDependents(f"volume {self.name}/{name} has snapshots with clones", clones)
        protected = [f"{name}@{s.name}" for s in snaps if s.protected]
        if protected:
            raise HasDependents(
                f"volume {self.name}/{name} has protected snapshots; unprotect them first",
                protected,
            )

    # -- data in and out (rbd/access.py) ---------------------------------------------
    def import_volume(
        self,
        name: str,
        source: str,
        image: InspectedImage,
        progress: ProgressFn | None = None,
        *,
        consume: bool = False,
    ) -> VolumeInfo:
        return access.import_volume(self, name, source, image, progress)

    def export_volume(
        self,
        name: str,
        dest: str,
        fmt: DiskFormat,
        *,
        snapshot: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        access.export_volume(self, name, dest, fmt, snapshot=snapshot, progress=progress)

    def attachment(self, name: str) -> Attachment:
        return access.attachment(self, name)

    def open(
        self, name: str, *, snapshot: str | None = None, read_only: bool = False
    ) -> BlockHandle:
        validate_name(name, "volume name")
        what = self._spec(name, snapshot)
        return self._open(what, name, name=name, snapshot=snapshot, read_only=read_only)

    # -- snapshots and clones (rbd/snapshots.py) -------------------------------------
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
        snapshots.protect_snapshot(self, volume, snapshot)

    def unprotect_snapshot(self, volume: str, snapshot: str) -> None:
        snapshots.unprotect_snapshot(self, volume, snapshot)

    def clone(
        self, volume: str, snapshot: str, child_pool: StoragePool, child: str, *, v2: bool = False
    ) -> VolumeInfo:
        if not isinstance(child_pool, RbdPool) or child_pool.conffile != self.conffile:
            raise InvalidInput("an rbd volume can only be cloned into an rbd pool of its cluster")
        return snapshots.clone(self, volume, snapshot, child_pool, child, v2=v2)

    def children(self, volume: str, snapshot: str) -> list[str]:
        return snapshots.children(self, volume, snapshot)

    def parent(self, volume: str) -> ParentRef | None:
        with self.image(volume, read_only=True) as img:
            return self._parent(img)

    def flatten(self, volume: str, progress: ProgressFn | None = None) -> None:
        snapshots.flatten(self, volume, progress)

    # -- trash, change tracking, housekeeping (rbd/housekeeping.py) -----------------
    def trash_volume(self, name: str, delay: int) -> None:
        housekeeping.trash_volume(self, name, delay)

    def trash(self) -> list[TrashEntry]:
        return housekeeping.trash(self)

    def empty_trash(self, *, expired_only: bool = True) -> list[str]:
        return housekeeping.empty_trash(self, expired_only=expired_only)

    def changed_extents(
        self, volume: str, snapshot: str, since: str | None
    ) -> list[tuple[int, int, bool]]:
        return housekeeping.changed_extents(self, volume, snapshot, since)

    def allocated_extents(self, volume: str, snapshot: str) -> list[tuple[int, int]]:
        return [(o, n) for o, n, data in self.changed_extents(volume, snapshot, None) if data]

    def find_debris(self) -> list[Debris]:
        return housekeeping.find_debris(self)

    def remove_debris(self, item: Debris) -> None:
        housekeeping.remove_debris(self, item)

    def recover(self) -> list[str]:
        return []  # every librbd call is atomic; half imports are debris
