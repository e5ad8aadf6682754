"""Kill snapback (SIGKILL) at every journal step of a flow, then let ``gc`` recover:
the catalogue and the disk must agree, with no half image and no orphan left."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from snapback.config import load_settings
from snapback.services.context import Context
from tests.conftest import SNAPBACK, Cli, assert_consistent, make_raw

MIB = 1 << 20
UPLOAD_STEPS = ["queued", "staged", "volume", "imported", "snapshotted", "activated"]
FLATTEN_STEPS = ["copying", "flattened"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def crash(cli: Cli, at: str, *args: str) -> None:
    res = cli(*args, env={"SNAPBACK_CRASH_AT": at}, check=False)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr)


@pytest.mark.parametrize("step", UPLOAD_STEPS)
def test_image_upload_killed_at_each_step(cli: Cli, tmp_path: Path, step: str) -> None:
    raw = make_raw(tmp_path / "img.raw", 8 * MIB, {0: b"image", 6 * MIB: b"data" * 256})
    crash(cli, f"image.upload:{step}", "image", "create", "img", "--file", str(raw))
    before = cli.json("gc", "--dry-run")
    assert any("image.upload" in r for r in before["recovered"]), before
    report = cli.json("gc")
    assert report["problems"] == []
    images = cli.json("image", "list", "--all")
    assert len(images) == 1
    if step == "activated":
        assert images[0]["status"] == "active" and images[0]["checksum"] == sha(raw)
        out = tmp_path / "down.raw"
        cli("image", "download", "img", "--file", str(out))
        assert sha(out) == sha(raw)
    else:
        assert images[0]["status"] == "killed"
        assert cli.json("volume", "list", "--all") == []
    assert_consistent(Context(load_settings(cli.home)))
    again = cli.json("image", "create", "img2", "--file", str(raw))  # still usable
    assert again["status"] == "active"


def _clone_setup(cli: Cli, tmp_path: Path, size: int = 16 * MIB) -> Path:
    raw = make_raw(tmp_path / "parent.raw", size, {0: b"P" * MIB, size - MIB: b"Q" * MIB})
    cli("volume", "import", "parent", "--file", str(raw))
    cli("snapshot", "create", "parent@s")
    cli("snapshot", "protect", "parent@s")
    cli("volume", "clone", "parent@s", "kid")
    return raw


def _check_kid(cli: Cli, tmp_path: Path, expected: str) -> None:
    out = tmp_path / f"kid-{time.monotonic_ns()}.raw"
    cli("volume", "export", "kid", "--file", str(out))
    assert sha(out) == expected
    out.unlink()


@pytest.mark.parametrize("step", FLATTEN_STEPS)
def test_flatten_killed_at_each_step(cli: Cli, tmp_path: Path, step: str) -> None:
    raw = _clone_setup(cli, tmp_path)
    crash(cli, f"volume.flatten:{step}", "volume", "flatten", "kid")
    cli("gc")
    kid = cli.json("volume", "show", "kid")
    children = cli.json("volume", "children", "parent@s")
    assert (kid["parent"] is None) == (children == [])  # catalogue agrees with itself
    _check_kid(cli, tmp_path, sha(raw))
    assert_consistent(Context(load_settings(cli.home)))
    if kid["parent"] is not None:
        cli("volume", "flatten", "kid")  # a retry works
    cli("snapshot", "unprotect", "parent@s")
    cli("volume", "delete", "parent")
    _check_kid(cli, tmp_path, sha(raw))


def test_flatten_killed_mid_copy(cli: Cli, tmp_path: Path) -> None:
    raw = make_raw(
        tmp_path / "parent.raw",
        192 * MIB,
        {i * MIB: bytes([i % 251]) * MIB for i in range(0, 192, 2)},
    )
    cli("volume", "import", "parent", "--file", str(raw))
    cli("snapshot", "create", "parent@s")
    cli("snapshot", "protect", "parent@s")
    cli("volume", "clone", "parent@s", "kid")
    env = {"SNAPBACK_HOME": str(cli.home), **cli.env}
    proc = subprocess.Popen([SNAPBACK, "volume", "flatten", "kid"], env={**os.environ, **env})
    pools = cli.home / "pools" / "default"
    deadline = time.monotonic() + 60
    while not list(pools.glob("*/*.flatten.tmp")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "flatten finished before it could be killed"
    report = cli.json("gc")
    assert report["problems"] == []
    assert not list(pools.glob("*/*.flatten.tmp"))
    _check_kid(cli, tmp_path, sha(raw))
    assert_consistent(Context(load_settings(cli.home)))
    assert cli.json("volume", "flatten", "kid")["parent"] is None
    _check_kid(cli, tmp_path, sha(raw))


@pytest.mark.parametrize(
    ("at", "args"),
    [
        ("volume.create:row", ["volume", "create", "v", "--size", "4M"]),
        ("volume.create:stored", ["volume", "create", "v", "--size", "4M"]),
        ("snapshot.create:stored", ["snapshot", "create", "base@s2"]),
        ("snapshot.delete:removing", ["snapshot", "delete", "base@s1"]),
        ("snapshot.delete:removed", ["snapshot", "delete", "base@s1"]),
        ("volume.delete:removing", ["volume", "delete", "doomed"]),
        ("volume.delete:removed", ["volume", "delete", "doomed"]),
    ],
)
def test_other_flows_killed(cli: Cli, at: str, args: list[str]) -> None:
    cli("volume", "create", "base", "--size", "4M")
    cli("snapshot", "create", "base@s1")
    cli("volume", "create", "doomed", "--size", "4M")
    crash(cli, at, *args)
    assert cli.json("gc")["problems"] == []
    assert_consistent(Context(load_settings(cli.home)))
    names = {v["name"] for v in cli.json("volume", "list")}
    snaps = {s["name"] for s in cli.json("snapshot", "list", "base")}
    if at.startswith("volume.create"):
        assert "v" not in names  # rolled back: the user saw no success
    if at.startswith("volume.delete"):
        assert "doomed" not in names  # finished: the user asked for it
    if at.startswith("snapshot.delete"):
        assert snaps == set()
    if at.startswith("snapshot.create"):
        assert snaps == {"s1"}
