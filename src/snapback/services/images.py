"""Image use-cases (glance-like): upload, list, show, set, download, delete.

An upload is journaled: queued -> saving -> active, or killed when anything
fails. The user's file is first streamed into our staging folder (size and
sha256 computed on the way), and only that private copy is inspected and
handed to qemu-img, so the file cannot change between the check and the use.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from sqlalchemy import or_, select

from snapback.catalog.models import Image, ImageProperty, Instance, Snapshot, Volume
from snapback.domain.errors import Conflict, InvalidInput, NotFound
from snapback.domain.models import (
    IMAGE_FORMATS,
    BootFileFormat,
    DiskFormat,
    ImageStatus,
    OperationStatus,
    Progress,
    SnapshotStatus,
    VolumeStatus,
)
from snapback.domain.names import validate_name
from snapback.drivers.imagefmt.bootfiles import inspect_kernel, inspect_ramdisk
from snapback.drivers.imagefmt.inspector import inspect
from snapback.drivers.storage.base import ProgressFn
from snapback.services import journal
from snapback.services.catalog_queries import clones_of, volume_label
from snapback.services.context import Context
from snapback.services.views import ImageView
from snapback.services.volumes import VolumeService, purge, volume_lock

UPLOAD = "image.upload"
BASE_SNAPSHOT = "base"  # the protected snapshot instances are cloned from (as glance on RBD)
_PROP_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,255}$")
CHUNK = 4 << 20


def parse_properties(pairs: list[str]) -> dict[str, str]:
    props = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _PROP_KEY.match(key):
            raise InvalidInput(
                f"invalid property {pair!r}: use KEY=VALUE with KEY of letters, "
                "digits, '_', '.', ':' or '-'"
            )
        props[key] = value
    return props


class ImageService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.volumes = VolumeService(ctx)

    # -- reading ---------------------------------------------------------
    def _find(self, ref: str) -> Image:
        with self.ctx.sessions() as s:
            rows = list(
                s.scalars(
                    select(Image).where(
                        or_(Image.id == ref, Image.name == ref), Image.status != ImageStatus.DELETED
                    )
                )
            )
            by_id = [r for r in rows if r.id == ref]
            if by_id:
                return by_id[0]
            if len(rows) > 1:
                raise InvalidInput(f"{len(rows)} images are named {ref!r}; use the image id")
            if not rows:
                raise NotFound(f"image {ref!r} does not exist")
            return rows[0]

    def _view(self, image_id: str) -> ImageView:
        with self.ctx.sessions() as s:
            img = s.get(Image, image_id)
            assert img is not None
            vol = s.get(Volume, img.volume_id) if img.volume_id else None
            return ImageView(
                id=img.id,
                name=img.name,
                status=img.status,
                disk_format=img.disk_format,
                size=img.size,
                virtual_size=img.virtual_size,
                checksum=img.checksum,
                protected=img.protected,
                properties={p.key: p.value for p in img.properties},
                volume=f"{vol.pool}/{vol.name}" if vol else None,
                created_at=img.created_at,
                updated_at=img.updated_at,
            )

    def show(self, ref: str) -> ImageView:
        return self._view(self._find(ref).id)

    def boot_file(self, ref: str, fmt: BootFileFormat) -> tuple[ImageView, Path]:
        """The active ``fmt`` (aki, ari) image ``ref`` names and where its file lies;
        NotFound when there is none, InvalidInput when it is not one such."""
        img = self.show(ref)
        if img.status != ImageStatus.ACTIVE or img.disk_format != fmt:
            raise InvalidInput(f"image {ref} is not an active {fmt} image")
        return img, boot_file_path(self.ctx, img.id)

    def list_images(self, *, all_statuses: bool = False) -> list[ImageView]:
        with self.ctx.sessions() as s:
            q = select(Image.id).order_by(Image.name, Image.created_at)
            if not all_statuses:
                q = q.where(Image.status != ImageStatus.DELETED)
            ids = s.scalars(q).all()
        return [self._view(i) for i in ids]

    # -- upload ----------------------------------------------------------
    def create(
        self,
        name: str,
        path: str,
        disk_format: str | None = None,
        properties: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> ImageView:
        """Upload ``path``: a disk (raw, qcow2; detected when None) or a boot file (aki, ari)."""
        validate_name(name, "image name")
        if disk_format is not None and disk_format not in IMAGE_FORMATS:
            raise InvalidInput(
                f"unknown disk format {disk_format!r} (use {', '.join(IMAGE_FORMATS)})"
            )
        if not os.path.isfile(path):
            raise NotFound(f"{path} is not a file")
        with self.ctx.transaction() as s:
            img = Image(name=name, status=ImageStatus.QUEUED, disk_format=disk_format or "auto")
            img.properties = [ImageProperty(key=k, value=v) for k, v in (properties or {}).items()]
            s.add(img)
            s.flush()
            image_id = img.id
        with journal.operation(self.ctx, UPLOAD, name, image_id=image_id) as op:
            op.step("queued")
            self._set_status(image_id, ImageStatus.SAVING)
            staged = self.ctx.settings.staging / f"{op.id}.upload"
            size, digest = _stream(path, staged, progress)
            op.step("staged", path=str(staged), size=size, sha256=digest)
            if disk_format in (BootFileFormat.AKI, BootFileFormat.ARI):
                virtual_size, vol_id = self._store_boot_file(op, image_id, staged, disk_format)
            else:
                declared = DiskFormat(disk_format) if disk_format else None
                virtual_size, vol_id, disk_format = self._store_disk(
                    op, image_id, staged, declared, progress
                )
            with self.ctx.transaction() as s:
                image = s.get(Image, image_id)
                assert image is not None
                image.status, image.volume_id = ImageStatus.ACTIVE, vol_id
                image.size, image.checksum = size, digest
                image.virtual_size, image.disk_format = virtual_size, disk_format
            op.step("activated")
            staged.unlink(missing_ok=True)
        return self._view(image_id)

    def _store_disk(
        self,
        op: journal.OpHandle,
        image_id: str,
        staged: Path,
        declared: DiskFormat | None,
        progress: ProgressFn | None,
        *,
        consume: bool = False,
    ) -> tuple[int, str, str]:
        """Inspect, import into a read-only volume with a protected ``base`` snapshot."""
        found = inspect(str(staged), declared)
        vol = self.volumes._new_row(
            f"image-{image_id}", self.ctx.settings.image_pool, found.virtual_size, kind="image"
        )
        op.step("volume", volume_id=vol.id)
        driver = self.ctx.pool(vol.pool)
        driver.import_volume(vol.storage_name, str(staged), found, progress, consume=consume)
        op.step("imported")
        snap_storage = "s-" + uuid.uuid4().hex[:20]
        driver.create_snapshot(vol.storage_name, snap_storage, protect=True)
        op.step("snapshotted", snapshot=snap_storage)
        with self.ctx.transaction() as s:
            s.add(
                Snapshot(
                    volume_id=vol.id,
                    name=BASE_SNAPSHOT,
                    storage_name=snap_storage,
                    protected=True,
                    status=SnapshotStatus.AVAILABLE,
                )
            )
            row = s.get(Volume, vol.id)
            assert row is not None
            row.status, row.read_only = VolumeStatus.AVAILABLE, True
        return found.virtual_size, vol.id, found.format.value

    def _store_boot_file(
        self, op: journal.OpHandle, image_id: str, staged: Path, fmt: str
    ) -> tuple[int, None]:
        """Check a kernel or ramdisk and move it into the boot-file store (read-only)."""
        check = inspect_kernel if fmt == BootFileFormat.AKI else inspect_ramdisk
        size = check(str(staged))
        blob = boot_file_path(self.ctx, image_id)
        op.step("blob", path=str(blob))
        os.chmod(staged, 0o444)
        os.replace(staged, blob)
        return size, None

    def _set_status(self, image_id: str, status: ImageStatus) -> None:
        with self.ctx.transaction() as s:
            img = s.get(Image, image_id)
            assert img is not None
            img.status = status

    # -- changes ---------------------------------------------------------
    def set(
        self,
        ref: str,
        *,
        name: str | None = None,
        protected: bool | None = None,
        properties: dict[str, str] | None = None,
        remove: list[str] | None = None,
    ) -> ImageView:
        img = self._find(ref)
        with self.ctx.transaction() as s:
            row = s.get(Image, img.id)
            assert row is not None
            if name is not None:
                row.name = validate_name(name, "image name")
            if protected is not None:
                row.protected = protected
            props = {p.key: p.value for p in row.properties}
            props.update(properties or {})
            for key in remove or []:
                if key not in props:
                    raise NotFound(f"image {img.name} has no property {key!r}")
                del props[key]
            row.properties = [ImageProperty(key=k, value=v) for k, v in sorted(props.items())]
        return self._view(img.id)

    def download(
        self, ref: str, dest: str, fmt: DiskFormat | None = None, progress: ProgressFn | None = None
    ) -> ImageView:
        img = self._find(ref)
        if img.status != ImageStatus.ACTIVE:
            raise Conflict(f"image {img.name} is {img.status}, not active; nothing to download")
        if img.volume_id is None:  # a boot file
            _copy_new(boot_file_path(self.ctx, img.id), Path(dest))
            return self._view(img.id)
        with self.ctx.sessions() as s:
            vol = s.get(Volume, img.volume_id)
            assert vol is not None
            base = next(x for x in vol.snapshots if x.name == BASE_SNAPSHOT)
            target = fmt or DiskFormat(img.disk_format)
            self.ctx.pool(vol.pool).export_volume(
                vol.storage_name, dest, target, snapshot=base.storage_name, progress=progress
            )
        return self._view(img.id)

    def delete(self, ref: str) -> str:
        """Delete an image; ``deferred`` while clones of its volume exist."""
        img = self._find(ref)
        if img.protected:
            raise Conflict(f"image {img.name} is protected; 'image set --unprotected' first")
        if img.volume_id is None:
            users = self._booting(img.id)
            if users:
                raise Conflict(
                    f"image {img.name} is the {img.disk_format} that instance(s) "
                    f"{', '.join(users)} boot; delete them first"
                )
            boot_file_path(self.ctx, img.id).unlink(missing_ok=True)
            self._set_status(img.id, ImageStatus.DELETED)
            return "deleted"
        with self.ctx.lock(volume_lock(img.volume_id)):
            if self.volumes.dependents(img.volume_id):
                with self.ctx.transaction() as s:
                    row, vol = s.get(Image, img.id), s.get(Volume, img.volume_id)
                    assert row is not None and vol is not None
                    row.status, vol.status = ImageStatus.PENDING_DELETE, VolumeStatus.PENDING_DELETE
                return "deferred"
            self.volumes.remove(img.volume_id)
        self._set_status(img.id, ImageStatus.DELETED)
        from snapback.services.image_create_rbd import release_source_snapshot

        release_source_snapshot(self.ctx, img.id)  # the instance disk's snapshot it came from
        return "deleted"

    def _booting(self, image_id: str) -> list[str]:
        """Live instances that boot this kernel or ramdisk, their own or their image's."""
        with self.ctx.sessions() as s:
            own = s.scalars(
                select(Instance.name).where(
                    Instance.status != "deleted",
                    or_(Instance.kernel_id == image_id, Instance.ramdisk_id == image_id),
                )
            ).all()
            through_image = s.scalars(
                select(Instance.name)
                .join(ImageProperty, ImageProperty.image_id == Instance.image_id)
                .where(
                    Instance.status != "deleted",
                    Instance.kernel_id.is_(None),
                    ImageProperty.key.in_(("kernel_id", "ramdisk_id")),
                    ImageProperty.value == image_id,
                )
            ).all()
        return sorted({*own, *through_image})

    def clones(self, ref: str) -> list[str]:
        img = self._find(ref)
        with self.ctx.sessions() as s:
            vol = s.get(Volume, img.volume_id) if img.volume_id else None
            snaps = vol.snapshots if vol else []
            return [volume_label(c) for sn in snaps for c in clones_of(s, sn.id)]


