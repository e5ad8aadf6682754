"""Shared fixtures: a fresh state folder, the services on it, and the real CLI.

Everything runs against real qemu-img / qemu-nbd / libnbd; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapback.config import load_settings
from snapback.services.context import Context

pytest_plugins = ["tests.ceph_fixture", "tests.rbd_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
SNAPBACK = str(Path(sys.executable).with_name("snapback"))
MIB = 1 << 20


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def ctx(home: Path) -> Context:
    return Context(load_settings(home))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Cli:
    home: Path
    env: dict[str, str]

    def __call__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> CliResult:
        full_env = {**os.environ, "SNAPBACK_HOME": str(self.home), **self.env, **(env or {})}
        proc = subprocess.Popen(
            [SNAPBACK, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the command prints its threads' stacks
            time.sleep(2)
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"snapback {' '.join(args)} still ran after {timeout} s; its stacks:\n{err}{out}"
            ) from None
        result = CliResult(proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"snapback {' '.join(args)} failed ({proc.returncode}):\n{err}{out}"
            )
        return result

    def json(self, *args: str) -> Any:
        return self(*args, "--format", "json").json()


@pytest.fixture
def qemu_img_log(tmp_path: Path) -> Iterator[Path]:
    """A real qemu-img behind a wrapper that logs every argument list it is given."""
    log = tmp_path / "qemu-img.log"
    wrapper = tmp_path / "qemu-img-logged"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nexec qemu-img "$@"\n')
    wrapper.chmod(0o755)
    log.touch()
    yield log


@pytest.fixture
def cli(home: Path, qemu_img_log: Path) -> Cli:
    return Cli(home, {"SNAPBACK_QEMU_IMG": str(qemu_img_log.with_name("qemu-img-logged"))})


def write_bytes(ctx: Context, pool: str, storage: str, offset: int, data: bytes) -> None:
    with ctx.pool(pool).open(storage) as h:
        h.write(offset, data)


def make_raw(path: Path, size: int, chunks: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    return path


def assert_consistent(ctx: Context) -> None:
    """The invariants a crash or an error must not break (DESIGN §4).

    gc runs in its own process, as a user runs it: a C library that aborts (librbd,
    libvirt) fails this test with its message, not the whole session."""
    proc = subprocess.run(
        [SNAPBACK, "gc", "--dry-run", "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "SNAPBACK_HOME": str(ctx.settings.home)},
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 8), f"gc --dry-run failed ({proc.returncode}):\n{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["recovered"] == [], report
    assert report["debris"] == [], report
    assert report["problems"] == [], report
    staging = list(ctx.settings.staging.iterdir())
    assert staging == [], f"staging not empty: {staging}"
    work = list(ctx.settings.work.iterdir()) if ctx.settings.work.exists() else []
    assert work == [], f"work folder not empty: {work}"


@pytest.fixture(scope="session")
def guest() -> Path:
    """libvirtd up and the test guest built (both by the project's own scripts)."""
    subprocess.run([str(ROOT / "scripts" / "libvirt.sh")], check=True, timeout=120)
    out = Path(os.environ.get("SNAPBACK_GUEST_DIR", "/var/lib/snapback/guest"))
    subprocess.run([str(ROOT / "scripts" / "build-guest.sh"), str(out)], check=True, timeout=600)
    return out


SLOTS = 64


@pytest.fixture
def vm_cli(guest: Path, qemu_img_log: Path) -> Iterator[Cli]:
    """A CLI whose state folder the qemu user can reach (pytest's tmp folders are 0700)."""
    home = Path(tempfile.mkdtemp(prefix="snapback-home-", dir="/var/tmp"))
    home.chmod(0o755)
    cli = Cli(home, {"SNAPBACK_QEMU_IMG": str(qemu_img_log.with_name("qemu-img-logged"))})
    yield cli
    for inst in cli.json("instance", "list"):
        cli("instance", "delete", inst["name"], check=False)
    shutil.rmtree(home, ignore_errors=True)


def upload_guest(
    cli: Cli, guest: Path, tmp_path: Path, name: str = "tiny", options: str = ""
) -> None:
    """Kernel, initrd and an empty 16 MiB disk image that boots them (records: SLOTS)."""
    kernel = cli.json(
        "image", "create", "kernel", "--file", str(guest / "vmlinuz"), "--disk-format", "aki"
    )
    initrd = cli.json(
        "image", "create", "initrd", "--file", str(guest / "initrd.gz"), "--disk-format", "ari"
    )
    disk = tmp_path / "empty.raw"
    with open(disk, "wb") as f:
        f.truncate(16 * MIB)
    cli(
        "image",
        "create",
        name,
        "--file",
        str(disk),
        "--disk-format",
        "raw",
        "--property",
        f"kernel_id={kernel['id']}",
        "--property",
        f"ramdisk_id={initrd['id']}",
        "--property",
        f"os_command_line=console=ttyS0 quiet panic=-1 snapback.records={SLOTS} {options}",
    )


def domain_names() -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()
