"""The libvirt hypervisor driver: domains for instances.

One connection per driver object, opened on first use (a connection costs
milliseconds once libvirt's capability cache is valid; see scripts/libvirt.sh).
Every libvirt error leaves as one of our own exceptions, its cause kept.
"""

from __future__ import annotations

import enum
import time
import xml.etree.ElementTree as ET
from typing import Any

from snapback.domain.errors import Conflict, NotFound, SnapbackError
from snapback.drivers.hypervisor.domain_xml import DiskSpec, DomainSpec, build, disk_xml


class HypervisorError(SnapbackError):
    exit_code = 6


class DomainState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    SUSPENDED = "pmsuspended"
    OTHER = "other"
    MISSING = "missing"


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:  # a Debian package: python3-libvirt
        raise HypervisorError("libvirt Python binding missing: run scripts/bootstrap.sh") from exc
    # libvirt prints every error on stderr by default; ours reach the user as one message
    libvirt.registerErrorHandler(_ignore_error, None)
    return libvirt


def _ignore_error(_ctx: object, _err: object) -> None:
    return None


class LibvirtHypervisor:
    def __init__(self, uri: str = "qemu:///system") -> None:
        self.uri = uri
        self._conn: Any = None

    @property
    def conn(self) -> Any:
        if self._conn is None:
            lv = _libvirt()
            try:
                self._conn = lv.open(self.uri)
            except lv.libvirtError as exc:
                raise HypervisorError(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()} "
                    "(is libvirtd running? scripts/libvirt.sh starts it)"
                ) from exc
        return self._conn

    def domain(self, name: str) -> Any:
        lv = _libvirt()
        try:
            return self.conn.lookupByName(name)
        except lv.libvirtError as exc:
            if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"libvirt domain {name} does not exist") from exc
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from exc

    def call(self, what: str, fn: Any, *args: Any) -> Any:
        lv = _libvirt()
        try:
            return fn(*args)
        except lv.libvirtError as exc:
            raise HypervisorError(f"{what} failed: {exc.get_error_message()}") from exc

    # -- life cycle ------------------------------------------------------
    def define(self, spec: DomainSpec) -> None:
        if spec.name in self.list_names():
            raise Conflict(f"libvirt domain {spec.name} already exists")
        self.call(f"defining {spec.name}", self.conn.defineXML, build(spec))

    def redefine(self, spec: DomainSpec) -> None:
        """Define the domain, replacing the persistent definition if there is one."""
        self.call(f"defining {spec.name}", self.conn.defineXML, build(spec))

    def attach_disk(self, name: str, disk: DiskSpec) -> None:
        """Hot-plug a disk into a running domain (the definition is the caller's job)."""
        lv = _libvirt()
        self.call(
            f"attaching {disk.target} to {name}",
            self.domain(name).attachDeviceFlags,
            disk_xml(disk),
            lv.VIR_DOMAIN_AFFECT_LIVE,
        )

    def detach_disk(self, name: str, target: str) -> None:
        dom = self.domain(name)
        root = ET.fromstring(str(self.call("reading domain XML", dom.XMLDesc, 0)))
        for disk in root.iter("disk"):
            tgt = disk.find("target")
            if tgt is not None and tgt.get("dev") == target:
                lv = _libvirt()
                self.call(
                    f"detaching {target} from {name}",
                    dom.detachDeviceFlags,
                    ET.tostring(disk, encoding="unicode"),
                    lv.VIR_DOMAIN_AFFECT_LIVE,
                )
                return
        raise NotFound(f"domain {name} has no disk {target}")

    def xml(self, name: str, *, inactive: bool = True) -> str:
        flags = _libvirt().VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self.call("reading domain XML", self.domain(name).XMLDesc, flags))

    def start(self, name: str) -> None:
        dom = self.domain(name)
        if dom.isActive():
            return
        self.call(f"starting {name}", dom.create)

    def destroy(self, name: str) -> None:
        dom = self.domain(name)
        if dom.isActive():
            self.call(f"stopping {name}", dom.destroy)

    def shutdown(self, name: str, timeout: float = 30.0) -> bool:
        """Ask the guest to power off; force it after ``timeout``. True when it obeyed."""
        dom = self.domain(name)
        if not dom.isActive():
            return True
        self.call(f"shutting down {name}", dom.shutdown)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dom.isActive():
                return True
            time.sleep(0.1)
        self.destroy(name)
        return False

    def reboot(self, name: str) -> None:
        self.call(f"rebooting {name}", self.domain(name).reset, 0)

    def undefine(self, name: str) -> None:
        dom = self.domain(name)
        lv = _libvirt()
        # a domain that had backups carries libvirt checkpoints: libvirt refuses to
        # undefine it unless their metadata goes too (the bitmaps stay in the files)
        flags = (
            lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | lv.VIR_DOMAIN_UNDEFINE_NVRAM
            | lv.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )
        self.call(f"undefining {name}", dom.undefineFlags, flags)

    def state(self, name: str) -> DomainState:
        lv = _libvirt()
        try:
            code = self.domain(name).state()[0]
        except NotFound:
            return DomainState.MISSING
        return {
            lv.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
            lv.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
            lv.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
            lv.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
            lv.VIR_DOMAIN_PMSUSPENDED: DomainState.SUSPENDED,
        }.get(code, DomainState.OTHER)

    def is_persistent(self, name: str) -> bool:
        return bool(self.domain(name).isPersistent())

    def list_names(self) -> list[str]:
        doms = self.call("listing domains", self.conn.listAllDomains, 0)
        return sorted(d.name() for d in doms)
