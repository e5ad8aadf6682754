"""Building libvirt domain XML from a spec (ElementTree does the escaping)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DiskSpec:
    target: str  # vda, vdb, ...
    path: str  # a file, or for a network disk the protocol's name (rbd: pool/image)
    format: str = "qcow2"
    read_only: bool = False
    protocol: str | None = None  # set for a network disk: rbd
    hosts: tuple[tuple[str, int], ...] = ()
    config: str | None = None  # rbd: the cluster's ceph.conf, read by QEMU's librbd


@dataclass(frozen=True)
class DomainSpec:
    name: str
    memory_mib: int
    vcpus: int
    disks: tuple[DiskSpec, ...] = field(default_factory=tuple)
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    serial_log: str | None = None
    uuid: str | None = None


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _disk(disk: DiskSpec) -> ET.Element:
    if disk.protocol is None:
        d = ET.Element("disk", type="file", device="disk")
        _sub(d, "driver", name="qemu", type=disk.format, cache="none", discard="unmap")
        _sub(d, "source", file=disk.path)
    else:  # rbd, as nova writes it (auth none: no <auth>)
        d = ET.Element("disk", type="network", device="disk")
        _sub(d, "driver", name="qemu", type=disk.format, cache="writeback", discard="unmap")
        src = _sub(d, "source", protocol=disk.protocol, name=disk.path)
        for host, port in disk.hosts:
            _sub(src, "host", name=host, port=str(port))
        if disk.config:
            _sub(src, "config", file=disk.config)
    _sub(d, "target", dev=disk.target, bus="virtio")
    if disk.read_only:
        _sub(d, "readonly")
    return d


def disk_xml(disk: DiskSpec) -> str:
    return ET.tostring(_disk(disk), encoding="unicode")


def build(spec: DomainSpec) -> str:
    """Domain XML for a TCG guest (KVM does not work on these machines)."""
    dom = ET.Element("domain", type="qemu")
    _sub(dom, "name", spec.name)
    if spec.uuid:
        _sub(dom, "uuid", spec.uuid)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.kernel:
        _sub(os_el, "kernel", spec.kernel)
        if spec.initrd:
            _sub(os_el, "initrd", spec.initrd)
        if spec.cmdline:
            _sub(os_el, "cmdline", spec.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    for disk in spec.disks:
        devices.append(_disk(disk))
    if spec.serial_log:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=spec.serial_log, append="on")
        _sub(serial, "target", port="0")
    chan = _sub(devices, "channel", type="unix")
    _sub(chan, "target", type="virtio", name="org.qemu.guest_agent.0")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")
