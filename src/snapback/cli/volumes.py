"""``snapback volume ...``"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from snapback.cli.main import context
from snapback.cli.output import FORMAT_OPTION, ProgressBar, emit, fields, human_size, table
from snapback.domain.models import DiskFormat
from snapback.domain.names import parse_snapshot_ref
from snapback.domain.sizes import parse_size
from snapback.drivers.storage.base import CreateOptions
from snapback.services.views import VolumeView
from snapback.services.volumes import VolumeService

POOL_OPTION = click.option("--pool", default=None, help="Pool name (default: the default pool).")
FORMATS = click.Choice([f.value for f in DiskFormat])


def volume_text(v: VolumeView) -> str:
    return fields(
        {
            "name": v.name,
            "id": v.id,
            "pool": v.pool,
            "size": human_size(v.size),
            "allocated": human_size(v.allocated),
            "status": v.status,
            "kind": v.kind,
            "read_only": v.read_only,
            "parent": v.parent,
            "snapshots": v.snapshots,
        }
    )


@contextlib.contextmanager
def progress_bar(label: str, fmt: str) -> Iterator[ProgressBar]:
    bar = ProgressBar(label, enabled=None if fmt == "text" else False)
    try:
        yield bar
    finally:
        bar.close()


def service() -> VolumeService:
    return VolumeService(context(click.get_current_context()))


@click.group()
def volume() -> None:
    """Volumes: thin virtual disks in a pool."""


@volume.command("create")
@click.argument("name")
@click.option("--size", required=True, help="Virtual size, e.g. 10G, 512M.")
@POOL_OPTION
@click.option("--object-size", help="RBD: object size, a power of two from 4K to 32M.")
@click.option("--stripe-unit", help="RBD: stripe unit (divides the object size).")
@click.option("--stripe-count", type=int, help="RBD: objects a stripe spans.")
@FORMAT_OPTION
def create(
    name: str,
    size: str,
    pool: str | None,
    object_size: str | None,
    stripe_unit: str | None,
    stripe_count: int | None,
    fmt: str,
) -> None:
    """Create a thin volume."""
    options = CreateOptions(
        object_size=parse_size(object_size) if object_size else None,
        stripe_unit=parse_size(stripe_unit) if stripe_unit else None,
        stripe_count=stripe_count,
    )
    emit(fmt, service().create(name, parse_size(size), pool, options), volume_text)


@volume.command("list")
@POOL_OPTION
@click.option("--all", "all_kinds", is_flag=True, help="Include the volumes behind images.")
@FORMAT_OPTION
def list_(pool: str | None, all_kinds: bool, fmt: str) -> None:
    """List volumes."""
    vols = service().list_volumes(pool, all_kinds=all_kinds)
    emit(
        fmt,
        vols,
        lambda vs: table(
            [
                {
                    "name": v.name,
                    "pool": v.pool,
                    "size": human_size(v.size),
                    "allocated": human_size(v.allocated),
                    "status": v.status,
                    "parent": v.parent,
                }
                for v in vs
            ],
            ["name", "pool", "size", "allocated", "status", "parent"],
        ),
    )


@volume.command("show")
@click.argument("name")
@POOL_OPTION
@FORMAT_OPTION
def show(name: str, pool: str | None, fmt: str) -> None:
    """Show a volume: sizes, parent, snapshots."""
    emit(fmt, service().show(name, pool), volume_text)


@volume.command("resize")
@click.argument("name")
@click.option("--size", required=True, help="New virtual size.")
@click.option("--allow-shrink", is_flag=True, help="Allow a smaller size (loses data past it).")
@POOL_OPTION
@FORMAT_OPTION
def resize(name: str, size: str, allow_shrink: bool, pool: str | None, fmt: str) -> None:
    """Grow (or shrink, with --allow-shrink) a volume."""
    emit(fmt, service().resize(name, parse_size(size), pool, allow_shrink), volume_text)


@volume.command("delete")
@click.argument("name")
@click.option(
    "--defer", is_flag=True, help="If clones still depend on it, delete it once they are gone (gc)."
)
@POOL_OPTION
@FORMAT_OPTION
def delete(name: str, defer: bool, pool: str | None, fmt: str) -> None:
    """Delete a volume and its unprotected snapshots."""
    result = service().delete(name, pool, defer=defer)
    emit(fmt, {"volume": name, "result": result}, lambda r: f"{name}: {result}")


@volume.command("import")
@click.argument("name")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--disk-format",
    type=FORMATS,
    default=None,
    help="Format of the file (checked); detected when omitted.",
)
@POOL_OPTION
@FORMAT_OPTION
def import_(name: str, path: str, disk_format: str | None, pool: str | None, fmt: str) -> None:
    """Create a volume from a raw or qcow2 file (inspected first)."""
    declared = DiskFormat(disk_format) if disk_format else None
    with progress_bar("import", fmt) as bar:
        vol = service().import_file(name, path, declared, pool, bar)
    emit(fmt, vol, volume_text)


@volume.command("export")
@click.argument("name")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False))
@click.option("--disk-format", type=FORMATS, default="raw", show_default=True)
@click.option("--snapshot", default=None, help="Export this snapshot instead of the volume.")
@POOL_OPTION
@FORMAT_OPTION
def export(
    name: str, path: str, disk_format: str, snapshot: str | None, pool: str | None, fmt: str
) -> None:
    """Write a volume (or a snapshot of it) to a new raw or qcow2 file."""
    with progress_bar("export", fmt) as bar:
        service().export(name, path, DiskFormat(disk_format), pool, snapshot, bar)
    emit(
        fmt,
        {"volume": name, "file": path, "disk_format": disk_format},
        lambda r: f"exported {name} to {path} ({disk_format})",
    )


@volume.command("clone")
@click.argument("source")
@click.argument("name")
@POOL_OPTION
@click.option("--dest-pool", default=None, help="Pool of the new clone (default: same pool).")
@FORMAT_OPTION
def clone(source: str, name: str, pool: str | None, dest_pool: str | None, fmt: str) -> None:
    """Make NAME a copy-on-write clone of the protected snapshot SOURCE (vol@snap)."""
    emit(fmt, service().clone(parse_snapshot_ref(source), name, pool, dest_pool), volume_text)


@volume.command("flatten")
@click.argument("name")
@POOL_OPTION
@FORMAT_OPTION
def flatten(name: str, pool: str | None, fmt: str) -> None:
    """Copy a clone's parent data into it so the dependency ends."""
    with progress_bar("flatten", fmt) as bar:
        vol = service().flatten(name, pool, bar)
    emit(fmt, vol, volume_text)


@volume.command("children")
@click.argument("target")
@POOL_OPTION
@FORMAT_OPTION
def children(target: str, pool: str | None, fmt: str) -> None:
    """List the clones of VOLUME@SNAPSHOT (or of every snapshot of VOLUME)."""
    if "@" in target:
        ref = parse_snapshot_ref(target)
        kids = service().children(ref.volume, ref.snapshot, pool)
    else:
        kids = service().children(target, None, pool)
    emit(fmt, kids, lambda ks: "\n".join(ks) or "(none)")
