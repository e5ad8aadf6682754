"""``snapback image ...``"""

from __future__ import annotations

import time

import click

from snapback.cli.main import context
from snapback.cli.output import FORMAT_OPTION, emit, fields, human_size, table
from snapback.cli.volumes import FORMATS, progress_bar
from snapback.domain.models import IMAGE_FORMATS, DiskFormat
from snapback.services.images import ImageService, parse_properties
from snapback.services.views import ImageView


def service() -> ImageService:
    return ImageService(context(click.get_current_context()))


def image_text(i: ImageView) -> str:
    return fields(
        {
            "name": i.name,
            "id": i.id,
            "status": i.status,
            "disk_format": i.disk_format,
            "size": human_size(i.size),
            "virtual_size": human_size(i.virtual_size),
            "checksum": i.checksum,
            "protected": i.protected,
            "properties": i.properties,
            "volume": i.volume,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at)),
        }
    )


@click.group()
def image() -> None:
    """Images: immutable template disks with properties and a checksum (glance-like)."""


@image.command("create")
@click.argument("name")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--disk-format",
    type=click.Choice(IMAGE_FORMATS),
    default=None,
    help="raw or qcow2 (checked against the content; detected when omitted), "
    "or aki/ari for a kernel/ramdisk that instances boot directly.",
)
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE")
@FORMAT_OPTION
def create(name: str, path: str, disk_format: str | None, props: tuple[str, ...], fmt: str) -> None:
    """Upload a file as a new image: queued -> saving -> active (killed on failure)."""
    properties = parse_properties(list(props))
    with progress_bar("upload", fmt) as bar:
        img = service().create(name, path, disk_format, properties, bar)
    emit(fmt, img, image_text)


@image.command("list")
@click.option("--all", "all_statuses", is_flag=True, help="Include deleted images.")
@FORMAT_OPTION
def list_(all_statuses: bool, fmt: str) -> None:
    """List images."""
    imgs = service().list_images(all_statuses=all_statuses)
    emit(
        fmt,
        imgs,
        lambda xs: table(
            [
                {
                    "id": i.id,
                    "name": i.name,
                    "status": i.status,
                    "disk_format": i.disk_format,
                    "size": human_size(i.size),
                    "protected": i.protected,
                }
                for i in xs
            ],
            ["id", "name", "status", "disk_format", "size", "protected"],
        ),
    )


@image.command("show")
@click.argument("image_ref", metavar="IMAGE")
@FORMAT_OPTION
def show(image_ref: str, fmt: str) -> None:
    """Show an image (by id or unique name)."""
    emit(fmt, service().show(image_ref), image_text)


@image.command("set")
@click.argument("image_ref", metavar="IMAGE")
@click.option("--name", default=None, help="Rename the image.")
@click.option("--protected/--unprotected", default=None, help="Protect against deletion.")
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE")
@click.option("--remove-property", "remove", multiple=True, metavar="KEY")
@FORMAT_OPTION
def set_(
    image_ref: str,
    name: str | None,
    protected: bool | None,
    props: tuple[str, ...],
    remove: tuple[str, ...],
    fmt: str,
) -> None:
    """Change an image's name, protection or properties."""
    img = service().set(
        image_ref,
        name=name,
        protected=protected,
        properties=parse_properties(list(props)),
        remove=list(remove),
    )
    emit(fmt, img, image_text)


@image.command("download")
@click.argument("image_ref", metavar="IMAGE")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--disk-format", type=FORMATS, default=None, help="Format to write (default: the image's own)."
)
@FORMAT_OPTION
def download(image_ref: str, path: str, disk_format: str | None, fmt: str) -> None:
    """Write an image's content to a new file."""
    target = DiskFormat(disk_format) if disk_format else None
    with progress_bar("download", fmt) as bar:
        img = service().download(image_ref, path, target, bar)
    emit(
        fmt,
        {"image": img.id, "file": path, "disk_format": (target or img.disk_format)},
        lambda r: f"downloaded {img.name} to {path}",
    )


@image.command("delete")
@click.argument("image_ref", metavar="IMAGE")
@FORMAT_OPTION
def delete(image_ref: str, fmt: str) -> None:
    """Delete an image; deferred (finished by gc) while clones of it exist."""
    result = service().delete(image_ref)
    emit(fmt, {"image": image_ref, "result": result}, lambda r: f"{image_ref}: {result}")


@image.command("flatten")
@click.argument("image_ref", metavar="IMAGE")
@FORMAT_OPTION
def flatten(image_ref: str, fmt: str) -> None:
    """Finish a background flatten: copy the parent's data in, drop the source snapshot."""
    from snapback.services.image_create_rbd import finish_flatten

    svc = service()
    img = svc.show(image_ref)
    with progress_bar("flatten", fmt) as bar:
        result = finish_flatten(svc.ctx, img.id, bar)
    emit(fmt, {"image": img.id, "result": result}, lambda r: f"{img.name}: {result}")
