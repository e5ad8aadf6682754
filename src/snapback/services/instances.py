"""Instance use-cases: virtual machines whose disks are volumes, run by libvirt.

The root disk is a copy-on-write clone of the image's protected ``base``
snapshot, as nova does on RBD. An image may name a kernel and a ramdisk image
(glance's ``kernel_id``/``ramdisk_id`` properties) and ``os_command_line`` to
boot directly. The domain definition is rebuilt from the catalogue on every
start, so it always points at the volumes' current files (instance_domain.py).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from snapback.catalog.models import Instance, InstanceDisk, Volume
from snapback.domain.errors import Conflict, InvalidInput, NotFound
from snapback.domain.models import ImageStatus, OperationStatus, VolumeStatus
from snapback.domain.names import SnapshotRef, validate_name
from snapback.drivers.hypervisor.domain_xml import DomainSpec
from snapback.drivers.hypervisor.libvirt_driver import DomainState
from snapback.services import instance_domain, journal
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from snapback.services.images import BASE_SNAPSHOT, ImageService
from snapback.services.views import InstanceView
from snapback.services.volumes import VolumeService, purge, volume_lock

CREATE = "instance.create"
LIVE = ("building", "active", "shutoff", "error")
TARGETS = [f"vd{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


@dataclass(frozen=True)
class BootFiles:
    """An instance's own kernel (and ramdisk) images and command line."""

    kernel_id: str
    ramdisk_id: str | None
    cmdline: str


