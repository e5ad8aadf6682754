"""``snapback instance ...``"""

from __future__ import annotations

import click

from snapback.cli.images import image_text
from snapback.cli.main import context
from snapback.cli.output import FORMAT_OPTION, emit, fields, table
from snapback.cli.volumes import POOL_OPTION, progress_bar
from snapback.services.image_create import MODES, QUIESCE, ImageCreateService
from snapback.services.image_create_rbd import FLATTEN
from snapback.services.images import parse_properties
from snapback.services.instances import InstanceService
from snapback.services.views import InstanceView


def service() -> InstanceService:
    return InstanceService(context(click.get_current_context()))


def instance_text(i: InstanceView) -> str:
    state = i.domain_state if i.in_sync else f"{i.domain_state} (catalogue says {i.status}!)"
    return fields(
        {
            "name": i.name,
            "id": i.id,
            "status": i.status,
            "libvirt": state,
            "domain": i.domain,
            "image": i.image,
            "memory": f"{i.memory_mib} MiB",
            "vcpus": i.vcpus,
            "disks": i.disks,
            "console": i.console,
        }
    )


@click.group()
def instance() -> None:
    """Instances: virtual machines whose disks are volumes (libvirt domains)."""


@instance.command("create")
@click.argument("name")
@click.option(
    "--image", "image_ref", required=True, help="Image (id or name) to clone the root disk from."
)
@click.option("--memory", default=256, show_default=True, help="Memory in MiB.")
@click.option("--vcpus", default=1, show_default=True)
@click.option("--volume", "volumes", multiple=True, help="Attach an existing volume (repeatable).")
@click.option("--no-start", is_flag=True, help="Define it without starting it.")
@FORMAT_OPTION
def create(
    name: str,
    image_ref: str,
    memory: int,
    vcpus: int,
    volumes: tuple[str, ...],
    no_start: bool,
    fmt: str,
) -> None:
    """Create an instance: root disk cloned from IMAGE, extra volumes attached."""
    inst = service().create(name, image_ref, memory, vcpus, list(volumes), start=not no_start)
    emit(fmt, inst, instance_text)


@instance.command("list")
@FORMAT_OPTION
def list_(fmt: str) -> None:
    """List instances with what the catalogue and libvirt each say."""
    emit(
        fmt,
        service().list_instances(),
        lambda xs: table(
            [
                {
                    "name": i.name,
                    "status": i.status,
                    "libvirt": i.domain_state,
                    "in_sync": i.in_sync,
                    "disks": list(i.disks.values()),
                }
                for i in xs
            ],
            ["name", "status", "libvirt", "in_sync", "disks"],
        ),
    )


@instance.command("show")
@click.argument("name")
@FORMAT_OPTION
def show(name: str, fmt: str) -> None:
    """Show an instance; says when the catalogue and libvirt disagree."""
    emit(fmt, service().show(name), instance_text)


@instance.command("start")
@click.argument("name")
@FORMAT_OPTION
def start(name: str, fmt: str) -> None:
    """Start an instance (its definition is rebuilt from the catalogue first)."""
    emit(fmt, service().start(name), instance_text)


@instance.command("stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Power off at once instead of asking the guest.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before forcing.")
@FORMAT_OPTION
def stop(name: str, force: bool, timeout: float, fmt: str) -> None:
    """Stop an instance: ask the guest, then force after --timeout."""
    emit(fmt, service().stop(name, force=force, timeout=timeout), instance_text)


@instance.command("reboot")
@click.argument("name")
@FORMAT_OPTION
def reboot(name: str, fmt: str) -> None:
    """Reset an instance."""
    emit(fmt, service().reboot(name), instance_text)


@instance.command("delete")
@click.argument("name")
@FORMAT_OPTION
def delete(name: str, fmt: str) -> None:
    """Delete an instance and its root disk (attached volumes are kept)."""
    result = service().delete(name)
    emit(fmt, {"instance": name, "result": result}, lambda r: f"{name}: {result}")


@instance.command("attach")
@click.argument("name")
@click.argument("volume")
@POOL_OPTION
@FORMAT_OPTION
def attach(name: str, volume: str, pool: str | None, fmt: str) -> None:
    """Attach a volume (of any pool) as the next free disk (live when the instance runs)."""
    emit(fmt, service().attach(name, volume, pool), instance_text)


@instance.command("detach")
@click.argument("name")
@click.argument("volume")
@POOL_OPTION
@FORMAT_OPTION
def detach(name: str, volume: str, pool: str | None, fmt: str) -> None:
    """Detach a volume (not the root disk)."""
    emit(fmt, service().detach(name, volume, pool), instance_text)


@instance.command("image-create")
@click.argument("name")
@click.argument("image_name")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="auto",
    show_default=True,
    help="cold: save the guest, copy, resume. live: block copy while it runs. "
    "direct: RBD snapshot, clone, flatten (root disk and images on one Ceph cluster). "
    "auto: direct on RBD, else live when libvirt/QEMU allow it and the instance runs, "
    "else cold.",
)
@click.option(
    "--quiesce",
    type=click.Choice(QUIESCE),
    default="auto",
    show_default=True,
    help="Freeze the guest's file systems through its agent: auto (when an agent "
    "answers; else the image is crash-consistent), required (fail without agent), off.",
)
@click.option(
    "--flatten",
    type=click.Choice(FLATTEN),
    default="now",
    show_default=True,
    help="Direct flow (RBD): flatten the image's clone now, in a background job "
    "(usable at once), or never (it keeps depending on the instance's disk).",
)
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE")
@FORMAT_OPTION
def image_create(
    name: str,
    image_name: str,
    mode: str,
    quiesce: str,
    flatten: str,
    props: tuple[str, ...],
    fmt: str,
) -> None:
    """Make a new, independent image from the root disk of instance NAME (nova's snapshot)."""
    ctx = context(click.get_current_context())
    with progress_bar("image-create", fmt) as bar:
        img = ImageCreateService(ctx).create(
            name,
            image_name,
            mode=mode,
            quiesce=quiesce,
            flatten=flatten,
            properties=parse_properties(list(props)),
            progress=bar,
        )
    emit(fmt, img, image_text)
