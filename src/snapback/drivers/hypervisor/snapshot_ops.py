"""What nova's snapshot flows ask of libvirt: managed save, block copy, the guest agent.

- managed save / restore (the cold flow): the guest's memory goes to libvirt's
  save file and ``start`` resumes it where it stopped;
- block jobs (the live flow): a shallow ``blockCopy`` of a disk into a qcow2
  delta we made (``REUSE_EXT``), waited for until the mirror is ready, then
  ended *without* pivot, so the guest keeps its disk and the delta holds the
  disk as it was at that instant;
- the guest agent: ``fsFreeze``/``fsThaw`` around the point in time, or, with no
  agent, a pause of the guest while several disks' points are taken;
- PCI host devices, which a save cannot carry, detached and re-attached.
"""

from __future__ import annotations

import contextlib
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapback.domain.errors import Conflict
from snapback.drivers.hypervisor.libvirt_driver import (
    DomainState,
    HypervisorError,
    LibvirtHypervisor,
    _libvirt,
)

# nova's historic minimums for its live snapshot (MIN_LIBVIRT/QEMU_LIVESNAPSHOT_VERSION)
MIN_LIBVIRT_LIVE = (1, 3, 0)
MIN_QEMU_LIVE = (2, 5, 0)
AGENT_TIMEOUT_S = 15  # only an agent that is connected but slow waits this long
THAW_WAIT_S = 30.0  # after a restore libvirt sees the agent's port again a moment later
# libvirt waits for an agent's answer for ever by default: a guest whose agent hangs
# would hang snapback (and its recovery) with it; freeze runs the guest's hooks
AGENT_RESPONSE_TIMEOUT_S = 60


class AgentUnavailable(HypervisorError):
    """No guest agent answers inside the domain."""


@dataclass(frozen=True)
class BlockJob:
    target: str
    kind: str  # copy, pull, commit, active-commit, backup, unknown
    cur: int
    end: int
    mirror: str | None  # the copy's destination file, for copy jobs
    ready: bool


def _version(code: int) -> tuple[int, int, int]:
    return code // 1_000_000, code // 1000 % 1000, code % 1000


