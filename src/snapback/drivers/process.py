"""The one way snapback runs external programs: argument lists, never a shell.

Each call may set an address-space and a CPU-time limit for the child, so a
hostile or broken input cannot make a tool eat the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapback.domain.errors import StorageError, ToolFailed


@dataclass(frozen=True)
class Limits:
    address_space: int | None = 2 << 30  # bytes
    cpu_seconds: int | None = 600


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


SETPRIV, PRLIMIT = "/usr/bin/setpriv", "/usr/bin/prlimit"  # util-linux, Essential in Debian


def _wrapped(argv: Sequence[str], limits: Limits | None) -> list[str]:
    """``argv`` behind util-linux's ``setpriv`` and ``prlimit``: the child dies with
    snapback (``PR_SET_PDEATHSIG``, so no copy outlives a crash) and runs under the
    limits. Both set their part and exec the next, so Python needs no ``preexec_fn``:
    that would make every call fork the whole (large, threaded) process instead of
    vfork, about 5 ms each here, and run Python code in a forked threaded child."""
    pre = [SETPRIV, "--pdeathsig", "KILL", "--"]
    if limits is not None and (limits.address_space or limits.cpu_seconds):
        pre.append(PRLIMIT)
        if limits.address_space is not None:
            pre.append(f"--as={limits.address_space}")
        if limits.cpu_seconds is not None:
            pre.append(f"--cpu={limits.cpu_seconds}")
        pre.append("--")
    return pre + list(argv)


def run(
    argv: Sequence[str],
    *,
    limits: Limits | None = None,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``argv`` and return its output; raise ToolFailed on a non-zero exit when ``check``.

    ``on_line`` receives stdout line by line (``\\r`` counts as a line end, as
    progress output uses it) while the program runs.
    """
    tool = os.path.basename(argv[0])
    found = shutil.which(argv[0], path=(env or os.environ).get("PATH", os.defpath))
    if found is None:
        raise StorageError(f"cannot run {tool}: not found (is its Debian package installed?)")
    with tempfile.TemporaryFile() as errfile:
        try:
            proc = subprocess.Popen(
                _wrapped([found, *argv[1:]], limits),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errfile,
                env=env,
            )
        except OSError as exc:
            raise StorageError(f"cannot run {tool}: {exc.strerror}") from exc
        if on_line is None:
            out, _ = proc.communicate()
            stdout = out.decode(errors="replace")
        else:
            stdout = _stream(proc, on_line)
            proc.wait()
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace")
    if check and proc.returncode != 0:
        raise ToolFailed(tool, proc.returncode, stderr)
    return Result(proc.returncode, stdout, stderr)


def _stream(proc: subprocess.Popen[bytes], on_line: Callable[[str], None]) -> str:
    assert proc.stdout is not None
    collected: list[str] = []
    buf = b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        while True:
            cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line = buf[:cut].decode(errors="replace")
            buf = buf[cut + 1 :]
            collected.append(line)
            on_line(line)
    if buf:
        collected.append(buf.decode(errors="replace"))
    return "\n".join(collected)
