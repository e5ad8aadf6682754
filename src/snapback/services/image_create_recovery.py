"""Recovery of ``instance image-create``: put the instance back, roll the image back.

One function for both paths (DESIGN §4.3): a flow that raised, and a flow
whose process died (``gc`` or the next snapback command runs it). It looks at
libvirt's real state rather than trusting the last step alone, since a process
can die between a libvirt call and the step that records it:

1. our block copy (a mirror into this operation's work folder) is ended
   without pivot, so the guest keeps its own disk;
2. a domain the live flow undefined is defined again from the saved XML (a
   transient domain would vanish at its next shutdown; a vanished one would be
   lost);
3. a guest the cold flow saved is started again (it resumes from the save);
4. detached PCI devices are attached again, frozen file systems thawed;
5. before ``activated``: the image's volume is purged and the image ``killed``;
   the work folder goes in every case.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from snapback.catalog.models import Instance
from snapback.domain.errors import SnapbackError
from snapback.domain.models import OperationStatus
from snapback.drivers.hypervisor import snapshot_ops as ops
from snapback.drivers.hypervisor.libvirt_driver import DomainState, LibvirtHypervisor
from snapback.services import image_create_rbd as rbd_flow
from snapback.services import journal
from snapback.services.context import Context
from snapback.services.images import kill_image

KIND = "instance.image_create"


def _end_our_copy(hv: LibvirtHypervisor, domain: str, target: str, work: str | None) -> None:
    if work is None or hv.state(domain) is DomainState.MISSING:
        return
    job = ops.block_job(hv, domain, target)
    if job is not None and job.mirror and Path(job.mirror).parent == Path(work):
        ops.abort_block_job(hv, domain, target)


def _define_again(ctx: Context, hv: LibvirtHypervisor, domain: str, xml: str, inst: str) -> None:
    state = hv.state(domain)
    if state is not DomainState.MISSING and hv.is_persistent(domain):
        return
    ops.define_xml(hv, xml)
    if state is DomainState.MISSING:  # the transient domain died with us: defined, stopped
        with ctx.transaction() as s:
            row = s.get(Instance, inst)
            if row is not None:
                row.status = "shutoff"


def _resume_saved(hv: LibvirtHypervisor, domain: str) -> None:
    if hv.state(domain) is DomainState.SHUTOFF and ops.has_managed_save(hv, domain):
        hv.start(domain)


def _reattach(hv: LibvirtHypervisor, domain: str, devices: list[str]) -> None:
    for dev in devices:
        with contextlib.suppress(SnapbackError):  # attached again before the crash
            ops.attach_device(hv, domain, dev)


@journal.recovery(KIND)
def recover(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    hv = ctx.hypervisor
    domain, target = op.payload["domain"], op.payload["disk"]
    work = op.data("work").get("path")
    if op.reached("prepared") and not op.reached("redefined"):
        _end_our_copy(hv, domain, target, work)
        _define_again(ctx, hv, domain, op.data("prepared")["xml"], op.payload["instance_id"])
    if op.payload.get("running") and op.payload.get("flow") == "cold":
        if not op.reached("restarted"):
            _resume_saved(hv, domain)
        if op.reached("detached") and not op.reached("reattached"):
            _reattach(hv, domain, list(op.data("detached").get("devices", [])))
    if op.payload.get("running") and op.payload.get("quiesce") != "off":
        # only a flow that may have frozen the guest waits for the agent to come back
        ops.thaw_quietly(hv, domain, ops.THAW_WAIT_S if op.reached("frozen") else 0.0)
    if work:
        shutil.rmtree(work, ignore_errors=True)
    if op.payload.get("flow") == "direct":
        finished = rbd_flow.recover_direct(ctx, op)
        if finished is not None:
            return finished
    if op.reached("activated"):
        return OperationStatus.RECOVERED
    return kill_image(ctx, op)
