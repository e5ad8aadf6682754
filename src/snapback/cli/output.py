"""Printing results: human text or stable JSON, and a progress bar on terminals."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import click

from snapback.domain.models import Progress
from snapback.domain.sizes import format_size

FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format; json is stable for scripts.",
)


def jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def emit(fmt: str, value: Any, text: Callable[[Any], str] | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps(jsonable(value), indent=2, sort_keys=True))
    else:
        click.echo(text(value) if text else str(value))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def fields(record: dict[str, Any]) -> str:
    width = max(len(k) for k in record)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in record.items())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def human_size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and p.done < p.total):
            return
        self.last = now
        frac = min(p.done / p.total, 1.0) if p.total else 0.0
        rate = p.done / max(now - self.start, 1e-6)
        eta = (p.total - p.done) / rate if rate > 0 and p.total else 0
        bar = "#" * int(frac * 30)
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {frac:6.1%} {format_size(p.done)}/"
            f"{format_size(p.total)} {format_size(int(rate))}/s ETA {eta:4.0f}s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
