"""Restoring backups: one disk into a new volume, or a whole instance (every disk
plus its definition) as a new instance. Needs only the repository: no source, no
snapshot, no catalogue entry of the backup (docs/backups.md, "Restore")."""

from __future__ import annotations

import contextlib
from typing import Any

from snapback.catalog.models import Image
from snapback.domain.errors import InvalidInput, NotFound
from snapback.domain.models import BootFileFormat, ImageStatus, OperationStatus
from snapback.domain.names import validate_name
from snapback.drivers.imagefmt.bootfiles import MAX_KERNEL, MAX_RAMDISK
from snapback.drivers.storage.base import ProgressFn
from snapback.repository.repo import Repository
from snapback.services import journal
from snapback.services.backup_io import restore_chunks, restore_file
from snapback.services.catalog_queries import instance_using, live_volume
from snapback.services.context import Context
from snapback.services.instances import BootFiles
from snapback.services.volumes import VolumeService, purge

RESTORE, RESTORE_INSTANCE = "backup.restore", "backup.restore_instance"


def pick_disk(record: dict[str, Any], target: str | None) -> dict[str, Any]:
    disks: list[dict[str, Any]] = record["disks"]
    if target is None:
        if len(disks) > 1:
            have = ", ".join(str(d.get("target")) for d in disks)
            raise InvalidInput(
                f"backup {record['id']} holds {len(disks)} disks ({have}): name one with "
                "--disk, or restore the whole instance with --to-instance"
            )
        return disks[0]
    for d in disks:
        if d.get("target", "vda") == target:
            return d
    raise NotFound(f"backup {record['id']} has no disk {target}")


def restore_disk(
    ctx: Context,
    repo: Repository,
    backup_id: str,
    entry: dict[str, Any],
    to_volume: str,
    pool: str,
    progress: ProgressFn | None,
) -> tuple[str, int]:
    """A new volume holding the disk's bytes; (volume id, chunks written)."""
    index = repo.get_index(entry["index"])
    with journal.operation(ctx, RESTORE, f"{pool}/{to_volume}", backup=backup_id) as op:
        view = VolumeService(ctx).create(to_volume, int(index["size"]), pool)
        op.step("volume", volume_id=view.id)
        with ctx.sessions() as s:
            storage = live_volume(s, pool, to_volume).storage_name
        chunk = int(index["chunk_size"])
        wanted = [(n, cid) for n, cid in enumerate(index["chunks"]) if cid]
        with ctx.pool(pool).open_new(storage) as handle:
            op.step("opened")  # from here the volume may hold a half-written file
            restore_chunks(repo, handle, chunk, wanted, progress)
        op.step("written")
    return view.id, len(wanted)