def boot_file_path(ctx: Context, image_id: str) -> Path:
    """Where a kernel or ramdisk image lives (readable by the qemu user, like volumes)."""
    store = ctx.settings.home / "boot-files"
    store.mkdir(mode=0o755, exist_ok=True)
    return store / image_id


def _copy_new(src: Path, dest: Path) -> None:
    if os.path.lexists(dest):
        raise Conflict(f"{dest} already exists; refusing to overwrite it")
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, part)
    os.replace(part, dest)


def _stream(src: str, dest: Path, progress: ProgressFn | None) -> tuple[int, str]:
    """Copy ``src`` to ``dest`` in chunks; return its size and sha256."""
    digest, size = hashlib.sha256(), 0
    total = os.path.getsize(src)
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                size += len(chunk)
                if progress:
                    progress(Progress(size, total))
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as exc:
        raise InvalidInput(f"cannot read {src}: {exc.strerror}") from exc
    return size, digest.hexdigest()


@journal.recovery(UPLOAD)
def _recover_upload(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """Before ``activated``: kill the image and remove what the upload made."""
    staged = op.data("staged").get("path")
    if staged:
        Path(staged).unlink(missing_ok=True)
    if op.reached("activated"):
        return OperationStatus.RECOVERED
    blob = op.data("blob").get("path")
    if blob:
        Path(blob).unlink(missing_ok=True)
    return kill_image(ctx, op)


def kill_image(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """Roll a half-made image back: its volume purged, the image ``killed`` (glance's word)."""
    vol_id = op.data("volume").get("volume_id")
    if vol_id:
        purge(ctx, vol_id)
    with ctx.transaction() as s:
        img = s.get(Image, op.payload["image_id"])
        if img is not None:
            img.status, img.volume_id = ImageStatus.KILLED, None
    return OperationStatus.ROLLED_BACK
