"""A real libvirtd running the real TCG test guest on a volume of the local pool."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapback.domain.errors import Conflict, NotFound
from snapback.drivers.hypervisor.domain_xml import DiskSpec, DomainSpec
from snapback.drivers.hypervisor.libvirt_driver import DomainState, LibvirtHypervisor
from snapback.drivers.storage.local import LocalPool
from tests.guestrecords import READY_LINE, consistent, parse_console, scan, wait_console

MIB = 1 << 20
SLOTS = 64


@pytest.fixture
def vmdir() -> Iterator[Path]:
    """A folder the qemu user can traverse (pytest's tmp folders are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="snapback-vm-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_guest_boots_from_a_local_volume_and_its_writes_land(guest: Path, vmdir: Path) -> None:
    pool = LocalPool(vmdir / "pools", "vols")
    pool.create_volume("root", 16 * MIB)
    head = pool.layer_path("root", pool.load("root").head)
    hv = LibvirtHypervisor()
    name = f"snapback-test-{uuid.uuid4().hex[:8]}"
    console = vmdir / "console.log"
    spec = DomainSpec(
        name=name,
        memory_mib=256,
        vcpus=1,
        disks=(DiskSpec("vda", str(head)),),
        kernel=str(guest / "vmlinuz"),
        initrd=str(guest / "initrd.gz"),
        cmdline=f"console=ttyS0 quiet panic=-1 snapback.records={SLOTS}",
        serial_log=str(console),
    )
    hv.define(spec)
    try:
        with pytest.raises(Conflict):
            hv.define(spec)
        assert hv.state(name) is DomainState.SHUTOFF
        t0 = time.monotonic()
        hv.start(name)
        wait_console(console, lambda t: READY_LINE in t, 90)
        boot = time.monotonic() - t0
        wait_console(console, lambda t: t.count("REC vda") >= 10, 60)
        assert hv.state(name) is DomainState.RUNNING
        hv.destroy(name)
        assert hv.state(name) is DomainState.SHUTOFF
        with pool.open("root") as h:
            result = scan(h.read(0, SLOTS * 4096), "vda")
        log = parse_console(console.read_text(errors="replace"))
        assert consistent(result, log, "vda"), (result, log)
        assert (result.max_valid_seq or 0) >= 9
        assert all(result.valid.values())
        assert boot < 90
    finally:
        if hv.state(name) is not DomainState.MISSING:
            hv.destroy(name)
            hv.undefine(name)
    assert hv.state(name) is DomainState.MISSING
    with pytest.raises(NotFound):
        hv.start(name)
