"""What a backup is of: one volume, or an instance (all its disks at one point in
time, with its definition), and what the record says about it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from snapback.catalog.models import Image, Instance, Volume
from snapback.domain.errors import InvalidInput, NotFound
from snapback.domain.models import BootFileFormat
from snapback.drivers.hypervisor import snapshot_ops as ops
from snapback.drivers.hypervisor.libvirt_driver import DomainState
from snapback.services import journal
from snapback.services.backup_capture import DiskPlan
from snapback.services.context import Context

QUIESCE = ("auto", "required", "off")
Held = Literal["frozen", "paused"] | None  # how a running guest is held for its points
BOOT_ROLES = {"kernel_id": "kernel", "ramdisk_id": "ramdisk"}
BOOT_FORMATS = {"kernel_id": BootFileFormat.AKI, "ramdisk_id": BootFileFormat.ARI}


@dataclass(frozen=True)
class BootFile:
    """A kernel or ramdisk an instance boots, stored with its backup (restorable
    without the catalogue that had its image)."""

    role: str  # "kernel" | "ramdisk"
    image_id: str
    image_name: str
    path: str


@dataclass
class Job:
    kind: str  # "volume" | "instance"
    source: dict[str, Any]
    key: tuple[str, str]  # the record's source field that finds the parent backup
    disks: list[tuple[str, Volume]]
    domain: str | None = None
    running: bool = False
    quiesce: str = "off"
    instance: dict[str, Any] | None = None
    consistency: str = "stopped"
    hypervisor: Any = field(default=None, repr=False)
    live_local: bool = False  # running with local qcow2 disks: a libvirt backup job reads them
    boot: list[BootFile] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.kind == "instance":
            return f"instance {self.source['name']}"
        return f"{self.source['pool']}/{self.source['name']}"

    def hold(self, op: journal.OpHandle, points: int) -> Held:
        """Stop the running guest's writes while its disks' points are taken: freeze
        its file systems when an agent answers (quiesced); otherwise pause it when the
        points are more than one action (several RBD snapshots, or a libvirt job and
        RBD snapshots), so that they are one instant (crash-consistent). One point is
        one instant by itself. ``"frozen"``, ``"paused"`` or None; ``release`` ends it."""
        if not self.running:
            return None
        self.consistency = "crash-consistent"
        if self.domain is None:
            return None
        count = ops.quiesce(self.hypervisor, self.domain, self.quiesce)
        if count is not None:
            op.step("frozen", filesystems=count)
            self.consistency = "quiesced"
            return "frozen"
        if points > 1 and self.hypervisor.state(self.domain) is DomainState.RUNNING:
            op.step("pausing")  # before the call: recovery resumes whatever it did
            ops.pause(self.hypervisor, self.domain)
            op.step("paused")
            return "paused"
        return None

    def release(self, op: journal.OpHandle, held: Held) -> None:
        if held is None:
            return
        assert self.domain is not None
        if held == "frozen":
            ops.fs_thaw(self.hypervisor, self.domain, wait=ops.THAW_WAIT_S)
            op.step("thawed")
        elif held == "paused":
            ops.resume(self.hypervisor, self.domain)
            op.step("resumed")

    def record(
        self,
        backup_id: str,
        parent: dict[str, Any] | None,
        plans: list[DiskPlan],
        disks: list[dict[str, Any]],
        stats: dict[str, Any],
    ) -> dict[str, Any]:
        kinds = {p.tracking for p in plans}
        notes = [
            f"{p.target}: {p.note}" if len(plans) > 1 else str(p.note) for p in plans if p.note
        ]
        kept = [p.snap for p in plans if p.snap]
        return {
            "id": backup_id,
            "created_at": time.time(),
            "kind": self.kind,
            "source": self.source,
            "parent": parent["id"] if parent else None,
            "mode": "incremental" if parent else "full",
            "change_tracking": kinds.pop() if len(kinds) == 1 else "mixed",
            "note": "; ".join(notes) or None,
            "source_snapshot": kept[0] if len(kept) == 1 and self.kind == "volume" else None,
            "consistency": self.consistency,
            "disks": disks,
            "instance": self.instance,
            "stats": stats,
        }


class JobHold:
    """``Job.hold`` and ``Job.release`` as a context manager: what a driver enters
    around the storage's snapshot call alone (``StoragePool.create_snapshot``)."""

    def __init__(self, job: Job, op: journal.OpHandle, points: int) -> None:
        self.job, self.op, self.points = job, op, points
        self.held: Held = None

    def __enter__(self) -> None:
        self.held = self.job.hold(self.op, self.points)

    def __exit__(self, *exc: object) -> None:
        self.job.release(self.op, self.held)


