"""The libvirt domain an instance should have, built from the catalogue on every
start so it always points at the volumes' current files: its disks (a file, or an
rbd network disk with its ceph.conf), the kernel and ramdisk it boots directly
when its image (or its own restored boot files) names them, and its serial
console log. ``InstanceService.spec`` delegates here."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from snapback.catalog.models import Image, Instance, Volume
from snapback.domain.models import BootFileFormat
from snapback.drivers.hypervisor.domain_xml import DiskSpec, DomainSpec
from snapback.services.context import Context
from snapback.services.images import ImageService


def console_path(ctx: Context, inst_id: str) -> Path:
    return ctx.settings.home / "instances" / inst_id / "console.log"


def domain_spec(ctx: Context, images: ImageService, inst_id: str) -> DomainSpec:
    """The domain as the catalogue says it should be, with the volumes' current files."""
    with ctx.sessions() as s:
        inst = s.get(Instance, inst_id)
        assert inst is not None
        props = _boot_props(s, inst)
        disks = []
        for d in inst.disks:
            vol = s.get(Volume, d.volume_id)
            assert vol is not None
            disks.append(disk_spec(ctx, d.target, vol.pool, vol.storage_name))
        name, memory, vcpus = inst.domain_name, inst.memory_mib, inst.vcpus
    kernel = (
        _boot_file(images, props["kernel_id"], BootFileFormat.AKI) if "kernel_id" in props else None
    )
    initrd = (
        _boot_file(images, props["ramdisk_id"], BootFileFormat.ARI)
        if "ramdisk_id" in props
        else None
    )
    console = console_path(ctx, inst_id)
    console.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    return DomainSpec(
        name=name,
        memory_mib=memory,
        vcpus=vcpus,
        disks=tuple(disks),
        kernel=kernel,
        initrd=initrd,
        cmdline=props.get("os_command_line") if kernel else None,
        serial_log=str(console),
        uuid=inst_id,
    )


def _boot_props(s: Session, inst: Instance) -> dict[str, str]:
    """What the domain boots by: the image's properties, or the instance's own
    ``kernel_id``, ``ramdisk_id`` and ``os_command_line`` when a restore gave it some."""
    props = {}
    if inst.image_id:
        img = s.get(Image, inst.image_id)
        props = {p.key: p.value for p in img.properties} if img else {}
    if inst.kernel_id:  # its own boot files (restored from a backup) come first
        props = {"kernel_id": inst.kernel_id, "os_command_line": inst.os_command_line or ""}
        if inst.ramdisk_id:
            props["ramdisk_id"] = inst.ramdisk_id
    return props


def _boot_file(images: ImageService, image_ref: str, fmt: BootFileFormat) -> str:
    return str(images.boot_file(image_ref, fmt)[1])


def disk_spec(ctx: Context, target: str, pool: str, storage_name: str) -> DiskSpec:
    """How the domain reaches a volume: a file, or an rbd network disk with its ceph.conf."""
    att = ctx.pool(pool).attachment(storage_name)
    if att.type == "file":
        return DiskSpec(target, att.source, att.format)
    return DiskSpec(
        target,
        att.source,
        att.format,
        protocol=att.protocol,
        config=ctx.settings.pools[pool].conf,
    )
