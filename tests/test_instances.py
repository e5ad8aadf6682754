"""Instances on a real libvirtd running the TCG test guest, driven through the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import SLOTS, Cli, domain_names, upload_guest
from tests.guestrecords import READY_LINE, parse_console, read_image, scan, wait_console

MIB = 1 << 20


def test_instance_lifecycle(vm_cli: Cli, guest: Path, tmp_path: Path) -> None:
    cli = vm_cli
    upload_guest(cli, guest, tmp_path)
    cli("volume", "create", "data", "--size", "8M")
    inst = cli.json("instance", "create", "vm1", "--image", "tiny", "--volume", "data")
    assert inst["status"] == "active" and inst["domain_state"] == "running" and inst["in_sync"]
    assert inst["disks"] == {"vda": "default/vm1-root", "vdb": "default/data"}
    console = Path(inst["console"])
    wait_console(console, lambda t: READY_LINE in t and "REC vdb" in t and t.count("REC vda") > 5)
    assert cli.json("volume", "show", "vm1-root")["parent"].endswith("@base")

    busy = cli("snapshot", "create", "vm1-root@live", check=False)
    assert busy.returncode == 4 and "running instance vm1" in busy.stderr
    gone = cli("volume", "delete", "data", check=False)
    assert gone.returncode == 4 and "attached to instance vm1" in gone.stderr

    stopped = cli.json("instance", "stop", "vm1", "--force")
    assert stopped["status"] == "shutoff" and stopped["domain_state"] == "shutoff"
    log = parse_console(console.read_text(errors="replace"))
    out = tmp_path / "root.raw"
    cli("volume", "export", "vm1-root", "--file", str(out))
    first = scan(read_image(out, SLOTS * 4096), "vda")
    assert first.max_valid_seq is not None and first.max_valid_seq >= log.last_rec["vda"]
    assert all(first.valid.values())

    cli("snapshot", "create", "vm1-root@stopped")  # allowed while stopped
    cli.json("instance", "start", "vm1")  # the definition follows the new head file
    wait_console(
        console, lambda t: t.count(READY_LINE) >= 2 and f"REC vda {first.max_valid_seq + 3}" in t
    )
    cli("instance", "stop", "vm1", "--force")
    out2 = tmp_path / "root2.raw"
    cli("volume", "export", "vm1-root", "--file", str(out2))
    assert (scan(read_image(out2, SLOTS * 4096), "vda").max_valid_seq or 0) > first.max_valid_seq
    snap = tmp_path / "snap.raw"
    cli("volume", "export", "vm1-root", "--snapshot", "stopped", "--file", str(snap))
    assert scan(read_image(snap, SLOTS * 4096), "vda").max_valid_seq == first.max_valid_seq

    cli("instance", "start", "vm1")
    domain = cli.json("instance", "show", "vm1")["domain"]
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "destroy", domain], check=True, capture_output=True
    )
    drift = cli.json("instance", "show", "vm1")
    assert drift["status"] == "active" and drift["domain_state"] == "shutoff"
    assert drift["in_sync"] is False
    assert "catalogue says active" in cli("instance", "show", "vm1").stdout

    cli("instance", "delete", "vm1")
    assert cli.json("instance", "list") == []
    names = {v["name"] for v in cli.json("volume", "list")}
    assert names == {"data"}  # the root disk went, the attached volume stayed
    res = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dominfo", domain],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0
    assert cli.json("gc", "--dry-run")["debris"] == []


def test_instance_errors(vm_cli: Cli, guest: Path, tmp_path: Path) -> None:
    cli = vm_cli
    res = cli("instance", "create", "x", "--image", "nope", check=False)
    assert res.returncode == 3 and "image" in res.stderr
    upload_guest(cli, guest, tmp_path)
    res = cli("instance", "create", "x", "--image", "kernel", check=False)
    assert res.returncode == 5 and "not an active disk image" in res.stderr
    res = cli("instance", "create", "x", "--image", "tiny", "--volume", "missing", check=False)
    assert res.returncode == 3
    res = cli("instance", "show", "ghost", check=False)
    assert res.returncode == 3 and res.stderr == "error: instance ghost does not exist\n"
    cli("instance", "create", "y", "--image", "tiny", "--no-start")
    dup = cli("instance", "create", "y", "--image", "tiny", check=False)
    assert dup.returncode == 4
    assert cli.json("instance", "show", "y")["domain_state"] == "shutoff"
    cli("instance", "delete", "y")
    assert cli.json("volume", "list") == []


@pytest.mark.parametrize("step", ["row", "root", "defined", "started"])
def test_instance_create_killed_at_each_step(
    vm_cli: Cli, guest: Path, tmp_path: Path, step: str
) -> None:
    import signal

    cli = vm_cli
    upload_guest(cli, guest, tmp_path)
    before = set(domain_names())  # other tests or sessions may run guests meanwhile
    res = cli(
        "instance",
        "create",
        "vm",
        "--image",
        "tiny",
        env={"SNAPBACK_CRASH_AT": f"instance.create:{step}"},
        check=False,
    )
    assert res.returncode == -signal.SIGKILL
    report = cli.json("gc")
    assert report["problems"] == [] and any("instance.create" in r for r in report["recovered"])
    instances = cli.json("instance", "list")
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if step == "started":
        assert [i["status"] for i in instances] == ["active"] and instances[0]["in_sync"]
        assert instances[0]["domain"] in domains
    else:
        assert instances == []
        assert cli.json("volume", "list") == []  # no root disk left behind
        assert not [
            d
            for d in set(domains) - before
            if d.startswith("snapback-") and d not in {i["domain"] for i in instances}
        ]
    assert cli.json("gc", "--dry-run")["debris"] == []


def bootable_disk(guest: Path, out: Path) -> Path:
    """A raw disk with its own boot loader: a FAT file system with SYSLINUX, kernel, initrd."""
    subprocess.run(
        ["mkfs.vfat", "-C", "-n", "SBBOOT", str(out), "24576"], check=True, capture_output=True
    )
    subprocess.run(["syslinux", "--install", str(out)], check=True, capture_output=True)
    cfg = out.with_name("syslinux.cfg")
    cfg.write_text(
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL linux\n"
        "  KERNEL vmlinuz\n"
        "  APPEND initrd=initrd.gz console=ttyS0 quiet panic=-1 snapback.workload=off\n"
    )
    files = [str(guest / "vmlinuz"), str(guest / "initrd.gz"), str(cfg)]
    subprocess.run(["mcopy", "-i", str(out), *files, "::"], check=True, capture_output=True)
    return out


def test_disk_with_its_own_boot_loader_boots(vm_cli: Cli, guest: Path, tmp_path: Path) -> None:
    cli = vm_cli
    disk = bootable_disk(guest, tmp_path / "boot.img")
    img = cli.json("image", "create", "bootdisk", "--file", str(disk), "--disk-format", "raw")
    assert "kernel_id" not in img["properties"]
    inst = cli.json("instance", "create", "bl", "--image", "bootdisk")
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", inst["domain"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "<kernel>" not in xml and "<boot dev='hd'/>" in xml
    text = wait_console(Path(inst["console"]), lambda t: READY_LINE in t)
    assert "SYSLINUX" in text  # the disk's own boot loader ran, then the guest came up
    cli("instance", "delete", "bl")
