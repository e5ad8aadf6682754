"""The exception tree of snapback.

    SnapbackError                  root: every error snapback raises on purpose
     +-- InvalidInput              a bad name, size, option or reference (exit 5)
     |    +-- UnsafeImage          an image file our inspector refused (exit 5)
     +-- NotFound                  a volume, snapshot, image... that does not exist (exit 3)
     +-- Conflict                  the request clashes with current state (exit 4)
     |    +-- HasDependents        something still depends on the target (exit 4)
     |    +-- Busy                 another operation holds the target (exit 4)
     +-- StorageError              a storage driver or tool failed (exit 6)
     |    +-- ToolFailed           an external tool (qemu-img...) exited non-zero
     +-- CatalogError              the catalogue is unreachable or inconsistent (exit 7)

Drivers raise these (keeping the foreign cause as ``__cause__``); services add
context; the CLI maps each class to one exit code and prints one message.
"""

from __future__ import annotations

from collections.abc import Sequence


class SnapbackError(Exception):
    """Root of every error snapback raises on purpose."""

    exit_code = 1


class InvalidInput(SnapbackError):
    exit_code = 5


class UnsafeImage(InvalidInput):
    """An image file was refused by the header inspector; it never reached qemu-img."""


class NotFound(SnapbackError):
    exit_code = 3


class Conflict(SnapbackError):
    exit_code = 4


class HasDependents(Conflict):
    """The target cannot go away yet: ``dependents`` names what still needs it."""

    def __init__(self, message: str, dependents: Sequence[str]) -> None:
        self.dependents = list(dependents)
        names = ", ".join(self.dependents)
        super().__init__(f"{message}: {names}" if names else message)


class Busy(Conflict):
    """Another operation holds the target right now; retry later."""


class StorageError(SnapbackError):
    exit_code = 6


class ToolFailed(StorageError):
    """An external tool exited with an error."""

    def __init__(self, tool: str, returncode: int, stderr: str) -> None:
        self.tool = tool
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = self.stderr.splitlines()[-1] if self.stderr else f"exit code {returncode}"
        super().__init__(f"{tool} failed: {detail}")


class CatalogError(SnapbackError):
    exit_code = 7
