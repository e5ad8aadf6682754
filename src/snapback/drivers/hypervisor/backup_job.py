"""libvirt backup jobs in pull mode, with checkpoints: a running guest's disks at
one point in time, exported over NBD while the guest keeps writing.

``backupBegin`` with a ``<domaincheckpoint>`` starts, at the same instant, the
export (QEMU keeps the old data of every block the guest overwrites in a
scratch file) and a persistent dirty bitmap named after the checkpoint in each
qcow2 disk. With ``<incremental>NAME</incremental>`` the export also carries
``qemu:dirty-bitmap:backup-<target>``: what changed since checkpoint NAME. A
bitmap started by ``qemu-img`` while the guest was stopped is made known to
libvirt by redefining its checkpoint. The job ends with ``abortJob``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from snapback.domain.errors import NotFound
from snapback.drivers.hypervisor.libvirt_driver import HypervisorError, LibvirtHypervisor, _libvirt

QEMU_USER = "libvirt-qemu"


def checkpoints(hv: LibvirtHypervisor, domain: str) -> list[str]:
    lv = _libvirt()
    try:
        return [c.getName() for c in hv.domain(domain).listAllCheckpoints(0)]
    except lv.libvirtError as exc:
        raise HypervisorError(f"cannot list checkpoints of {domain}: {exc}") from exc


def _left_out(targets: Sequence[str], attribute: str) -> str:
    """Disks outside a job or checkpoint (on RBD: no bitmaps), named so libvirt
    does not pick its own default for them."""
    return "".join(f"<disk name={quoteattr(t)} {attribute}='no'/>" for t in targets)


def redefine_checkpoint(
    hv: LibvirtHypervisor, domain: str, name: str, targets: list[str], others: Sequence[str] = ()
) -> None:
    """Tell libvirt about bitmap ``name`` that already exists in the ``targets`` disks."""
    lv = _libvirt()
    disks = "".join(
        f"<disk name={quoteattr(t)} checkpoint='bitmap' bitmap={quoteattr(name)}/>" for t in targets
    ) + _left_out(others, "checkpoint")
    xml = (
        f"<domaincheckpoint><name>{name}</name><creationTime>{int(time.time())}</creationTime>"
        f"<disks>{disks}</disks></domaincheckpoint>"
    )
    flags = lv.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    hv.call(f"redefining checkpoint {name}", hv.domain(domain).checkpointCreateXML, xml, flags)


def delete_checkpoint(
    hv: LibvirtHypervisor, domain: str, name: str, *, metadata_only: bool = False
) -> None:
    """Remove checkpoint ``name`` (and its bitmaps, unless ``metadata_only``)."""
    lv = _libvirt()
    try:
        cp = hv.domain(domain).checkpointLookupByName(name, 0)
    except lv.libvirtError:
        return  # not known to libvirt
    flags = lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
    hv.call(f"deleting checkpoint {name}", cp.delete, flags)


def job_dir(work: Path, checkpoint: str) -> Path:
    """The job's folder (NBD socket, scratch files): named after its checkpoint, so
    the recovery of a killed backup finds it."""
    return work / f"job-{checkpoint}"


def _socket_dir(work: Path, checkpoint: str) -> Path:
    """A folder QEMU (running as its own user) can create the NBD socket in."""
    path = job_dir(work, checkpoint)
    path.mkdir(parents=True, mode=0o700)
    try:
        user = pwd.getpwnam(QEMU_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
    except KeyError:  # QEMU runs as root here
        pass
    work.chmod(0o755)
    return path


@contextlib.contextmanager
def pull_backup(
    hv: LibvirtHypervisor,
    domain: str,
    targets: list[str],
    work: Path,
    checkpoint: str,
    incremental: str | None,
    others: Sequence[str] = (),
) -> Iterator[str]:
    """Start the job on ``targets`` (the ``others`` left out); yields the NBD socket
    (export names are the disk targets)."""
    sockdir = _socket_dir(work, checkpoint)
    sock = sockdir / "nbd.sock"
    disks = "".join(
        f"<disk name={quoteattr(t)} backup='yes' type='file'>"
        f"<scratch file={quoteattr(str(sockdir / f'scratch-{t}.qcow2'))}/></disk>"
        for t in targets
    ) + _left_out(others, "backup")
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    backup = (
        f"<domainbackup mode='pull'>{inc}<server transport='unix' socket={quoteattr(str(sock))}/>"
        f"<disks>{disks}</disks></domainbackup>"
    )
    cp_disks = "".join(
        f"<disk name={quoteattr(t)} checkpoint='bitmap'/>" for t in targets
    ) + _left_out(others, "checkpoint")
    cp = f"<domaincheckpoint><name>{checkpoint}</name><disks>{cp_disks}</disks></domaincheckpoint>"
    dom: Any = hv.domain(domain)
    try:
        hv.call(f"starting a backup job on {domain}", dom.backupBegin, backup, cp, 0)
        try:
            yield str(sock)
        finally:
            end_job(hv, domain)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def end_job(hv: LibvirtHypervisor, domain: str) -> None:
    """End a backup job if one runs (the recovery of a killed backup calls this too)."""
    lv = _libvirt()
    with contextlib.suppress(lv.libvirtError, HypervisorError, NotFound):
        dom = hv.domain(domain)
        dom.backupGetXMLDesc(0)  # fails unless a backup job runs: no other job is touched
        dom.abortJob()