class InstanceService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.volumes = VolumeService(ctx)
        self.images = ImageService(ctx)

    # -- reading ---------------------------------------------------------
    def find(self, name: str) -> Instance:
        validate_name(name, "instance name")
        with self.ctx.sessions() as s:
            inst = s.scalars(
                select(Instance).where(Instance.name == name, Instance.status.in_(LIVE))
            ).first()
            if inst is None:
                raise NotFound(f"instance {name} does not exist")
            return inst

    def view(self, inst_id: str) -> InstanceView:
        with self.ctx.sessions() as s:
            inst = s.get(Instance, inst_id)
            assert inst is not None
            disks = {}
            for d in inst.disks:
                vol = s.get(Volume, d.volume_id)
                disks[d.target] = f"{vol.pool}/{vol.name}" if vol else "?"
            state = self.ctx.hypervisor.state(inst.domain_name)
            expected = {"active": DomainState.RUNNING, "shutoff": DomainState.SHUTOFF}
            agrees = expected.get(inst.status) in (None, state)
            return InstanceView(
                id=inst.id,
                name=inst.name,
                status=inst.status,
                domain=inst.domain_name,
                domain_state=state.value,
                in_sync=agrees,
                image=inst.image_id,
                memory_mib=inst.memory_mib,
                vcpus=inst.vcpus,
                disks=disks,
                console=str(self.console_path(inst.id)),
                created_at=inst.created_at,
            )

    def show(self, name: str) -> InstanceView:
        return self.view(self.find(name).id)

    def list_instances(self) -> list[InstanceView]:
        with self.ctx.sessions() as s:
            ids = s.scalars(
                select(Instance.id).where(Instance.status.in_(LIVE)).order_by(Instance.name)
            ).all()
        return [self.view(i) for i in ids]

    def console_path(self, inst_id: str) -> Path:
        return instance_domain.console_path(self.ctx, inst_id)

    # -- domain definition (instance_domain.py) ----------------------------
    def spec(self, inst_id: str) -> DomainSpec:
        """The domain as the catalogue says it should be, with the volumes' current files."""
        return instance_domain.domain_spec(self.ctx, self.images, inst_id)

    # -- life cycle ------------------------------------------------------
    def create(
        self,
        name: str,
        image_ref: str,
        memory_mib: int = 256,
        vcpus: int = 1,
        volumes: list[str] | None = None,
        start: bool = True,
    ) -> InstanceView:
        validate_name(name, "instance name")
        img = self.images.show(image_ref)
        if img.status != ImageStatus.ACTIVE or img.volume is None:
            raise InvalidInput(f"image {image_ref} is not an active disk image")
        extra = [self._attachable(v) for v in volumes or []]
        with self.ctx.transaction() as s:
            inst_id = _add_row(s, name, image_id=img.id, memory_mib=memory_mib, vcpus=vcpus)
        with journal.operation(self.ctx, CREATE, name, instance_id=inst_id) as op:
            op.step("row")
            image_volume = img.volume.split("/", 1)[1]
            root = self.volumes.clone(
                SnapshotRef(image_volume, BASE_SNAPSHOT),
                f"{name}-root",
                pool=self.ctx.settings.image_pool,
                dest_pool=self.ctx.settings.default_pool,
            )
            op.step("root", volume_id=root.id)
            with self.ctx.transaction() as s:
                s.add(InstanceDisk(instance_id=inst_id, target="vda", volume_id=root.id, root=True))
                for target, vol_id in zip(TARGETS[1:], extra, strict=False):
                    s.add(InstanceDisk(instance_id=inst_id, target=target, volume_id=vol_id))
            self._define(op, inst_id, start)
        return self.view(inst_id)

    def adopt(
        self,
        name: str,
        disks: list[tuple[str, str, bool]],
        *,
        memory_mib: int,
        vcpus: int,
        image_id: str | None,
        boot: BootFiles | None = None,
        start: bool = False,
    ) -> InstanceView:
        """An instance over existing volumes ((target, volume id, root) each), as a
        restore makes one, booting ``boot`` when given, else what its image says; a
        failure leaves no instance (the volumes are the caller's)."""
        validate_name(name, "instance name")
        with self.ctx.transaction() as s:
            inst_id = _add_row(
                s, name, image_id=image_id, memory_mib=memory_mib, vcpus=vcpus, boot=boot
            )
            for target, vol_id, root in disks:
                s.add(InstanceDisk(instance_id=inst_id, target=target, volume_id=vol_id, root=root))
        with journal.operation(self.ctx, CREATE, name, instance_id=inst_id) as op:
            op.step("row")
            self._define(op, inst_id, start)
        return self.view(inst_id)

    def _define(self, op: journal.OpHandle, inst_id: str, start: bool) -> None:
        """Define the domain (step ``defined``), start it when asked (``started``), then
        set the status to match."""
        self.ctx.hypervisor.define(self.spec(inst_id))
        op.step("defined")
        if start:
            self.ctx.hypervisor.start(self._domain(inst_id))
            op.step("started")
        self._set_status(inst_id, "active" if start else "shutoff")

    def _attachable(self, name: str, pool: str | None = None) -> str:
        with self.ctx.sessions() as s:
            vol = live_volume(s, pool or self.ctx.settings.default_pool, name)
            if vol.read_only:
                raise InvalidInput(f"volume {name} is read-only")
            user = s.scalars(
                select(Instance.name)
                .join(InstanceDisk)
                .where(InstanceDisk.volume_id == vol.id, Instance.status.in_(LIVE))
            ).first()
            if user:
                raise Conflict(f"volume {name} is attached to instance {user}")
            return vol.id

    def _domain(self, inst_id: str) -> str:
        with self.ctx.sessions() as s:
            inst = s.get(Instance, inst_id)
            assert inst is not None
            return inst.domain_name

    def _set_status(self, inst_id: str, status: str) -> None:
        with self.ctx.transaction() as s:
            inst = s.get(Instance, inst_id)
            assert inst is not None
            inst.status, inst.updated_at = status, time.time()

    def start(self, name: str) -> InstanceView:
        """Start the guest; waits while a backup reads one of its stopped disks."""
        inst = self.find(name)
        with self.ctx.sessions() as s:
            row = s.get(Instance, inst.id)
            vol_ids = sorted(d.volume_id for d in row.disks) if row else []
        with contextlib.ExitStack() as locks:
            for vol_id in vol_ids:
                locks.enter_context(self.ctx.lock(volume_lock(vol_id), timeout=None))
            if self.ctx.hypervisor.state(inst.domain_name) is not DomainState.RUNNING:
                self.ctx.hypervisor.redefine(self.spec(inst.id))
                self.ctx.hypervisor.start(inst.domain_name)
            self._set_status(inst.id, "active")
        return self.view(inst.id)

    def stop(self, name: str, *, force: bool = False, timeout: float = 30.0) -> InstanceView:
        inst = self.find(name)
        if force:
            self.ctx.hypervisor.destroy(inst.domain_name)
        else:
            self.ctx.hypervisor.shutdown(inst.domain_name, timeout)
        self._set_status(inst.id, "shutoff")
        return self.view(inst.id)

    def reboot(self, name: str) -> InstanceView:
        inst = self.find(name)
        self.ctx.hypervisor.reboot(inst.domain_name)
        return self.view(inst.id)

    def delete(self, name: str) -> str:
        inst = self.find(name)
        _teardown(self.ctx, inst.id)
        return "deleted"

    def attach(self, name: str, volume: str, pool: str | None = None) -> InstanceView:
        inst = self.find(name)
        vol_id = self._attachable(volume, pool)
        with self.ctx.transaction() as s:
            row = s.get(Instance, inst.id)
            assert row is not None
            used = {d.target for d in row.disks}
            target = next(t for t in TARGETS if t not in used)
            s.add(InstanceDisk(instance_id=inst.id, target=target, volume_id=vol_id))
        self._apply_disks(inst.id)
        return self.view(inst.id)

    def detach(self, name: str, volume: str, pool: str | None = None) -> InstanceView:
        inst = self.find(name)
        with self.ctx.transaction() as s:
            vol = live_volume(s, pool or self.ctx.settings.default_pool, volume)
            disk = s.scalars(
                select(InstanceDisk).where(
                    InstanceDisk.instance_id == inst.id, InstanceDisk.volume_id == vol.id
                )
            ).first()
            if disk is None:
                raise NotFound(f"volume {volume} is not attached to instance {name}")
            if disk.root:
                raise InvalidInput(f"{volume} is the root disk of {name}; it cannot be detached")
            target = disk.target
            s.delete(disk)
        self._apply_disks(inst.id, removed=target)
        return self.view(inst.id)

    def _apply_disks(self, inst_id: str, removed: str | None = None) -> None:
        """Update the definition, and the running domain when it runs."""
        spec = self.spec(inst_id)
        hv = self.ctx.hypervisor
        if hv.state(spec.name) is DomainState.RUNNING:
            if removed:
                hv.detach_disk(spec.name, removed)
            else:
                hv.attach_disk(spec.name, spec.disks[-1])
        hv.redefine(spec)