def restore_instance(
    ctx: Context,
    repo: Repository,
    backup_id: str,
    name: str,
    pool: str,
    start: bool,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """Every disk into ``<name>-root`` / ``<name>-<target>``, then an instance over them
    with the backed-up memory, vCPUs and (when the catalogue still has it) base image,
    whose properties give the kernel and command line."""
    from snapback.services.instances import InstanceService

    validate_name(name, "instance name")
    record = repo.get_record(backup_id)
    defn = record.get("instance")
    if record.get("kind") != "instance" or not defn:
        raise InvalidInput(f"backup {backup_id} is of a volume: restore it with --to-volume")
    image_id, note = _base_image(ctx, defn)
    volumes: list[dict[str, Any]] = []
    with journal.operation(ctx, RESTORE_INSTANCE, name, backup=backup_id) as op:
        boot = None if image_id else _restore_boot(ctx, repo, record, name, op)
        if boot is not None:
            note = (
                "the base image is not in this catalogue: the instance boots the kernel "
                f"{'and ramdisk ' if boot.ramdisk_id else ''}stored with the backup "
                f"(images {name}-kernel{f', {name}-ramdisk' if boot.ramdisk_id else ''})"
            )
        disks = _restore_disks(ctx, repo, record, name, pool, op, volumes, progress)
        view = InstanceService(ctx).adopt(
            name,
            disks,
            memory_mib=int(defn.get("memory_mib", 256)),
            vcpus=int(defn.get("vcpus", 1)),
            image_id=image_id,
            boot=boot,
            start=start,
        )
        op.step("defined", instance_id=view.id)
    return {
        "backup": backup_id,
        "instance": name,
        "status": view.status,
        "disks": volumes,
        "image": image_id,
        "note": note,
    }


def _restore_disks(
    ctx: Context,
    repo: Repository,
    record: dict[str, Any],
    name: str,
    pool: str,
    op: journal.OpHandle,
    volumes: list[dict[str, Any]],
    progress: ProgressFn | None,
) -> list[tuple[str, str, bool]]:
    """Each disk of an instance backup into its new volume, ``<name>-root`` or
    ``<name>-<target>``; (target, volume id, root) of each, and what ``volumes``
    reports of them."""
    disks: list[tuple[str, str, bool]] = []
    roots = {d["target"]: bool(d.get("root")) for d in record["instance"].get("disks", [])}
    for entry in record["disks"]:
        target = str(entry.get("target", "vda"))
        root = roots.get(target, target == "vda")
        vol_name = f"{name}-root" if root else f"{name}-{target}"
        vol_id, chunks = restore_disk(ctx, repo, record["id"], entry, vol_name, pool, progress)
        op.step(f"volume-{target}", volume_id=vol_id)
        disks.append((target, vol_id, root))
        volumes.append({"target": target, "volume": f"{pool}/{vol_name}", "chunks": chunks})
    return disks


def _restore_boot(
    ctx: Context, repo: Repository, record: dict[str, Any], name: str, op: journal.OpHandle
) -> BootFiles | None:
    """The kernel (and ramdisk) the record holds, as new images ``NAME-kernel`` and
    ``NAME-ramdisk``: checked like any upload before QEMU may boot them."""
    from snapback.services.images import ImageService

    stored = {str(e.get("role")): e for e in record.get("boot_files", []) if isinstance(e, dict)}
    if "kernel" not in stored:
        return None
    made: dict[str, str] = {}
    for role, fmt, limit in (
        ("kernel", BootFileFormat.AKI, MAX_KERNEL),
        ("ramdisk", BootFileFormat.ARI, MAX_RAMDISK),
    ):
        if role not in stored:
            continue
        staged = ctx.settings.staging / f"{op.id}.{role}"
        try:
            restore_file(repo, str(stored[role]["index"]), str(staged), limit)
            made[role] = ImageService(ctx).create(f"{name}-{role}", str(staged), fmt).id
        finally:
            staged.unlink(missing_ok=True)
        op.step(f"boot-{role}", image_id=made[role])
    defn = record.get("instance") or {}
    image_props = (defn.get("image") or {}).get("properties", {})
    cmdline = str(defn.get("cmdline", image_props.get("os_command_line", "")))
    return BootFiles(made["kernel"], made.get("ramdisk"), cmdline)


def _base_image(ctx: Context, defn: dict[str, Any]) -> tuple[str | None, str | None]:
    """The backed-up instance's base image if this catalogue has it active."""
    image = defn.get("image") or {}
    if not image.get("id"):
        return None, None
    with ctx.sessions() as s:
        img = s.get(Image, image["id"])
        if img is not None and img.status == ImageStatus.ACTIVE:
            return img.id, None
    return None, (
        f"base image {image.get('name') or image['id']} is not in this catalogue: the "
        "instance boots from its disk's own boot loader (its kernel properties were "
        f"{sorted(image.get('properties', {}))})"
    )


@journal.recovery(RESTORE)
def _recover_restore(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    if op.reached("written"):
        return OperationStatus.RECOVERED
    vol_id = op.data("volume").get("volume_id")
    if vol_id:
        purge(ctx, vol_id)
    return OperationStatus.ROLLED_BACK


@journal.recovery(RESTORE_INSTANCE)
def _recover_restore_instance(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """Before the instance is defined the restored volumes are removed (the instance
    create's own recovery has removed a half-made instance already)."""
    made = [
        str(step.data["volume_id"])
        for step in op.steps
        if step.name.startswith("volume-") and step.data.get("volume_id")
    ]
    with ctx.sessions() as s:
        adopted = any(instance_using(s, vol_id) is not None for vol_id in made)
    if op.reached("defined") or adopted:  # killed just after the instance was made
        return OperationStatus.RECOVERED
    from snapback.services.images import ImageService

    for step in op.steps:  # boot files restored as images for this instance only
        if step.name.startswith("boot-") and step.data.get("image_id"):
            with contextlib.suppress(NotFound):
                ImageService(ctx).delete(str(step.data["image_id"]))
    for step in op.steps:
        if step.name.startswith("volume-") and step.data.get("volume_id"):
            purge(ctx, str(step.data["volume_id"]))
    return OperationStatus.ROLLED_BACK
