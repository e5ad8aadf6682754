"""Points in time for a backup: where each disk is read from, and what changed.

Stopped local disks and RBD disks get theirs from the storage (backup_capture).
A running instance whose disks are local qcow2 gets one libvirt backup job in
pull mode with a checkpoint ``snapback-<backup id>`` (drivers/hypervisor/
backup_job.py): all disks at one instant, the guest frozen for that instant
only, read over NBD while it keeps running. Its RBD disks, if it has both kinds,
get their snapshots in that same held instant. Held means frozen through the
guest agent, or, with no agent, paused when the points are more than one action.
The checkpoint's bitmaps are the same ``snapback-<id>`` bitmaps a stopped backup
starts with ``qemu-img``, so tracking carries on whether the guest runs or not
between two backups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from snapback.drivers.hypervisor import backup_job
from snapback.drivers.hypervisor.libvirt_driver import HypervisorError
from snapback.drivers.storage.base import BlockHandle
from snapback.drivers.storage.nbd import ExportHandle
from snapback.services import backup_capture as cap
from snapback.services import journal
from snapback.services.backup_jobs import Job, JobHold
from snapback.services.context import Context

Extents = list[tuple[int, int]]


@dataclass
class Points:
    changed: dict[str, Extents | None]
    open: Callable[[cap.DiskPlan], BlockHandle]
    allocated: Callable[[cap.DiskPlan], Extents]


@contextlib.contextmanager
def points(
    ctx: Context, op: journal.OpHandle, job: Job, plans: list[cap.DiskPlan]
) -> Iterator[Points]:
    if job.live_local:
        with _live(ctx, op, job, plans) as found:
            yield found
        return
    changed: dict[str, Extents | None] = {}
    for plan in plans:
        if plan.by == "bitmap":  # read before the new bitmap starts
            changed[plan.target] = cap.changes(ctx.pool(plan.pool), plan)
    with contextlib.ExitStack() as opened:
        # every volume opened and every name checked first: a running guest is held
        # for the storage's snapshot calls alone, not while volumes open and close
        takes = [opened.enter_context(cap.prepare_point(ctx.pool(p.pool), p)) for p in plans]
        with JobHold(job, op, points=len(plans)):
            for take in takes:
                take()
    changed |= _snapshot_changes(ctx, plans)
    yield Points(
        changed,
        lambda p: cap.open_point(ctx.pool(p.pool), p),
        lambda p: cap.allocated(ctx.pool(p.pool), p),
    )


def _snapshot_changes(ctx: Context, plans: list[cap.DiskPlan]) -> dict[str, Extents | None]:
    """What changed on the disks whose points are storage snapshots (RBD)."""
    return {p.target: cap.changes(ctx.pool(p.pool), p) for p in plans if p.by == "snapshot"}


@contextlib.contextmanager
def _live(
    ctx: Context, op: journal.OpHandle, job: Job, plans: list[cap.DiskPlan]
) -> Iterator[Points]:
    """The local disks through one libvirt job; RBD disks (a mixed instance) by
    snapshots taken while the guest is held, so all are one instant."""
    hv, domain = ctx.hypervisor, job.domain
    assert domain is not None
    local = [p for p in plans if p.by == "checkpoint"]
    on_rbd = [p for p in plans if p.by == "snapshot"]
    targets, others = [p.target for p in local], [p.target for p in on_rbd]
    checkpoint = local[0].tracker
    assert checkpoint is not None
    parent = local[0].parent_tracker if all(p.parent_tracker for p in local) else None
    if parent and parent not in backup_job.checkpoints(hv, domain):
        with contextlib.suppress(HypervisorError):  # no such bitmap: tracking is lost
            backup_job.redefine_checkpoint(hv, domain, parent, targets, others)
    with contextlib.ExitStack() as stack:
        with contextlib.ExitStack() as opened:  # opened before the hold, as above
            takes = [opened.enter_context(cap.prepare_point(ctx.pool(p.pool), p)) for p in on_rbd]
            with JobHold(job, op, points=1 + len(on_rbd)):
                disks = (targets, others)
                sock, incremental = _begin(ctx, stack, domain, disks, checkpoint, parent)
                for take in takes:
                    take()
        op.step("exported")
        changed = _snapshot_changes(ctx, plans)
        for plan in local:
            if incremental is None:
                if plan.parent is not None:
                    cap.lost(plan)
                changed[plan.target] = None
                continue
            with ExportHandle(sock, plan.target, f"backup-{plan.target}") as h:
                changed[plan.target] = h.dirty()

        def read(p: cap.DiskPlan) -> BlockHandle:
            if p.by == "snapshot":
                return cap.open_point(ctx.pool(p.pool), p)
            return ExportHandle(sock, p.target)

        def allocated(p: cap.DiskPlan) -> Extents:
            if p.by == "snapshot":
                return cap.allocated(ctx.pool(p.pool), p)
            with ExportHandle(sock, p.target) as h:
                return h.allocated()

        yield Points(changed, read, allocated)


def _begin(
    ctx: Context,
    stack: contextlib.ExitStack,
    domain: str,
    disks: tuple[list[str], list[str]],
    checkpoint: str,
    parent: str | None,
) -> tuple[str, str | None]:
    """Start the job on the first disks (the others left out), incremental from
    ``parent`` when libvirt accepts it (a bitmap QEMU found inconsistent is refused):
    (NBD socket, incremental base)."""
    hv, work = ctx.hypervisor, ctx.settings.work
    targets, others = disks
    if parent is not None:
        try:
            job = backup_job.pull_backup(hv, domain, targets, work, checkpoint, parent, others)
            return stack.enter_context(job), parent
        except HypervisorError:
            pass  # falls back to a full read compared by hashes
    job = backup_job.pull_backup(hv, domain, targets, work, checkpoint, None, others)
    return stack.enter_context(job), None
