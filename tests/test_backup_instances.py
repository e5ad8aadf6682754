"""Instance backups on a local pool with a real libvirtd and a TCG guest: every disk
at one point in time plus the definition, change tracking through the bitmaps QEMU
marks while the guest runs, restore as a new instance that boots."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from snapback.config import load_settings
from snapback.drivers.imagefmt import qemu_img
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from tests.conftest import Cli, assert_consistent, upload_guest, write_bytes
from tests.guestrecords import READY_LINE, frozen_at, thaws, wait_console

MIB = 1 << 20


def export(cli: Cli, volume: str, out: Path) -> bytes:
    out.unlink(missing_ok=True)
    cli("volume", "export", volume, "--file", str(out))
    return out.read_bytes()


def wait_records(console: Path, more: int) -> None:
    start = console.read_text(errors="replace").count("REC vda")
    wait_console(console, lambda t: t.count("REC vda") >= start + more, timeout=90)


def test_stopped_instance_backup_tracks_changes_and_restores_as_an_instance(
    vm_cli: Cli, guest: Path, tmp_path: Path
) -> None:
    cli = vm_cli
    upload_guest(cli, guest, tmp_path)
    cli("volume", "create", "data", "--size", "8M")
    ctx = Context(load_settings(cli.home))
    with ctx.sessions() as s:
        storage = live_volume(s, "default", "data").storage_name
    write_bytes(ctx, "default", storage, 4 * MIB, os.urandom(4 * MIB))  # never rewritten
    src = cli.json("instance", "create", "src", "--image", "tiny", "--volume", "data")
    console = Path(src["console"])
    wait_console(console, lambda t: READY_LINE in t)
    wait_records(console, 3)
    repo = str(tmp_path / "repo")
    cli("repo", "init", repo)

    cli("instance", "stop", "src")
    full = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert full["kind"] == "instance" and full["consistency"] == "stopped"
    assert [d["target"] for d in full["disks"]] == ["vda", "vdb"]
    assert full["instance"]["memory_mib"] == 256 and "<domain" in full["instance"]["domain_xml"]

    cli("instance", "start", "src")  # the guest writes; QEMU marks the bitmaps
    wait_records(console, 5)
    cli("instance", "stop", "src")
    second = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert second["change_tracking"] == "dirty-bitmap" and second["parent"] == full["id"]
    assert second["stats"]["read_bytes"] <= full["stats"]["read_bytes"] - 4 * MIB
    renewed = cli.json("backup", "create", "--instance", "src", "--repo", repo, "--full")
    pool = ctx.pool("default")  # a new chain: the old one's bitmap goes after the record
    head = pool.layer_path(storage, pool.load(storage).head)
    assert list(qemu_img.bitmaps(str(head))) == [f"snapback-{renewed['id']}"]

    out = cli.json("backup", "restore", second["id"], "--repo", repo, "--to-instance", "copy")
    assert out["status"] == "shutoff" and [d["volume"] for d in out["disks"]] == [
        "default/copy-root",
        "default/copy-vdb",
    ]
    for mine, theirs in (("src-root", "copy-root"), ("data", "copy-vdb")):
        assert export(cli, mine, tmp_path / "a") == export(cli, theirs, tmp_path / "b")
    shown = cli.json("instance", "show", "copy")
    assert shown["memory_mib"] == 256 and len(shown["disks"]) == 2

    one = cli("backup", "restore", second["id"], "--repo", repo, "--to-volume", "x", check=False)
    assert one.returncode == 5 and "--disk" in one.stderr  # two disks: which one?
    cli("backup", "restore", second["id"], "--repo", repo, "--to-volume", "x", "--disk", "vdb")
    assert export(cli, "x", tmp_path / "c") == export(cli, "data", tmp_path / "d")

    cli("instance", "start", "copy")
    copy_console = Path(cli.json("instance", "show", "copy")["console"])
    wait_console(copy_console, lambda t: READY_LINE in t and "REC vda" in t)
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True
    ).stdout.split()
    assert shown["domain"] in domains
    cli("instance", "delete", "copy")
    assert_consistent(ctx)

    # disaster recovery: another host's empty catalogue, the repository alone
    assert [f["role"] for f in second["boot_files"]] == ["kernel", "ramdisk"]
    assert cli.json("backup", "verify", second["id"], "--repo", repo, "--read-data")["ok"]
    dr = Cli(Path(tempfile.mkdtemp(prefix="snapback-dr-", dir="/var/tmp")), cli.env)
    dr.home.chmod(0o755)
    try:
        got = dr.json("backup", "restore", second["id"], "--repo", repo, "--to-instance", "dr",
                      "--start")  # fmt: skip
        assert got["image"] is None and "stored with the backup" in got["note"]
        images = {i["name"]: i for i in dr.json("image", "list")}
        assert images["dr-kernel"]["disk_format"] == "aki"
        assert images["dr-ramdisk"]["disk_format"] == "ari"
        dr_console = Path(dr.json("instance", "show", "dr")["console"])
        wait_console(dr_console, lambda t: READY_LINE in t and "REC vda" in t)
        refused = dr("image", "delete", "dr-kernel", check=False)
        assert refused.returncode != 0 and "instance(s) dr boot" in refused.stderr
        dr("instance", "delete", "dr")
        dr("image", "delete", "dr-kernel")
        assert_consistent(Context(load_settings(dr.home)))
    finally:
        for inst in dr.json("instance", "list"):
            dr("instance", "delete", inst["name"], check=False)
        shutil.rmtree(dr.home, ignore_errors=True)


def test_running_instance_on_local_disks_is_read_through_a_libvirt_backup_job(
    vm_cli: Cli, guest: Path, tmp_path: Path
) -> None:
    """A pull-mode backup job with a checkpoint: the guest keeps running, the backup
    is exactly the freeze point, and tracking goes on across stop and start."""
    cli = vm_cli
    upload_guest(cli, guest, tmp_path)
    src = cli.json("instance", "create", "src", "--image", "tiny")
    console = Path(src["console"])
    wait_console(console, lambda t: READY_LINE in t)
    wait_records(console, 3)
    repo = str(tmp_path / "repo")
    cli("repo", "init", repo)
    thawed = thaws(console)
    first = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert first["consistency"] == "quiesced" and first["change_tracking"] == "none"
    last = frozen_at(console, thawed)
    wait_records(console, 3)  # still writing: it was never stopped
    second = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert second["change_tracking"] == "dirty-bitmap" and second["consistency"] == "quiesced"
    assert second["stats"]["read_bytes"] == 4 * MIB  # the records' chunk, nothing else
    cli("instance", "stop", "src")  # the checkpoint's bitmap is the stopped path's too
    third = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert third["change_tracking"] == "dirty-bitmap" and third["consistency"] == "stopped"
    cli("instance", "start", "src")
    wait_records(console, 3)
    fourth = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert fourth["change_tracking"] == "dirty-bitmap"  # a qemu-img bitmap, redefined
    job = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domjobinfo", src["domain"]],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "None" in job  # the backup job ended
    killed = cli(
        "backup", "create", "--instance", "src", "--repo", repo, check=False,
        env={"SNAPBACK_CRASH_AT": "backup.create:exported"},
    )  # fmt: skip
    assert killed.returncode == -9
    cli("gc")  # ends the orphaned job, drops its checkpoint
    listed = subprocess.run(
        ["virsh", "-c", "qemu:///system", "checkpoint-list", src["domain"], "--name"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert listed == [f"snapback-{fourth['id']}"]
    fifth = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert fifth["change_tracking"] == "dirty-bitmap" and fifth["parent"] == fourth["id"]
    full = cli.json("backup", "create", "--instance", "src", "--repo", repo, "--full")
    assert full["parent"] is None and full["change_tracking"] == "none"
    listed = subprocess.run(  # the old chain's checkpoint went once the record was written
        ["virsh", "-c", "qemu:///system", "checkpoint-list", src["domain"], "--name"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert listed == [f"snapback-{full['id']}"]
    out = cli.json("backup", "restore", first["id"], "--repo", repo, "--to-instance", "copy")
    cli("instance", "start", "copy")
    copy_console = Path(cli.json("instance", "show", "copy")["console"])
    started = wait_console(copy_console, lambda t: "START vda" in t)
    assert f"START vda {last + 1} " in started and out["status"] == "shutoff"
    cli("instance", "delete", "copy")
    cli("instance", "delete", "src")  # its domain has checkpoints: they go with it
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert src["domain"] not in domains
    assert_consistent(Context(load_settings(cli.home)))


def test_restore_to_instance_killed_at_each_step_leaves_nothing_half_made(
    vm_cli: Cli, guest: Path, tmp_path: Path
) -> None:
    """Into an empty catalogue (the boot files come from the repository too): killed
    before the instance is defined, gc removes its volumes and boot images."""
    cli = vm_cli
    upload_guest(cli, guest, tmp_path)
    cli("instance", "create", "src", "--image", "tiny", "--no-start")
    repo = str(tmp_path / "repo")
    cli("repo", "init", repo)
    backup = cli.json("backup", "create", "--instance", "src", "--repo", repo)
    dr = Cli(Path(tempfile.mkdtemp(prefix="snapback-dr-", dir="/var/tmp")), cli.env)
    dr.home.chmod(0o755)
    try:
        for step in ("boot-kernel", "boot-ramdisk", "volume-vda"):
            crash = {"SNAPBACK_CRASH_AT": f"backup.restore_instance:{step}"}
            res = dr("backup", "restore", backup["id"], "--repo", repo, "--to-instance", "dr",
                     check=False, env=crash)  # fmt: skip
            assert res.returncode == -9, (step, res.stderr)
            dr("gc")
            assert dr.json("instance", "list") == [], step
            assert dr.json("volume", "list") == [], step
            assert dr.json("image", "list") == [], step  # the boot images went too
            assert_consistent(Context(load_settings(dr.home)))
        got = dr.json("backup", "restore", backup["id"], "--repo", repo, "--to-instance", "dr")
        assert got["status"] == "shutoff" and [d["volume"] for d in got["disks"]] == [
            "default/dr-root"
        ]
        assert export(cli, "src-root", tmp_path / "a") == export(dr, "dr-root", tmp_path / "b")
    finally:
        for inst in dr.json("instance", "list"):
            dr("instance", "delete", inst["name"], check=False)
        shutil.rmtree(dr.home, ignore_errors=True)