def _add_row(
    s: Session,
    name: str,
    *,
    image_id: str | None,
    memory_mib: int,
    vcpus: int,
    boot: BootFiles | None = None,
) -> str:
    """A ``building`` instance row named ``name`` (Conflict when a live one has the name),
    added to the session; its id."""
    if s.scalars(
        select(Instance.id).where(Instance.name == name, Instance.status.in_(LIVE))
    ).first():
        raise Conflict(f"instance {name} already exists")
    inst_id = str(uuid.uuid4())
    s.add(
        Instance(
            id=inst_id,
            name=name,
            status="building",
            image_id=image_id,
            domain_name=f"snapback-{inst_id[:8]}",
            memory_mib=memory_mib,
            vcpus=vcpus,
            kernel_id=boot.kernel_id if boot else None,
            ramdisk_id=boot.ramdisk_id if boot else None,
            os_command_line=boot.cmdline if boot else None,
        )
    )
    return inst_id


def _teardown(ctx: Context, inst_id: str) -> None:
    """Stop and undefine the domain, remove the root volume, forget the instance."""
    with ctx.sessions() as s:
        inst = s.get(Instance, inst_id)
        assert inst is not None
        domain = inst.domain_name
        roots = [d.volume_id for d in inst.disks if d.root]
    if ctx.hypervisor.state(domain) is not DomainState.MISSING:
        ctx.hypervisor.destroy(domain)
        ctx.hypervisor.undefine(domain)
    with ctx.transaction() as s:
        row = s.get(Instance, inst_id)
        assert row is not None
        row.disks = []
        row.status = "deleted"
    volumes = VolumeService(ctx)
    for vol_id in roots:
        if volumes.dependents(vol_id):  # an image still clones a snapshot of it: gc finishes
            volumes._set_status(vol_id, VolumeStatus.PENDING_DELETE)
        else:
            purge(ctx, vol_id)


@journal.recovery(CREATE)
def _recover_create(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    inst_id = op.payload["instance_id"]
    root = op.data("root").get("volume_id")
    if op.reached("started"):
        with ctx.transaction() as s:
            row = s.get(Instance, inst_id)
            if row is not None and row.status == "building":
                row.status = "active"
        return OperationStatus.RECOVERED
    _teardown(ctx, inst_id)
    if root:
        purge(ctx, root)
    return OperationStatus.ROLLED_BACK