def versions(hv: LibvirtHypervisor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(libvirt, QEMU) versions of the connected host."""
    lib = hv.call("reading libvirt version", hv.conn.getLibVersion)
    qemu = hv.call("reading QEMU version", hv.conn.getVersion)
    return _version(int(lib)), _version(int(qemu))


def live_snapshot_supported(hv: LibvirtHypervisor) -> tuple[bool, str]:
    """Whether the live flow may run here, and why (as nova decides)."""
    lib, qemu = versions(hv)
    text = f"libvirt {'.'.join(map(str, lib))}, QEMU {'.'.join(map(str, qemu))}"
    if lib < MIN_LIBVIRT_LIVE or qemu < MIN_QEMU_LIVE:
        return False, f"{text} is older than libvirt 1.3.0 / QEMU 2.5.0"
    return True, text


# -- managed save ------------------------------------------------------------
def managed_save(hv: LibvirtHypervisor, name: str) -> None:
    hv.call(f"saving the memory of {name}", hv.domain(name).managedSave, 0)


def has_managed_save(hv: LibvirtHypervisor, name: str) -> bool:
    return bool(hv.call("reading managed save", hv.domain(name).hasManagedSaveImage, 0))


# -- PCI host devices -----------------------------------------------------------
def hostdevs(hv: LibvirtHypervisor, name: str) -> list[str]:
    """The live domain's ``<hostdev>`` elements (PCI passthrough), as XML."""
    root = ET.fromstring(hv.xml(name, inactive=False))
    return [
        ET.tostring(h, encoding="unicode") for h in root.iter("hostdev") if h.get("type") == "pci"
    ]


def detach_device(hv: LibvirtHypervisor, name: str, xml: str) -> None:
    lv = _libvirt()
    dom = hv.domain(name)
    hv.call(
        f"detaching a device from {name}", dom.detachDeviceFlags, xml, lv.VIR_DOMAIN_AFFECT_LIVE
    )


def attach_device(hv: LibvirtHypervisor, name: str, xml: str) -> None:
    lv = _libvirt()
    dom = hv.domain(name)
    hv.call(f"attaching a device to {name}", dom.attachDeviceFlags, xml, lv.VIR_DOMAIN_AFFECT_LIVE)


# -- block jobs ----------------------------------------------------------------
_JOB_KINDS = {1: "pull", 2: "copy", 3: "commit", 4: "active-commit", 5: "backup"}


def block_job(hv: LibvirtHypervisor, name: str, target: str) -> BlockJob | None:
    """The block job running on disk ``target``, if any."""
    dom = hv.domain(name)
    info: dict[str, Any] = hv.call(f"reading block jobs of {name}", dom.blockJobInfo, target, 0)
    if not info:
        return None
    mirror, ready = None, False
    for disk in ET.fromstring(hv.xml(name, inactive=False)).iter("disk"):
        tgt = disk.find("target")
        m = disk.find("mirror")
        if tgt is None or tgt.get("dev") != target or m is None:
            continue
        src = m.find("source")
        mirror = m.get("file") or (src.get("file") if src is not None else None)
        ready = m.get("ready") == "yes"
    kind = _JOB_KINDS.get(int(info.get("type", 0)), "unknown")
    return BlockJob(target, kind, int(info.get("cur", 0)), int(info.get("end", 0)), mirror, ready)


def block_copy(hv: LibvirtHypervisor, name: str, target: str, dest: str) -> None:
    """Start a shallow copy of ``target`` into the existing qcow2 ``dest``."""
    lv = _libvirt()
    disk = ET.Element("disk", type="file")
    ET.SubElement(disk, "driver", type="qcow2")
    ET.SubElement(disk, "source", file=dest)
    flags = lv.VIR_DOMAIN_BLOCK_COPY_SHALLOW | lv.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    dom = hv.domain(name)
    xml = ET.tostring(disk, encoding="unicode")
    hv.call(f"starting the block copy of {name}/{target}", dom.blockCopy, target, xml, None, flags)


def wait_ready(
    hv: LibvirtHypervisor,
    name: str,
    target: str,
    *,
    timeout: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Wait until the copy on ``target`` mirrors every write (QEMU's READY)."""
    deadline = time.monotonic() + timeout
    while True:
        job = block_job(hv, name, target)
        if job is None:
            raise HypervisorError(f"the block copy of {name}/{target} ended by itself")
        if on_progress is not None and job.end:
            on_progress(job.cur, job.end)
        if job.ready:
            return
        if time.monotonic() > deadline:
            raise HypervisorError(
                f"the block copy of {name}/{target} was not ready after {timeout:.0f} s "
                f"({job.cur} of {job.end} bytes)"
            )
        time.sleep(0.1)


def abort_block_job(hv: LibvirtHypervisor, name: str, target: str) -> None:
    """End the job without pivot and wait for it to go (the guest keeps its disk)."""
    dom = hv.domain(name)
    hv.call(f"ending the block job on {name}/{target}", dom.blockJobAbort, target, 0)


def ensure_no_block_job(hv: LibvirtHypervisor, name: str, target: str) -> None:
    job = block_job(hv, name, target)
    if job is not None:
        dest = f" into {job.mirror}" if job.mirror else ""
        raise Conflict(
            f"disk {target} of domain {name} has a running {job.kind} block job{dest} "
            f"({job.cur} of {job.end} bytes); wait for it to end or stop it with "
            f"'virsh blockjob {name} {target} --abort'"
        )


# -- guest agent --------------------------------------------------------------------
def _agent_error(name: str, exc: Any) -> AgentUnavailable:
    return AgentUnavailable(
        f"no guest agent answers in {name}: {exc.get_error_message()} "
        "(install and start qemu-guest-agent in the guest)"
    )


def agent_ping(hv: LibvirtHypervisor, name: str) -> None:
    """Raise AgentUnavailable unless the guest agent answers within a few seconds."""
    import libvirt_qemu

    lv = _libvirt()
    dom = hv.domain(name)
    try:
        reply = libvirt_qemu.qemuAgentCommand(
            dom, json.dumps({"execute": "guest-ping"}), AGENT_TIMEOUT_S, 0
        )
    except lv.libvirtError as exc:
        raise _agent_error(name, exc) from exc
    if reply is None:
        raise AgentUnavailable(f"the guest agent of {name} gave no answer")


def _bounded_agent(hv: LibvirtHypervisor, name: str) -> Any:
    """The domain, with libvirt's wait for its agent's answers bounded."""
    dom = hv.domain(name)
    with contextlib.suppress(_libvirt().libvirtError):  # not running: the call says so
        dom.agentSetResponseTimeout(AGENT_RESPONSE_TIMEOUT_S, 0)
    return dom


def fs_freeze(hv: LibvirtHypervisor, name: str) -> int:
    """Freeze the guest's file systems; returns how many were frozen."""
    lv = _libvirt()
    try:
        return int(_bounded_agent(hv, name).fsFreeze(None, 0))
    except lv.libvirtError as exc:
        raise _agent_error(name, exc) from exc


def fs_thaw(hv: LibvirtHypervisor, name: str, *, wait: float = 0.0) -> int:
    """Thaw the guest's file systems, retrying for ``wait`` seconds while the agent is
    not connected (after a restore libvirt sees the agent's port again a moment later)."""
    lv = _libvirt()
    deadline = time.monotonic() + wait
    dom = _bounded_agent(hv, name)
    while True:
        try:
            return int(dom.fsThaw(None, 0))
        except lv.libvirtError as exc:
            if time.monotonic() >= deadline:
                raise _agent_error(name, exc) from exc
        time.sleep(0.1)


def quiesce(hv: LibvirtHypervisor, name: str, mode: str) -> int | None:
    """Freeze the guest's file systems as ``mode`` says (auto: when an agent answers;
    required: or fail; off: never); the number frozen, or None when not frozen."""
    if mode == "off":
        return None
    try:
        if mode == "auto":
            agent_ping(hv, name)
        return fs_freeze(hv, name)
    except AgentUnavailable:
        if mode == "required":
            raise
        return None


def pause(hv: LibvirtHypervisor, name: str) -> None:
    """Stop the guest's vCPUs (its disks see no new write until ``resume``)."""
    hv.call(f"pausing {name}", hv.domain(name).suspend)


def resume(hv: LibvirtHypervisor, name: str) -> None:
    hv.call(f"resuming {name}", hv.domain(name).resume)


def resume_quietly(hv: LibvirtHypervisor, name: str) -> None:
    """Recovery: resume a guest we paused; one that runs (or is gone) is left alone."""
    if hv.state(name) is DomainState.PAUSED:
        resume(hv, name)


def thaw_quietly(hv: LibvirtHypervisor, name: str, wait: float) -> None:
    """Recovery: thaw if it runs; thawing a thawed guest is harmless, and a guest
    with no agent was never frozen."""
    if hv.state(name) is not DomainState.RUNNING:  # a paused guest's agent cannot answer
        return
    with contextlib.suppress(AgentUnavailable):
        fs_thaw(hv, name, wait=wait)


def define_xml(hv: LibvirtHypervisor, xml: str) -> None:
    """Make a domain persistent again from a saved definition."""
    hv.call("defining the domain again", hv.conn.defineXML, xml)
