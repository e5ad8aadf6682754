"""Points in time for a backup: where each disk is read from, and what changed.

Stopped local disks and RBD disks get theirs from the storage (backup_capture).
A running instance whose disks are local qcow2 gets one libvirt backup job in
pull mode with a checkpoint ``snapback-<backup id>`` (drivers/hypervisor/
backup_job.py): all disks at one instant, the guest frozen for that instant
only, read over NBD while it keeps running. The checkpoint's bitmaps are the
same ``snapback-<id>`` bitmaps a stopped backup starts with ``qemu-img``, so
tracking carries on whether the guest runs or not between two backups.
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
from snapback.services.backup_jobs import Job
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
    frozen = job.freeze(op)
    try:
        for plan in plans:
            driver = ctx.pool(plan.pool)
            if plan.by == "bitmap":  # read before the new bitmap starts
                changed[plan.target] = cap.changes(driver, plan)
            cap.take_point(driver, plan)
    finally:
        if frozen:
            job.thaw(op)
    for plan in plans:
        if plan.by == "snapshot":
            changed[plan.target] = cap.changes(ctx.pool(plan.pool), plan)
    yield Points(
        changed,
        lambda p: cap.open_point(ctx.pool(p.pool), p),
        lambda p: cap.allocated(ctx.pool(p.pool), p),
    )


@contextlib.contextmanager
def _live(
    ctx: Context, op: journal.OpHandle, job: Job, plans: list[cap.DiskPlan]
) -> Iterator[Points]:
    hv, domain = ctx.hypervisor, job.domain
    assert domain is not None
    targets = [p.target for p in plans]
    checkpoint = plans[0].tracker
    assert checkpoint is not None
    parent = plans[0].parent_tracker if all(p.parent_tracker for p in plans) else None
    if parent and parent not in backup_job.checkpoints(hv, domain):
        with contextlib.suppress(HypervisorError):  # no such bitmap: tracking is lost
            backup_job.redefine_checkpoint(hv, domain, parent, targets)
    with contextlib.ExitStack() as stack:
        frozen = job.freeze(op)
        try:
            sock, incremental = _begin(ctx, stack, domain, targets, checkpoint, parent)
        finally:
            if frozen:
                job.thaw(op)
        op.step("exported")
        changed: dict[str, Extents | None] = {}
        for plan in plans:
            if incremental is None:
                if plan.parent is not None:
                    cap.lost(plan)
                changed[plan.target] = None
                continue
            with ExportHandle(sock, plan.target, f"backup-{plan.target}") as h:
                changed[plan.target] = h.dirty()

        def allocated(p: cap.DiskPlan) -> Extents:
            with ExportHandle(sock, p.target) as h:
                return h.allocated()

        yield Points(changed, lambda p: ExportHandle(sock, p.target), allocated)


def _begin(
    ctx: Context,
    stack: contextlib.ExitStack,
    domain: str,
    targets: list[str],
    checkpoint: str,
    parent: str | None,
) -> tuple[str, str | None]:
    """Start the job, incremental from ``parent`` when libvirt accepts it (a bitmap
    QEMU found inconsistent is refused): (NBD socket, incremental base)."""
    hv, work = ctx.hypervisor, ctx.settings.work
    if parent is not None:
        try:
            job = backup_job.pull_backup(hv, domain, targets, work, checkpoint, parent)
            return stack.enter_context(job), parent
        except HypervisorError:
            pass  # falls back to a full read compared by hashes
    job = backup_job.pull_backup(hv, domain, targets, work, checkpoint, None)
    return stack.enter_context(job), None
