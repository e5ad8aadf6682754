"""The user's view: the real CLI on a real state folder, checked through its JSON,
exit codes and the bytes volumes give back."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.conftest import Cli, assert_consistent, make_raw
from tests.hostile import good_qcow2

MIB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_volume_lifecycle_and_json(cli: Cli, tmp_path: Path) -> None:
    vol = cli.json("volume", "create", "data", "--size", "64M")
    assert (vol["name"], vol["size"], vol["status"], vol["parent"]) == (
        "data",
        64 * MIB,
        "available",
        None,
    )
    assert vol["allocated"] < 2 * MIB
    assert [v["name"] for v in cli.json("volume", "list")] == ["data"]
    dup = cli("volume", "create", "data", "--size", "1M", check=False)
    assert dup.returncode == 4 and "already exists" in dup.stderr
    assert cli.json("volume", "resize", "data", "--size", "128M")["size"] == 128 * MIB
    shrink = cli("volume", "resize", "data", "--size", "1M", check=False)
    assert shrink.returncode == 5 and "--allow-shrink" in shrink.stderr
    missing = cli("volume", "show", "ghost", check=False)
    assert missing.returncode == 3
    assert missing.stderr == "error: volume default/ghost does not exist\n"
    for bad in ["../etc", "a/b", "x" * 200, "-x"]:
        res = cli("volume", "create", bad, "--size", "1M", check=False)
        assert res.returncode in (2, 5), res
    assert cli.json("volume", "delete", "data") == {"result": "deleted", "volume": "data"}
    assert cli.json("volume", "list") == []
    assert cli("gc", "--dry-run").stdout.strip() == "nothing to do"


def test_import_export_roundtrip(cli: Cli, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "disk.raw", 8 * MIB, {0: b"boot", 5 * MIB: b"z" * 4096})
    cli("volume", "import", "disk", "--file", str(raw), "--disk-format", "raw")
    out = tmp_path / "out.raw"
    cli("volume", "export", "disk", "--file", str(out))
    assert sha(out) == sha(raw)
    again = cli("volume", "export", "disk", "--file", str(out), check=False)
    assert again.returncode == 4 and "refusing to overwrite" in again.stderr
    qcow = good_qcow2(tmp_path / "in.qcow2")
    vol = cli.json("volume", "import", "q", "--file", str(qcow))
    assert vol["size"] == 16 * MIB


def test_snapshot_protect_clone_flatten_rules(cli: Cli, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "base.raw", 16 * MIB, {MIB: b"gold" * 1024})
    cli("volume", "import", "base", "--file", str(raw))
    snap = cli.json("snapshot", "create", "base@gold")
    assert (snap["name"], snap["protected"], snap["children"]) == ("gold", False, [])
    refused = cli("volume", "clone", "base@gold", "c1", check=False)
    assert refused.returncode == 5 and "not protected" in refused.stderr
    cli("snapshot", "protect", "base@gold")
    clone = cli.json("volume", "clone", "base@gold", "c1")
    assert clone["parent"] == "default/base@gold"
    assert cli.json("volume", "children", "base@gold") == ["default/c1"]
    res = cli("snapshot", "unprotect", "base@gold", check=False)
    assert res.returncode == 4 and "default/c1" in res.stderr
    res = cli("snapshot", "delete", "base@gold", check=False)
    assert res.returncode == 4 and "default/c1" in res.stderr
    res = cli("volume", "delete", "base", check=False)
    assert res.returncode == 4 and "default/c1" in res.stderr and "--defer" in res.stderr
    flat = cli.json("volume", "flatten", "c1")
    assert flat["parent"] is None
    assert cli.json("volume", "children", "base@gold") == []
    cli("snapshot", "unprotect", "base@gold")
    cli("volume", "delete", "base")
    out = tmp_path / "c1.raw"
    cli("volume", "export", "c1", "--file", str(out))
    assert sha(out) == sha(raw)


def test_rollback_through_cli(cli: Cli, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "v.raw", 4 * MIB, {0: b"v1"})
    cli("volume", "import", "v", "--file", str(raw))
    cli("snapshot", "create", "v@before")
    cli("volume", "resize", "v", "--size", "8M")
    cli("snapshot", "rollback", "v@before")
    out = tmp_path / "back.raw"
    cli("volume", "export", "v", "--file", str(out))
    assert sha(out) == sha(raw)
    snaps = cli.json("snapshot", "list", "v")
    assert [s["name"] for s in snaps] == ["before"]


def test_deferred_delete_finished_by_gc(cli: Cli, tmp_path: Path) -> None:
    cli("volume", "create", "parent", "--size", "8M")
    cli("snapshot", "create", "parent@s")
    cli("snapshot", "protect", "parent@s")
    cli("volume", "clone", "parent@s", "kid")
    assert cli.json("volume", "delete", "parent", "--defer")["result"] == "deferred"
    assert [v["name"] for v in cli.json("volume", "list")] == ["kid"]
    cli("volume", "create", "parent", "--size", "1M")  # the name is free again
    dry = cli.json("gc", "--dry-run")
    assert any("waits for default/kid" in w for w in dry["waiting"])
    cli("volume", "delete", "kid")
    report = cli.json("gc")
    assert any("deleted volume default/parent" in d for d in report["deleted"])
    assert cli.json("gc", "--dry-run") == {
        "debris": [],
        "deleted": [],
        "dry_run": True,
        "problems": [],
        "recovered": [],
        "waiting": [],
    }
    assert [v["name"] for v in cli.json("volume", "list")] == ["parent"]


def test_image_lifecycle(cli: Cli, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "os.raw", 8 * MIB, {0: b"MBR!", 3 * MIB: b"kernel" * 100})
    img = cli.json(
        "image",
        "create",
        "os",
        "--file",
        str(raw),
        "--disk-format",
        "raw",
        "--property",
        "os_distro=debian",
        "--property",
        "hw_disk_bus=virtio",
    )
    assert img["status"] == "active" and img["checksum"] == sha(raw)
    assert img["size"] == img["virtual_size"] == 8 * MIB
    assert img["properties"] == {"hw_disk_bus": "virtio", "os_distro": "debian"}
    shown = cli.json("image", "show", img["id"])
    assert shown["name"] == "os" and shown["volume"].startswith("images/")
    changed = cli.json(
        "image",
        "set",
        "os",
        "--property",
        "os_version=12",
        "--remove-property",
        "hw_disk_bus",
        "--protected",
    )
    assert changed["properties"] == {"os_distro": "debian", "os_version": "12"}
    assert changed["protected"] is True
    res = cli("image", "delete", "os", check=False)
    assert res.returncode == 4 and "protected" in res.stderr
    out = tmp_path / "down.raw"
    cli("image", "download", "os", "--file", str(out))
    assert sha(out) == img["checksum"]
    qout = tmp_path / "down.qcow2"
    cli("image", "download", "os", "--file", str(qout), "--disk-format", "qcow2")
    assert qout.read_bytes()[:4] == b"QFI\xfb"
    vol = cli(
        "volume", "resize", "image-" + img["id"], "--pool", "images", "--size", "16M", check=False
    )
    assert vol.returncode == 5 and "read-only" in vol.stderr
    cli("image", "set", "os", "--unprotected")
    assert cli.json("image", "delete", "os")["result"] == "deleted"
    assert cli.json("image", "list") == []
    assert cli.json("image", "list", "--all")[0]["status"] == "deleted"


def test_image_delete_with_clones_is_deferred(cli: Cli, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "tmpl.raw", 4 * MIB, {0: b"template"})
    img = cli.json("image", "create", "tmpl", "--file", str(raw))
    pool_vol = f"image-{img['id']}"
    cli(
        "volume",
        "clone",
        f"{pool_vol}@base",
        "vm-root",
        "--pool",
        "images",
        "--dest-pool",
        "default",
    )
    assert cli.json("image", "delete", "tmpl")["result"] == "deferred"
    assert cli.json("image", "show", img["id"])["status"] == "pending_delete"
    cli("gc")
    assert cli.json("image", "show", img["id"])["status"] == "pending_delete"
    out = tmp_path / "root.raw"
    cli("volume", "export", "vm-root", "--file", str(out))
    assert out.read_bytes()[:8] == b"template"
    cli("volume", "delete", "vm-root")
    cli("gc")
    assert cli.json("image", "list", "--all")[0]["status"] == "deleted"
    assert cli.json("gc", "--dry-run")["debris"] == []


def test_state_consistent_after_flows(cli: Cli, tmp_path: Path) -> None:
    from snapback.config import load_settings
    from snapback.services.context import Context

    raw = make_raw(tmp_path / "a.raw", 4 * MIB, {0: b"a"})
    cli("image", "create", "a", "--file", str(raw))
    cli("volume", "create", "v", "--size", "4M")
    cli("snapshot", "create", "v@s")
    cli("snapshot", "delete", "v@s")
    assert_consistent(Context(load_settings(cli.home)))
