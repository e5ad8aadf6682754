"""``snapback repo gc | check | sync | prune | unlock``: upkeep of a repository's objects.

Attached to the ``repo`` group of ``snapback.cli.backups`` by ``cli/main.py``.
The repository code (zstd, ciphers) and the catalogue are loaded only when a
command runs.
"""

from __future__ import annotations

import click

from snapback.cli.backups import (
    EXIT_DAMAGED,
    PASSPHRASE_OPTION,
    delete_backups,
    open_repo,
    passphrase,
)
from snapback.cli.output import FORMAT_OPTION, emit, human_size
from snapback.domain.errors import InvalidInput, NotFound


@click.command("gc")
@click.argument("repo_url", metavar="REPO")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@PASSPHRASE_OPTION
@FORMAT_OPTION
def repo_gc(repo_url: str, dry_run: bool, passphrase_file: str | None, fmt: str) -> None:
    """Remove chunks and indexes no backup references (never while a backup runs)."""
    from snapback.repository.maintenance import gc

    r = open_repo(repo_url, passphrase(passphrase_file))
    report = gc(r, dry_run=dry_run)
    emit(
        fmt,
        report,
        lambda g: (
            f"{g.backups} backups reference {g.referenced_chunks} chunks; "
            f"{g.unreferenced_chunks} chunks and {g.unreferenced_indexes} indexes unreferenced "
            f"({human_size(g.freed_bytes)}): " + ("removed" if g.removed else f"kept ({g.skipped})")
        ),
    )


@click.command("unlock")
@click.argument("repo_url", metavar="REPO")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Remove every lock, live ones too: only when no snapback anywhere uses REPO "
    "(a gc could otherwise sweep chunks a running backup still needs).",
)
@FORMAT_OPTION
def repo_unlock(repo_url: str, everything: bool, fmt: str) -> None:
    """Remove the locks of dead processes: at once for a process of this machine that no
    longer runs, else after 15 minutes without a heartbeat (gc does this too)."""
    from snapback.repository.maintenance import unlock
    from snapback.repository.repo import open_backend

    backend = open_backend(repo_url)
    if backend.stat("config") is None:  # no passphrase needed: locks are plain JSON
        raise NotFound(f"{backend.url} holds no snapback repository ('repo init' it)")
    removed = unlock(backend, everything=everything)
    emit(
        fmt,
        {"removed": removed},
        lambda o: f"{len(o['removed'])} locks removed" + "".join(f"\n  {k}" for k in o["removed"]),
    )


@click.command("check")
@click.argument("repo_url", metavar="REPO")
@click.option("--read-data", is_flag=True, help="Read, authenticate and hash every chunk.")
@PASSPHRASE_OPTION
@FORMAT_OPTION
def repo_check(repo_url: str, read_data: bool, passphrase_file: str | None, fmt: str) -> None:
    """Check every backup; name each missing or damaged object and the backups it breaks
    (exit 8)."""
    from snapback.repository.maintenance import check

    r = open_repo(repo_url, passphrase(passphrase_file))
    report = check(r, read_data=read_data)
    emit(
        fmt,
        report,
        lambda c: (
            f"{c.backups} backups, {c.chunks} chunks, {c.unreferenced} unreferenced: "
            + ("ok" if not c.problems else "PROBLEMS")
            + "".join(f"\n  {p}" for p in c.problems)
        ),
    )
    if report.problems:
        raise SystemExit(EXIT_DAMAGED)


@click.command("sync")
@click.argument("repo_url", metavar="REPO")
@click.argument("other_url", metavar="OTHER_REPO")
@PASSPHRASE_OPTION
@FORMAT_OPTION
def repo_sync(repo_url: str, other_url: str, passphrase_file: str | None, fmt: str) -> None:
    """Copy to OTHER_REPO (the offsite copy) the chunks, indexes and backups it lacks."""
    from snapback.repository.maintenance import sync

    secret = passphrase(passphrase_file)
    report = sync(
        open_repo(repo_url, secret),
        open_repo(other_url, secret),
    )
    emit(
        fmt,
        report,
        lambda r: (
            f"copied {r.copied or 'nothing'} ({human_size(r.copied_bytes)}); "
            f"{r.present} already there"
        ),
    )


@click.command("prune")
@click.argument("repo_url", metavar="REPO")
@click.option("--keep-last", type=int, default=0, help="Keep the N newest backups of each source.")
@click.option("--keep-hourly", type=int, default=0)
@click.option("--keep-daily", type=int, default=0)
@click.option("--keep-weekly", type=int, default=0)
@click.option("--keep-monthly", type=int, default=0)
@click.option("--keep-yearly", type=int, default=0)
@click.option("--dry-run", is_flag=True, help="Only say what would be kept and removed.")
@PASSPHRASE_OPTION
@FORMAT_OPTION
def repo_prune(
    repo_url: str,
    keep_last: int,
    keep_hourly: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    keep_yearly: int,
    dry_run: bool,
    passphrase_file: str | None,
    fmt: str,
) -> None:
    """Remove the backups no --keep-* rule keeps (per source), then gc the repository."""
    from snapback.repository.maintenance import gc
    from snapback.repository.prune import Policy, plan

    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    if policy.empty():
        raise InvalidInput("give at least one --keep-* rule (prune never empties a repository)")
    r = open_repo(repo_url, passphrase(passphrase_file))
    records = [r.get_record(b) for b in r.backup_ids()]
    decided = plan(records, policy)
    freed = None
    if not dry_run:
        delete_backups(r, repo_url, decided.remove)
        freed = gc(r)
    out = {"keep": decided.keep, "remove": decided.remove, "dry_run": dry_run, "gc": freed}
    emit(
        fmt,
        out,
        lambda o: "\n".join(
            [f"keep   {k} ({', '.join(why)})" for k, why in sorted(o["keep"].items())]
            + [f"{'would remove' if dry_run else 'removed'} {k}" for k in o["remove"]]
        ),
    )


COMMANDS = (repo_gc, repo_check, repo_sync, repo_prune, repo_unlock)