def instance_job(ctx: Context, name: str, quiesce: str) -> Job:
    """All disks of an instance, its definition, and whether it runs."""
    from snapback.services.instances import InstanceService

    if quiesce not in QUIESCE:
        raise InvalidInput(f"unknown quiesce setting {quiesce!r} (use {', '.join(QUIESCE)})")
    inst = InstanceService(ctx).find(name)
    hv = ctx.hypervisor
    state = hv.state(inst.domain_name)
    if state is DomainState.MISSING:
        raise InvalidInput(
            f"instance {name} has no libvirt domain {inst.domain_name}; "
            "'snapback gc' restores what a crash left behind"
        )
    running = state in (DomainState.RUNNING, DomainState.PAUSED)
    found = _catalogued(ctx, inst.id)
    disks = found.disks
    local = [v.name for _, v in disks if ctx.pool(v.pool).tracks_changes_by == "bitmap"]
    if running and quiesce == "required":
        ops.agent_ping(hv, inst.domain_name)
    definition = {
        "name": inst.name,
        "id": inst.id,
        "memory_mib": found.memory_mib,
        "vcpus": found.vcpus,
        "image": found.image,
        "disks": [{"target": t, "volume": v.name, "root": found.roots[t]} for t, v in disks],
        "domain_xml": hv.xml(inst.domain_name),
        "state": str(state),
        "cmdline": found.cmdline,
    }
    return Job(
        kind="instance",
        source={"name": inst.name, "instance": inst.name, "instance_id": inst.id},
        key=("instance_id", inst.id),
        disks=disks,
        domain=inst.domain_name,
        running=running,
        quiesce=quiesce,
        instance=definition,
        hypervisor=hv,
        live_local=running and bool(local),
        boot=_boot_files(ctx, found.boot_refs),
    )


@dataclass(frozen=True)
class _Catalogued:
    """What the catalogue holds of an instance, read in one session."""

    disks: list[tuple[str, Volume]]
    roots: dict[str, bool]
    image: dict[str, Any] | None
    memory_mib: int
    vcpus: int
    boot_refs: dict[str, str]
    cmdline: str


def _catalogued(ctx: Context, instance_id: str) -> _Catalogued:
    with ctx.sessions() as s:
        row = s.get(Instance, instance_id)
        assert row is not None
        disks: list[tuple[str, Volume]] = []
        for d in row.disks:
            vol = s.get(Volume, d.volume_id)
            assert vol is not None
            disks.append((d.target, vol))
        img = s.get(Image, row.image_id) if row.image_id else None
        image: dict[str, Any] | None = (
            {"id": img.id, "name": img.name, "properties": {p.key: p.value for p in img.properties}}
            if img is not None
            else None
        )
        boot_refs, cmdline = _boot_refs(row, image)
        return _Catalogued(
            disks=disks,
            roots={d.target: d.root for d in row.disks},
            image=image,
            memory_mib=row.memory_mib,
            vcpus=row.vcpus,
            boot_refs=boot_refs,
            cmdline=cmdline,
        )


def _boot_refs(row: Instance, image: dict[str, Any] | None) -> tuple[dict[str, str], str]:
    """The kernel and ramdisk references and command line the instance boots with: its
    own when a restore gave it some, else its image's properties."""
    if row.kernel_id:
        own = {"kernel_id": row.kernel_id, "ramdisk_id": row.ramdisk_id}
        return {k: v for k, v in own.items() if v}, row.os_command_line or ""
    props: dict[str, str] = image["properties"] if image else {}
    return {k: props[k] for k in BOOT_ROLES if props.get(k)}, props.get("os_command_line", "")


def _boot_files(ctx: Context, refs: dict[str, str]) -> list[BootFile]:
    """The kernel and ramdisk images ``refs`` name, where they are active."""
    from snapback.services.images import ImageService

    found = []
    for prop, ref in refs.items():
        try:
            img, path = ImageService(ctx).boot_file(ref, BOOT_FORMATS[prop])
        except (NotFound, InvalidInput):
            continue  # gone: the backup holds the disks, and says so by lacking it
        found.append(BootFile(BOOT_ROLES[prop], img.id, img.name, str(path)))
    return found
