"""``snapback gc``"""

from __future__ import annotations

import click

from snapback.cli.main import context
from snapback.cli.output import FORMAT_OPTION, emit
from snapback.services.views import GcReport


def report_text(r: GcReport) -> str:
    parts = []
    for title, items in (
        ("recovered", r.recovered),
        ("deleted", r.deleted),
        ("waiting", r.waiting),
        ("debris", r.debris),
        ("problems", r.problems),
    ):
        if items:
            parts.append(f"{title}:\n" + "\n".join(f"  {i}" for i in items))
    return "\n".join(parts) or "nothing to do"


@click.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be done.")
@FORMAT_OPTION
def gc(dry_run: bool, fmt: str) -> None:
    """Recover interrupted operations, finish deferred deletes, remove debris."""
    from snapback.services.gc import GcService  # loads every flow's recovery: only here

    report = GcService(context(click.get_current_context())).run(dry_run=dry_run)
    emit(fmt, report, report_text)
    if report.problems:
        raise SystemExit(8)
