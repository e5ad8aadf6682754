"""What a person sees: the tour (the README's main job), progress bars on a
terminal, and a quiet, idempotent bootstrap."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, SNAPBACK, Cli, make_raw

MIB = 1 << 20


@pytest.mark.parametrize("pool", ["local", "rbd"])
def test_tour_reports_every_step(pool: str) -> None:
    """The README's main job; with --pool rbd on a Ceph cluster it starts and stops itself."""
    out = subprocess.run(
        [SNAPBACK, "tour", "--format", "json", "--pool", pool],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    report = json.loads(out.stdout)
    assert report["pool"] == pool
    steps = report["steps"]
    results = {s["action"].split(" (")[0]: s["result"] for s in steps}
    assert results["clone reads its parent's data"] == "release 1.0 of the web site"
    assert (
        "reads 'release 1.0 of the web site' again"
        in results["snapshot rollback web-root@release-1"]
    )
    assert results["image create web-1.0 --file web.raw --disk-format raw"].startswith("active")
    assert results["volume delete web-root"] == "deleted"
    assert results["gc"] == "0 debris found"
    if pool == "rbd":
        leftovers = subprocess.run(["pgrep", "-f", "snapback-tour-ceph-"], capture_output=True)
        assert leftovers.returncode == 1, leftovers.stdout  # its cluster was stopped


def on_a_terminal(cli: Cli, *args: str) -> tuple[str, bytes]:
    """Run the CLI with stderr on a pseudo-terminal: (what was drawn there, stdout)."""
    master, slave = pty.openpty()
    env = {**os.environ, "SNAPBACK_HOME": str(cli.home)}
    proc = subprocess.run(
        [SNAPBACK, *args], env=env, stdout=subprocess.PIPE, stderr=slave, check=True, timeout=60
    )
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    return drawn.decode(errors="replace"), proc.stdout


def test_progress_bar_on_a_terminal(cli: Cli, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "p.raw", 64 * MIB, {i * MIB: b"p" * MIB for i in range(0, 64, 4)})
    text, stdout = on_a_terminal(cli, "volume", "import", "p", "--file", str(raw))
    assert "import [" in text and "100.0%" in text and "ETA" in text, text
    assert b"import [" not in stdout  # the bar never pollutes stdout
    piped = cli("volume", "export", "p", "--file", str(tmp_path / "o.raw"))
    assert "[" not in piped.stderr  # no bar when stderr is not a terminal
    # backups and restores: bytes done of all, rate and time left
    repo = str(tmp_path / "repo")
    cli("repo", "init", repo)
    text, _ = on_a_terminal(cli, "backup", "create", "p", "--repo", repo)
    final = text.strip().split("\r")[-1]
    assert final.startswith("backup [") and "100.0%" in final, text
    assert "64 MiB/64 MiB" in final and "/s ETA" in final, final
    backup_id = cli.json("backup", "list", "--repo", repo)[0]["id"]
    text, _ = on_a_terminal(cli, "backup", "restore", backup_id, "--repo", repo, "--to-volume", "q")
    final = text.strip().split("\r")[-1]
    assert final.startswith("restore [") and "100.0%" in final and "/s ETA" in final, text


def test_bootstrap_is_quiet_when_done() -> None:
    out = subprocess.run(
        [str(ROOT / "scripts" / "bootstrap.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    out = subprocess.run(
        [str(ROOT / "scripts" / "bootstrap.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout == "" and out.stderr == ""
