"""``instance image-create``: nova's snapshot of an instance's root disk into a new image.

Two flows, as nova's libvirt driver has them:

- **cold**: detach PCI host devices, ``managedSave`` the guest (its memory goes
  to disk and it stops), copy the root disk with ``qemu-img convert``, start the
  guest again (it resumes where it stopped), re-attach the devices, upload. On a
  stopped instance only the copy happens.
- **live**: make a qcow2 delta backed by the disk's backing file with the disk's
  size, undefine the domain (libvirt copies only a transient domain's disks),
  shallow ``blockCopy`` into the delta, wait until the mirror is ready, end the
  job *without* pivot (that instant is the point in time), define the domain
  again, ``qemu-img convert`` delta + backing into one image, upload.

With a guest agent the file systems are frozen around the point in time (the
live flow freezes only from mirror-ready to the end of the job). Every step is
journaled; the one recovery function (after an error or after a crash) ends our
block job, defines the domain again, resumes a saved guest, thaws, and rolls the
half image back, so the instance is left as it was and no temp file stays.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from snapback.catalog.models import Image, ImageProperty, Instance, InstanceDisk, Volume
from snapback.domain.errors import InvalidInput
from snapback.domain.models import DiskFormat, ImageStatus, Progress
from snapback.domain.names import validate_name
from snapback.drivers.hypervisor import snapshot_ops as ops
from snapback.drivers.hypervisor.libvirt_driver import DomainState
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.storage.base import ProgressFn
from snapback.services import image_create_rbd as rbd_flow
from snapback.services import image_result as result
from snapback.services import journal
from snapback.services.context import Context
from snapback.services.image_create_recovery import KIND, recover
from snapback.services.image_result import Clock
from snapback.services.images import ImageService
from snapback.services.instances import InstanceService
from snapback.services.views import ImageView
from snapback.services.volumes import volume_lock

MODES = ("auto", "cold", "live", "direct")
QUIESCE = ("auto", "required", "off")
READY_TIMEOUT_S = 3600.0

__all__ = ["KIND", "MODES", "QUIESCE", "ImageCreateService", "recover"]


@dataclass
class Plan:
    inst_id: str
    inst_name: str
    domain: str
    target: str
    volume_id: str
    pool: str
    storage_name: str
    base_image: str | None
    base_props: dict[str, str]
    running: bool
    flow: str
    reason: str
    quiesce: str  # auto | required | off, after the base image's os_require_quiesce


@dataclass(frozen=True)
class _RootDisk:
    target: str
    volume_id: str
    pool: str
    storage_name: str
    base_props: dict[str, str]  # the base image's properties ({} without one)


class ImageCreateService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.instances = InstanceService(ctx)
        self.images = ImageService(ctx)

    # -- planning (nothing changes here) ----------------------------------------
    def plan(self, instance: str, mode: str, quiesce: str) -> Plan:
        if mode not in MODES:
            raise InvalidInput(f"unknown mode {mode!r} (use {', '.join(MODES)})")
        if quiesce not in QUIESCE:
            raise InvalidInput(f"unknown quiesce setting {quiesce!r} (use {', '.join(QUIESCE)})")
        inst = self.instances.find(instance)
        root = self._root_disk(inst, instance)
        running = self._is_running(inst, instance)
        direct = rbd_flow.same_cluster(self.ctx, root.pool, self.ctx.settings.image_pool)
        on_rbd = self.ctx.settings.pools[root.pool].driver == "rbd"
        flow, reason = self._pick_flow(mode, running, instance, direct, on_rbd)
        if root.base_props.get("os_require_quiesce", "").lower() in ("yes", "true", "1"):
            quiesce = "off" if quiesce == "off" else "required"
        if running:
            self._preflight(inst.domain_name, root.target, quiesce)
        return Plan(
            inst.id,
            inst.name,
            inst.domain_name,
            root.target,
            root.volume_id,
            root.pool,
            root.storage_name,
            inst.image_id,
            root.base_props,
            running,
            flow,
            reason,
            quiesce,
        )

    def _root_disk(self, inst: Instance, instance: str) -> _RootDisk:
        """The instance's root disk and its base image's properties, from the catalogue."""
        with self.ctx.sessions() as s:
            root = s.scalars(
                select(InstanceDisk).where(
                    InstanceDisk.instance_id == inst.id, InstanceDisk.root.is_(True)
                )
            ).first()
            if root is None:
                raise InvalidInput(f"instance {instance} has no root disk")
            vol = s.get(Volume, root.volume_id)
            assert vol is not None
            base = s.get(Image, inst.image_id) if inst.image_id else None
            base_props = {p.key: p.value for p in base.properties} if base else {}
            return _RootDisk(root.target, vol.id, vol.pool, vol.storage_name, base_props)

    def _is_running(self, inst: Instance, instance: str) -> bool:
        """Whether the guest runs (or is paused); its domain must exist."""
        state = self.ctx.hypervisor.state(inst.domain_name)
        if state is DomainState.MISSING:
            raise InvalidInput(
                f"instance {instance} has no libvirt domain {inst.domain_name}; "
                "'snapback gc' restores what a crash left behind"
            )
        return state in (DomainState.RUNNING, DomainState.PAUSED)

    def _preflight(self, domain: str, target: str, quiesce: str) -> None:
        """Fail before any change on a running guest: a block job in the way, a mute agent."""
        hv = self.ctx.hypervisor
        ops.ensure_no_block_job(hv, domain, target)
        if quiesce == "required":
            ops.agent_ping(hv, domain)

    def _pick_flow(
        self, mode: str, running: bool, instance: str, direct: bool, on_rbd: bool
    ) -> tuple[str, str]:
        if mode == "direct" and not direct:
            raise InvalidInput(
                "the direct flow needs the root disk and the image pool on one Ceph cluster"
            )
        if mode == "live" and on_rbd:
            raise InvalidInput(
                "the live flow copies a qcow2 file; an RBD root disk takes --mode direct (or auto)"
            )
        if mode in ("auto", "direct") and direct:
            return "direct", "asked for" if mode == "direct" else "root disk and images on RBD"
        if not running:
            if mode == "live":
                raise InvalidInput(
                    f"instance {instance} is not running; the live flow needs a running "
                    "guest (use --mode cold or auto)"
                )
            return "cold", "the instance is not running"
        if mode == "cold":
            return "cold", "asked for"
        supported, why = ops.live_snapshot_supported(self.ctx.hypervisor)
        if mode == "live":
            if not supported:
                raise InvalidInput(f"the live flow is not supported here: {why}")
            return "live", "asked for"
        return ("live", why) if supported else ("cold", why)

    # -- the flow ------------------------------------------------------------------
    def create(
        self,
        instance: str,
        image_name: str,
        *,
        mode: str = "auto",
        quiesce: str = "auto",
        flatten: str = "now",
        properties: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> ImageView:
        validate_name(image_name, "image name")
        if flatten not in rbd_flow.FLATTEN:
            raise InvalidInput(f"unknown flatten mode {flatten!r} (use now, background, never)")
        plan = self.plan(instance, mode, quiesce)
        clock = Clock(time.monotonic())
        with (
            self.ctx.lock(f"instance-{plan.inst_id}", timeout=0),
            self.ctx.lock(volume_lock(plan.volume_id)),
        ):
            image_id = self._new_image(image_name)
            with journal.operation(
                self.ctx,
                KIND,
                plan.inst_name,
                instance_id=plan.inst_id,
                image_id=image_id,
                domain=plan.domain,
                disk=plan.target,
                flow=plan.flow,
                running=plan.running,
                quiesce=plan.quiesce,
                root_volume_id=plan.volume_id,
                flatten=flatten,
            ) as op:
                op.step("queued")
                self.images._set_status(image_id, ImageStatus.SAVING)
                if plan.flow == "direct":
                    self._direct(op, plan, image_id, flatten, clock, properties or {}, progress)
                    return self.images.show(image_id)
                self._through_file(op, plan, image_id, clock, properties or {}, progress)
        return self.images.show(image_id)

    def _through_file(
        self,
        op: journal.OpHandle,
        plan: Plan,
        image_id: str,
        clock: Clock,
        extra: dict[str, str],
        progress: ProgressFn | None,
    ) -> None:
        """The cold and live flows: copy the root disk into a qcow2 work file, upload it."""
        work = self.ctx.settings.work / op.id
        work.mkdir(mode=0o755, parents=True)
        work.chmod(0o755)
        op.step("work", path=str(work))
        out = work / "image.qcow2"
        if plan.flow == "live":
            consistency = self._live(op, plan, work, out, clock, progress)
        else:
            consistency = self._cold(op, plan, out, clock, progress)
        upload_start = time.monotonic()
        size, digest = result.sha256_file(out)
        virtual_size, vol_id, _ = self.images._store_disk(
            op, image_id, out, DiskFormat.QCOW2, progress, consume=True
        )
        clock.upload = time.monotonic() - upload_start
        props = result.properties(plan, consistency, clock, extra)
        result.activate(self.ctx, image_id, vol_id, size, digest, virtual_size, props)
        op.step("activated")
        shutil.rmtree(work, ignore_errors=True)

    def _direct(
        self,
        op: journal.OpHandle,
        plan: Plan,
        image_id: str,
        flatten: str,
        clock: Clock,
        extra: dict[str, str],
        progress: ProgressFn | None,
    ) -> None:
        flow = rbd_flow.DirectFlow(self.ctx)
        frozen: list[bool] = []

        def freeze() -> bool:
            frozen.append(self._freeze(op, plan))
            return frozen[-1]

        found = flow.run(
            op,
            image_id=image_id,
            root_id=plan.volume_id,
            flatten=flatten,
            freeze=freeze,
            thaw=lambda: ops.fs_thaw(self.ctx.hypervisor, plan.domain, wait=ops.THAW_WAIT_S),
            progress=progress,
        )
        clock.pause = float(found.pop("snapback.time_guest_pause_s"))
        clock.copy = float(found.pop("snapback.time_copy_s"))
        was_frozen = found.pop("snapback.consistency_frozen") == "yes"
        consistency = (
            "quiesced" if was_frozen else "crash-consistent" if plan.running else "stopped"
        )
        props = result.properties(plan, consistency, clock, {**found, **extra})
        with self.ctx.transaction() as s:
            img = s.get(Image, image_id)
            assert img is not None
            img.status = ImageStatus.ACTIVE
            img.properties = [ImageProperty(key=k, value=v) for k, v in sorted(props.items())]
        op.step("activated")
        flow.after_activation(op, image_id, flatten)

    def _new_image(self, name: str) -> str:
        with self.ctx.transaction() as s:
            img = Image(name=name, status=ImageStatus.QUEUED, disk_format=DiskFormat.QCOW2.value)
            s.add(img)
            s.flush()
            return img.id

    def _freeze(self, op: journal.OpHandle, plan: Plan) -> bool:
        """Freeze the guest's file systems when an agent answers (or fail if required)."""
        count = (
            ops.quiesce(self.ctx.hypervisor, plan.domain, plan.quiesce) if plan.running else None
        )
        if count is None:
            return False
        op.step("frozen", filesystems=count)
        return True

    def _thaw(self, op: journal.OpHandle, plan: Plan) -> None:
        ops.fs_thaw(self.ctx.hypervisor, plan.domain, wait=ops.THAW_WAIT_S)
        op.step("thawed")

    def _cold(
        self,
        op: journal.OpHandle,
        plan: Plan,
        out: Path,
        clock: Clock,
        progress: ProgressFn | None,
    ) -> str:
        hv = self.ctx.hypervisor
        frozen, devices, paused_at = False, [], 0.0
        if plan.running:
            frozen = self._freeze(op, plan)
            paused_at = time.monotonic()
            devices = ops.hostdevs(hv, plan.domain)
            for dev in devices:
                ops.detach_device(hv, plan.domain, dev)
            op.step("detached", devices=devices)
            ops.managed_save(hv, plan.domain)
            op.step("saved")
        copy_start = time.monotonic()
        self.ctx.pool(plan.pool).export_volume(
            plan.storage_name, str(out), DiskFormat.QCOW2, progress=progress
        )
        clock.copy = time.monotonic() - copy_start
        op.step("extracted")
        if not plan.running:
            return "stopped"
        hv.start(plan.domain)
        op.step("restarted")
        for dev in devices:
            ops.attach_device(hv, plan.domain, dev)
        op.step("reattached")
        if frozen:
            self._thaw(op, plan)
        clock.pause = time.monotonic() - paused_at
        return "quiesced" if frozen else "crash-consistent"

    def _live(
        self,
        op: journal.OpHandle,
        plan: Plan,
        work: Path,
        out: Path,
        clock: Clock,
        progress: ProgressFn | None,
    ) -> str:
        hv = self.ctx.hypervisor
        head = self.ctx.pool(plan.pool).attachment(plan.storage_name)
        info = qemu_img.info(head.source, head.format)
        size = int(info["virtual-size"])
        delta = work / "delta.qcow2"
        qemu_img.create(str(delta), size, backing=info.get("full-backing-filename"))
        delta.chmod(0o644)
        xml = hv.xml(plan.domain, inactive=True)
        op.step("prepared", xml=xml, delta=str(delta))
        hv.undefine(plan.domain)
        op.step("undefined")
        copy_start = time.monotonic()
        ops.block_copy(hv, plan.domain, plan.target, str(delta))
        op.step("copying")

        def on_job(cur: int, end: int) -> None:
            if progress is not None:
                progress(Progress(cur, end))

        ops.wait_ready(hv, plan.domain, plan.target, timeout=READY_TIMEOUT_S, on_progress=on_job)
        frozen = self._freeze(op, plan)
        frozen_at = time.monotonic()
        ops.abort_block_job(hv, plan.domain, plan.target)
        op.step("copied")
        if frozen:
            self._thaw(op, plan)
            clock.pause = time.monotonic() - frozen_at
        ops.define_xml(hv, xml)
        op.step("redefined")
        qemu_img.convert(str(delta), "qcow2", str(out), "qcow2", progress=progress, total=size)
        delta.unlink()
        clock.copy = time.monotonic() - copy_start
        op.step("extracted")
        return "quiesced" if frozen else "crash-consistent"
