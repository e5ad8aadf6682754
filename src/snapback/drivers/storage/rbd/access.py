"""Data in and out of an RBD image for ``RbdPool``: imports and exports through
``qemu-img``'s ``rbd`` protocol, and the libvirt network disk a guest reads it by.

An import writes under a temporary name (``NAME.importing``) and renames the
image when whole; a crash leaves debris that ``gc`` removes.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from snapback.domain.errors import Conflict, SnapbackError
from snapback.domain.models import DiskFormat, VolumeInfo
from snapback.domain.names import validate_name
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.imagefmt.inspector import InspectedImage
from snapback.drivers.storage.base import Attachment, ProgressFn
from snapback.drivers.storage.rbd.cluster import bindings, cluster, translated
from snapback.drivers.storage.rbd.housekeeping import IMPORT_SUFFIX

if TYPE_CHECKING:
    from snapback.drivers.storage.rbd.pool import RbdPool


def target(pool: RbdPool, name: str, snapshot: str | None = None) -> dict[str, str]:
    """qemu-img's view of an image: the rbd protocol's options."""
    opts = {"driver": "rbd", "pool": pool.rados_pool, "image": name, "conf": pool.conffile}
    if pool.namespace:
        opts["namespace"] = pool.namespace
    if snapshot:
        opts["snapshot"] = snapshot
    return opts


def import_volume(
    pool: RbdPool,
    name: str,
    source: str,
    image: InspectedImage,
    progress: ProgressFn | None = None,
) -> VolumeInfo:
    """Write the file into a new image; made under a temporary name, renamed when whole."""
    validate_name(name, "volume name")
    if name in pool.list_volumes():
        raise Conflict(f"volume {pool.name}/{name} already exists")
    temp = name + IMPORT_SUFFIX
    _, rbd = bindings()
    pool.create_volume(temp, image.virtual_size)
    renamed = False
    try:
        qemu_img.convert_opts(
            source,
            image.format.value,
            target(pool, temp),
            "raw",
            progress=progress,
            total=image.virtual_size,
        )
        pool.settle(temp)
        with translated(pool._spec(name)):
            rbd.RBD().rename(pool.ioctx(), temp, name)
        renamed = True
    finally:
        if not renamed:  # failed or interrupted: the error on its way out is the one told
            pool.settle(temp)
            with contextlib.suppress(SnapbackError), translated(pool._spec(temp)):
                rbd.RBD().remove(pool.ioctx(), temp)  # else debris, which gc removes
    return pool.volume_info(name)


def export_volume(
    pool: RbdPool,
    name: str,
    dest: str,
    fmt: DiskFormat,
    *,
    snapshot: str | None = None,
    progress: ProgressFn | None = None,
) -> None:
    if os.path.lexists(dest):
        raise Conflict(f"{dest} already exists; refusing to overwrite it")
    with pool.image(name, snapshot=snapshot, read_only=True) as img:
        size = int(img.size())
    part = dest + ".part"
    try:
        qemu_img.convert_opts(
            target(pool, name, snapshot), "raw", part, fmt.value, progress=progress, total=size
        )
        os.replace(part, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)


def attachment(pool: RbdPool, name: str) -> Attachment:
    with pool.image(name, read_only=True):
        pass  # exists
    return Attachment(
        "network", f"{pool.where}/{name}", "raw", protocol="rbd", hosts=_monitors(pool)
    )


def _monitors(pool: RbdPool) -> tuple[tuple[str, int], ...]:
    raw = str(cluster(pool.conffile).conf_get("mon_host") or "")
    hosts = []
    for item in raw.replace("[", " ").replace("]", " ").replace(",", " ").split():
        addr = item.split(":", 1)[1] if item.startswith(("v1:", "v2:")) else item
        host, _, port = addr.rpartition(":")
        if host and port.isdigit():
            hosts.append((host, int(port)))
    return tuple(dict.fromkeys(hosts))
