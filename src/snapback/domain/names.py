"""Validation of user-chosen names and references such as ``vol@snap``.

A name never becomes a path unchecked (DESIGN §4.8): every name a user gives is
checked here before anything else sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from snapback.domain.errors import InvalidInput

MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe object name, else raise InvalidInput.

    Allowed: letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit;
    at most 128 characters; never ``.`` or ``..``. So no ``/``, ``@``, NUL,
    spaces or control characters can reach a path or a storage name.
    """
    if not isinstance(name, str) or name == "":
        raise InvalidInput(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"{what} is too long ({len(name)} characters, at most {MAX_NAME_LENGTH})"
        )
    if "\x00" in name:
        raise InvalidInput(f"{what} must not contain a NUL character")
    if name in (".", "..") or not _NAME_RE.match(name):
        raise InvalidInput(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class SnapshotRef:
    """A reference ``volume@snapshot``."""

    volume: str
    snapshot: str

    def __str__(self) -> str:
        return f"{self.volume}@{self.snapshot}"


def parse_snapshot_ref(text: str) -> SnapshotRef:
    """Parse ``vol@snap`` into a SnapshotRef with both names validated."""
    if text.count("@") != 1:
        raise InvalidInput(f"expected VOLUME@SNAPSHOT, got {text!r}")
    volume, snapshot = text.split("@")
    return SnapshotRef(
        validate_name(volume, "volume name"), validate_name(snapshot, "snapshot name")
    )
