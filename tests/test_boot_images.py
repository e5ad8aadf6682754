"""Kernel (aki) and ramdisk (ari) images: checked, stored read-only, downloaded intact."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from snapback.config import load_settings
from snapback.domain.errors import UnsafeImage
from snapback.drivers.imagefmt.bootfiles import inspect_kernel, inspect_ramdisk
from snapback.services.context import Context
from tests.conftest import Cli, assert_consistent, make_raw
from tests.hostile import good_qcow2

MIB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kernel_and_ramdisk_upload_and_download(cli: Cli, guest: Path, tmp_path: Path) -> None:
    kernel = cli.json(
        "image", "create", "guest-kernel", "--file", str(guest / "vmlinuz"), "--disk-format", "aki"
    )
    ramdisk = cli.json(
        "image",
        "create",
        "guest-initrd",
        "--file",
        str(guest / "initrd.gz"),
        "--disk-format",
        "ari",
    )
    for img, src in ((kernel, guest / "vmlinuz"), (ramdisk, guest / "initrd.gz")):
        assert img["status"] == "active" and img["checksum"] == sha(src) and img["volume"] is None
        out = tmp_path / img["name"]
        cli("image", "download", img["id"], "--file", str(out))
        assert sha(out) == sha(src)
        stored = cli.home / "boot-files" / img["id"]
        assert stored.stat().st_mode & 0o777 == 0o444
    assert cli.json("gc", "--dry-run")["debris"] == []
    assert cli.json("image", "delete", "guest-kernel")["result"] == "deleted"
    assert not (cli.home / "boot-files" / kernel["id"]).exists()


def test_wrong_boot_files_refused(cli: Cli, guest: Path, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "disk.raw", MIB, {0: b"not a kernel"})
    qcow = good_qcow2(tmp_path / "d.qcow2")
    for path, fmt in (
        (raw, "aki"),
        (guest / "initrd.gz", "aki"),
        (qcow, "ari"),
        (guest / "vmlinuz", "ari"),
    ):
        res = cli("image", "create", "bad", "--file", str(path), "--disk-format", fmt, check=False)
        assert res.returncode == 5 and res.stderr.startswith("error: "), res
    assert {i["status"] for i in cli.json("image", "list", "--all")} == {"killed"}
    with pytest.raises(UnsafeImage, match="HdrS"):
        inspect_kernel(str(raw))
    with pytest.raises(UnsafeImage, match="initramfs"):
        inspect_ramdisk(str(qcow))
    assert list((cli.home / "staging").iterdir()) == []


@pytest.mark.parametrize("step", ["staged", "blob", "activated"])
def test_boot_file_upload_killed(cli: Cli, guest: Path, step: str) -> None:
    res = cli(
        "image",
        "create",
        "k",
        "--file",
        str(guest / "vmlinuz"),
        "--disk-format",
        "aki",
        env={"SNAPBACK_CRASH_AT": f"image.upload:{step}"},
        check=False,
    )
    assert res.returncode == -signal.SIGKILL
    cli("gc")
    status = cli.json("image", "list", "--all")[0]["status"]
    assert status == ("active" if step == "activated" else "killed")
    assert_consistent(Context(load_settings(cli.home)))
    blobs = list((cli.home / "boot-files").iterdir()) if (cli.home / "boot-files").exists() else []
    assert len(blobs) == (1 if step == "activated" else 0)
