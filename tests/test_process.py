"""The one way snapback runs programs: the child runs under the limits asked for,
dies with snapback, and a missing program is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapback.domain.errors import StorageError, ToolFailed
from snapback.drivers.process import Limits, run

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_the_child_runs_under_the_limits() -> None:
    r = run(["sh", "-c", "ulimit -v; ulimit -t"], limits=Limits(1 << 30, 60))
    assert r.stdout.split() == [str((1 << 30) // 1024), "60"]
    unlimited = run(["sh", "-c", "ulimit -v; ulimit -t"])
    assert unlimited.stdout.split() == ["unlimited", "unlimited"]


def test_a_tool_over_its_memory_limit_fails_with_its_name() -> None:
    with pytest.raises(ToolFailed) as err:
        run(["qemu-img", "--version"], limits=Limits(address_space=16 << 20, cpu_seconds=None))
    assert "qemu-img" in str(err.value)


def test_a_missing_program_is_one_clear_error() -> None:
    with pytest.raises(StorageError, match="cannot run no-such-tool: not found"):
        run(["no-such-tool", "--help"])


def test_the_child_dies_with_snapback(tmp_path: Path) -> None:
    """kill -9 of snapback leaves no child behind (PR_SET_PDEATHSIG)."""
    pidfile = tmp_path / "child.pid"
    script = (
        "import sys; from snapback.drivers.process import run; "
        f"run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 300'])"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": SRC})
    try:
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        os.kill(child, 0)  # alive
        parent.kill()
        parent.wait()
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        pytest.fail(f"child {child} outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
