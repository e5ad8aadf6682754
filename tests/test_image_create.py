"""``instance image-create`` on a real libvirtd with TCG guests that keep writing records.

One source instance is shared by the module (booting costs ~6 s under TCG); every
test leaves it running and defined, as the flows must.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapback.config import load_settings
from snapback.services.context import Context
from tests.conftest import SLOTS, Cli, assert_consistent, upload_guest
from tests.guestrecords import READY_LINE, Scan, parse_console, read_image, scan, wait_console

VIRSH = ["virsh", "-c", "qemu:///system"]
AGENT_LINE = "SNAPBACK-GUEST-AGENT"


@dataclass
class Env:
    cli: Cli
    console: Path
    domain: str
    tmp: Path


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRSH, *args], capture_output=True, text=True, check=check)


def console_text(env: Env) -> str:
    return env.console.read_text(errors="replace")


def rec_count(env: Env) -> int:
    return console_text(env).count("REC vda")


def wait_writing(env: Env, more: int = 3) -> None:
    """Wait until the guest has printed ``more`` further records (it is alive and writing)."""
    start = rec_count(env)
    wait_console(env.console, lambda t: t.count("REC vda") >= start + more, timeout=60)


def assert_running_and_defined(env: Env) -> None:
    info = virsh("dominfo", env.domain).stdout
    assert re.search(r"State:\s+running", info), info
    assert re.search(r"Persistent:\s+yes", info), info
    job = virsh("blockjob", env.domain, "vda")
    assert "No current block job" in job.stdout + job.stderr
    show = env.cli.json("instance", "show", "src")
    assert show["in_sync"] and show["domain_state"] == "running"


def image_records(env: Env, image: str) -> Scan:
    out = env.tmp / f"{image}.qcow2"
    out.unlink(missing_ok=True)
    env.cli("image", "download", image, "--file", str(out))
    return scan(read_image(out, SLOTS * 4096), "vda")


def last_rec_before(text: str, marker: str) -> int:
    head = text[: text.rindex(marker)]
    return max(int(n) for n in re.findall(r"REC vda (\d+)", head))


@pytest.fixture(scope="module")
def env(guest: Path) -> Iterator[Env]:
    home = Path(tempfile.mkdtemp(prefix="snapback-ic-", dir="/var/tmp"))
    home.chmod(0o755)
    tmp = home / "t"
    tmp.mkdir()
    cli = Cli(home, {})
    upload_guest(cli, guest, tmp)
    inst = cli.json("instance", "create", "src", "--image", "tiny")
    e = Env(cli, Path(inst["console"]), inst["domain"], tmp)
    wait_console(e.console, lambda t: AGENT_LINE in t and t.count("REC vda") > SLOTS + 5)
    yield e
    for i in cli.json("instance", "list"):
        cli("instance", "delete", i["name"], check=False)
    shutil.rmtree(home, ignore_errors=True)


def test_live_flow_quiesced_holds_exactly_the_records_before_the_freeze(env: Env) -> None:
    before = parse_console(console_text(env)).last_rec["vda"]
    img = env.cli.json("instance", "image-create", "src", "snap-live", "--mode", "live")
    props = img["properties"]
    assert img["status"] == "active" and img["disk_format"] == "qcow2"
    assert props["snapback.flow"] == "live" and props["snapback.consistency"] == "quiesced"
    assert props["snapback.source_instance"] == "src" and props["image_type"] == "snapshot"
    assert (
        props["instance_uuid"]
        and props["base_image_ref"] == env.cli.json("image", "show", "tiny")["id"]
    )
    assert "kernel_id" in props and "os_command_line" in props  # inherited: it boots
    for key in ("total", "guest_pause", "copy", "upload"):
        assert float(props[f"snapback.time_{key}_s"]) >= 0
    assert_running_and_defined(env)
    wait_writing(env)

    text = console_text(env)
    assert "FSFREEZE" in text and "FSTHAW" in text
    frozen_at = last_rec_before(text, "FSFREEZE")
    found = image_records(env, "snap-live")
    assert all(found.valid.values())
    assert found.max_valid_seq == frozen_at >= before
    # every slot holds one of the SLOTS records just before the point in time
    assert sorted(found.records) == list(range(frozen_at - SLOTS + 1, frozen_at + 1))
    assert_consistent(Context(load_settings(env.cli.home)))


def test_cold_flow_saves_resumes_and_copies(env: Env) -> None:
    before = parse_console(console_text(env)).last_rec["vda"]
    img = env.cli.json("instance", "image-create", "src", "snap-cold", "--mode", "cold")
    props = img["properties"]
    assert props["snapback.flow"] == "cold" and props["snapback.consistency"] == "quiesced"
    assert float(props["snapback.time_guest_pause_s"]) > 0
    assert_running_and_defined(env)
    wait_writing(env)
    text = console_text(env)
    frozen_at = last_rec_before(text, "FSFREEZE")
    found = image_records(env, "snap-cold")
    assert all(found.valid.values())
    assert found.max_valid_seq == frozen_at >= before
    assert_consistent(Context(load_settings(env.cli.home)))


def test_crash_consistent_without_quiesce_and_auto_picks_live(env: Env) -> None:
    before = parse_console(console_text(env)).last_rec["vda"]
    img = env.cli.json("instance", "image-create", "src", "snap-crash", "--quiesce", "off")
    props = img["properties"]
    assert props["snapback.flow"] == "live" and props["snapback.consistency"] == "crash-consistent"
    assert "libvirt 9" in props["snapback.flow_reason"]  # auto: chosen from the versions
    after = parse_console(console_text(env)).last_rec["vda"]
    found = image_records(env, "snap-crash")
    assert all(found.valid.values())
    top = found.max_valid_seq
    assert top is not None and before <= top <= after + 1
    assert sorted(found.records) == list(range(top - SLOTS + 1, top + 1))
    assert_running_and_defined(env)


def test_new_instance_boots_from_the_image_and_carries_on(env: Env) -> None:
    top = image_records(env, "snap-live").max_valid_seq
    inst = env.cli.json("instance", "create", "child", "--image", "snap-live")
    child = Path(inst["console"])
    text = wait_console(child, lambda t: READY_LINE in t and "REC vda" in t)
    assert f"START vda {top + 1 if top is not None else 0} " in text
    assert env.cli.json("volume", "show", "child-root")["parent"].endswith("@base")
    env.cli("instance", "delete", "child")


def test_guest_pause_cold_is_visible_live_is_not(env: Env) -> None:
    """Heartbeats timed on the host while the flows run: cold stops the guest, live does not."""
    gaps = {}
    for mode in ("cold", "live"):
        arrivals: list[float] = []
        stop = threading.Event()

        def watch(arrivals: list[float] = arrivals, stop: threading.Event = stop) -> None:
            seen = console_text(env).count("HB ")
            while not stop.is_set():
                n = console_text(env).count("HB ")
                arrivals.extend([time.monotonic()] * (n - seen))
                seen = n
                time.sleep(0.02)

        t = threading.Thread(target=watch)
        t.start()
        time.sleep(1)
        env.cli("instance", "image-create", "src", f"pause-{mode}", "--mode", mode)
        time.sleep(1)
        stop.set()
        t.join()
        gaps[mode] = max(b - a for a, b in itertools.pairwise(arrivals))
    assert gaps["cold"] > 0.8, gaps  # saved to disk and restored
    assert gaps["live"] < gaps["cold"], gaps


KILL_STEPS = {
    "live": [
        "queued", "work", "prepared", "undefined", "copying", "frozen", "copied",
        "thawed", "redefined", "extracted", "volume", "imported", "snapshotted", "activated",
    ],
    "cold": [
        "queued", "work", "frozen", "detached", "saved", "extracted", "restarted",
        "reattached", "thawed", "volume", "imported", "snapshotted", "activated",
    ],
}  # fmt: skip


@pytest.mark.parametrize("mode", ["live", "cold"])
def test_killed_at_each_step_restores_the_instance(env: Env, mode: str) -> None:
    ctx = Context(load_settings(env.cli.home))
    for i, step in enumerate(KILL_STEPS[mode]):
        name = f"kill-{mode}-{i}"
        res = env.cli(
            "instance",
            "image-create",
            "src",
            name,
            "--mode",
            mode,
            env={"SNAPBACK_CRASH_AT": f"instance.image_create:{step}"},
            check=False,
        )
        assert res.returncode == -9, (step, res.stderr)
        # the next snapback command (here: gc, or any other) finishes or undoes the flow
        if i % 2:
            report = env.cli.json("gc")
            assert any("instance.image_create" in r for r in report["recovered"]), report
        else:
            shown = env.cli("instance", "show", "src")
            assert "interrupted operation" in shown.stderr, (step, shown.stderr)
        image = env.cli.json("image", "show", name)
        assert image["status"] == ("active" if step == "activated" else "killed"), step
        assert_running_and_defined(env)
        assert_consistent(ctx)
        wait_writing(env, 2)  # not left frozen or paused


def test_stopped_instance_gives_the_disk_as_it_was(env: Env) -> None:
    bad = env.cli("instance", "image-create", "nope", "x", check=False)
    assert bad.returncode == 3 and "instance nope does not exist" in bad.stderr
    env.cli("instance", "stop", "src", "--force")
    live = env.cli("instance", "image-create", "src", "x", "--mode", "live", check=False)
    assert live.returncode == 5 and "not running" in live.stderr
    img = env.cli.json("instance", "image-create", "src", "snap-stopped")
    assert img["properties"]["snapback.flow"] == "cold"
    assert img["properties"]["snapback.consistency"] == "stopped"
    assert env.cli.json("instance", "show", "src")["domain_state"] == "shutoff"
    disk, image = env.tmp / "root.raw", env.tmp / "stopped.raw"
    env.cli("volume", "export", "src-root", "--file", str(disk))
    env.cli("image", "download", "snap-stopped", "--file", str(image), "--disk-format", "raw")
    assert disk.read_bytes() == image.read_bytes()
    env.cli("instance", "start", "src")
    wait_console(env.console, lambda t: t.count(READY_LINE) >= 2)


@pytest.fixture
def small_pools(guest: Path) -> Iterator[tuple[Cli, Path]]:
    """A state folder whose pools live on a 48 MiB tmpfs (to fill it up)."""
    home = Path(tempfile.mkdtemp(prefix="snapback-full-", dir="/var/tmp"))
    home.chmod(0o755)
    mnt = home / "pools"
    mnt.mkdir(mode=0o755)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(mnt)], check=True
    )
    (home / "snapback.toml").write_text(
        f'[pools.default]\npath = "{mnt}"\n[pools.images]\npath = "{mnt}"\n'
    )
    cli = Cli(home, {})
    try:
        yield cli, mnt
    finally:
        for i in cli.json("instance", "list"):
            cli("instance", "delete", i["name"], check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_refusals_leave_the_instance_as_it_was(small_pools: tuple[Cli, Path], guest: Path) -> None:
    cli, mnt = small_pools
    tmp = cli.home / "t"
    tmp.mkdir()
    upload_guest(cli, guest, tmp, options="snapback.agent=off")
    inst = cli.json("instance", "create", "quiet", "--image", "tiny")
    e = Env(cli, Path(inst["console"]), inst["domain"], tmp)
    # every slot written once, so the guest's later writes need no new space
    wait_console(e.console, lambda t: READY_LINE in t and t.count("REC vda") > SLOTS + 5)
    assert AGENT_LINE not in console_text(e)

    def unchanged() -> None:
        info = virsh("dominfo", e.domain).stdout
        assert re.search(r"State:\s+running", info) and re.search(r"Persistent:\s+yes", info)
        wait_writing(e, 2)
        assert_consistent(Context(load_settings(cli.home)))

    # 1. quiesce required, no agent in the guest
    res = cli("instance", "image-create", "quiet", "q", "--quiesce", "required", check=False)
    assert res.returncode == 6 and "no guest agent answers in" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one clear line, no libvirt noise
    assert cli("image", "show", "q", check=False).returncode == 3
    unchanged()

    # 2. somebody else's block job on the root disk
    other = tmp / "other.qcow2"
    virsh("blockcopy", e.domain, "vda", str(other), "--transient-job", "--wait", "--timeout", "60")
    try:
        res = cli("instance", "image-create", "quiet", "j", check=False)
        assert res.returncode == 4 and "running copy block job" in res.stderr, res.stderr
        assert str(other) in res.stderr and "virsh blockjob" in res.stderr
        job = virsh("blockjob", e.domain, "vda")
        assert "Block Copy" in job.stdout + job.stderr  # theirs, left alone
    finally:
        print(virsh("blockjob", e.domain, "vda", "--abort", check=False))
    unchanged()

    # 3. the image pool is full
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={mnt / 'filler'}", "bs=64k"], capture_output=True, check=False
    )
    for mode in ("live", "cold"):
        res = cli("instance", "image-create", "quiet", f"full-{mode}", "--mode", mode, check=False)
        assert res.returncode == 6 and "No space left on device" in res.stderr, res.stderr
        assert cli.json("image", "show", f"full-{mode}")["status"] == "killed"
        unchanged()
    (mnt / "filler").unlink()
    img = cli.json("instance", "image-create", "quiet", "roomy")
    assert (
        img["status"] == "active"
        and img["properties"]["snapback.consistency"] == "crash-consistent"
    )
