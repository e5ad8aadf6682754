"""A running instance with a local qcow2 root disk and an RBD data disk: one backup
holds both disks at one instant (the libvirt job for the local disk, an RBD
snapshot for the other, taken while the guest is frozen, or paused when no agent
may freeze it), tracks changes on both, and restores as an instance that boots
where the backup's point was."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from snapback.config import load_settings
from snapback.drivers.storage.rbd import RbdPool
from snapback.services.context import Context
from tests.conftest import Cli, assert_consistent, upload_guest
from tests.guestrecords import READY_LINE, frozen_at, thaws, wait_console
from tests.rbd_fixtures import wipe

VIRSH = ["virsh", "-c", "qemu:///system"]


def domstate(domain: str) -> str:
    return subprocess.run(
        [*VIRSH, "domstate", domain, "--reason"], capture_output=True, text=True, check=True
    ).stdout.strip()


def records(console: Path, disk: str) -> int:
    return console.read_text(errors="replace").count(f"REC {disk} ")


def test_running_instance_on_local_and_rbd_disks(rbd_conf: str, guest: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="snapback-mixed-", dir="/var/tmp"))
    home.chmod(0o755)
    (home / "snapback.toml").write_text(
        f'[pools.ceph]\ndriver = "rbd"\nconf = "{rbd_conf}"\npool = "vols"\n'
    )
    cli = Cli(home, {})
    tmp = home / "t"
    tmp.mkdir()
    try:
        upload_guest(cli, guest, tmp)
        cli("volume", "create", "data", "--size", "16M", "--pool", "ceph")
        src = cli.json("instance", "create", "mix", "--image", "tiny", "--no-start")
        cli("instance", "attach", "mix", "data", "--pool", "ceph")
        cli("instance", "start", "mix")
        console, domain = Path(src["console"]), src["domain"]
        wait_console(console, lambda t: READY_LINE in t and "REC vdb" in t, timeout=120)
        repo = str(tmp / "repo")
        cli("repo", "init", repo)

        thawed = thaws(console)
        first = cli.json("backup", "create", "--instance", "mix", "--repo", repo)
        assert first["consistency"] == "quiesced"
        assert [d["target"] for d in first["disks"]] == ["vda", "vdb"]
        last = {d: frozen_at(console, thawed, d) for d in ("vda", "vdb")}

        seen = {d: records(console, d) for d in ("vda", "vdb")}
        wait_console(console, lambda t: all(t.count(f"REC {d} ") > seen[d] for d in seen))
        second = cli.json("backup", "create", "--instance", "mix", "--repo", repo)
        assert second["parent"] == first["id"] and second["change_tracking"] == "mixed"
        assert second["note"] is None  # tracking held on both disks: no hash fallback
        assert second["stats"]["read_bytes"] == 2 * 4 << 20  # the records' chunk of each

        assert domstate(domain) == "running (booted)"  # frozen, never paused
        third = cli.json(
            "backup", "create", "--instance", "mix", "--repo", repo, "--quiesce", "off"
        )
        assert third["consistency"] == "crash-consistent"
        assert domstate(domain) == "running (unpaused)"  # paused for the two points

        killed = cli(
            "backup", "create", "--instance", "mix", "--repo", repo, "--quiesce", "off",
            check=False, env={"SNAPBACK_CRASH_AT": "backup.create:paused"},
        )  # fmt: skip
        assert killed.returncode == -9 and domstate(domain).startswith("paused")
        cli("gc")  # resumes the guest, drops the killed backup's checkpoint and snapshot
        assert domstate(domain) == "running (unpaused)"
        fourth = cli.json("backup", "create", "--instance", "mix", "--repo", repo)
        assert fourth["parent"] == third["id"] and fourth["change_tracking"] == "mixed"

        restored = cli.json(
            "backup", "restore", first["id"], "--repo", repo, "--to-instance", "copy", "--start"
        )
        assert restored["status"] == "active"
        copy_console = Path(cli.json("instance", "show", "copy")["console"])
        text = wait_console(copy_console, lambda t: t.count("START ") >= 2, timeout=120)
        for disk, seq in last.items():  # each disk is exactly the freeze point
            assert f"START {disk} {seq + 1} " in text, (disk, seq, text[-1500:])
        cli("instance", "delete", "copy")
        assert cli.json("gc", "--dry-run")["debris"] == []
        assert_consistent(Context(load_settings(home)))
    finally:
        for inst in cli.json("instance", "list"):
            cli("instance", "delete", inst["name"], check=False)
        wipe([RbdPool("vols", conffile=rbd_conf)])
        shutil.rmtree(home, ignore_errors=True)
