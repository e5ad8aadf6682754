"""The one way snapback runs external programs: argument lists, never a shell.

Each call may set an address-space and a CPU-time limit for the child, so a
hostile or broken input cannot make a tool eat the machine.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
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


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to kill the child when snapback dies, so no copy outlives a crash."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _limiter(limits: Limits | None) -> Callable[[], None]:
    def apply() -> None:
        _die_with_parent()
        if limits is None:
            return
        if limits.address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        if limits.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))

    return apply


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
    preexec = _limiter(limits)
    with tempfile.TemporaryFile() as errfile:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errfile,
                preexec_fn=preexec,
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
