"""``snapback``: the root command, shared options and the exit codes (docs/cli.md)."""

from __future__ import annotations

import faulthandler
import signal
import sys
from typing import Any

import click

from snapback.config import load_settings
from snapback.domain.errors import SnapbackError
from snapback.services import journal
from snapback.services.context import Context

EXIT_INTERRUPTED = 130


class SnapbackGroup(click.Group):
    """Turns every SnapbackError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SnapbackError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=SnapbackGroup)
@click.option(
    "--home",
    envvar="SNAPBACK_HOME",
    type=click.Path(file_okay=False),
    help="State folder (catalogue, pools, locks). Default: /var/lib/snapback.",
)
@click.version_option(package_name="snapback")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """snapback: snapshots, images and backups of virtual machine disks."""
    ctx.obj = LazyContext(home, recover=ctx.invoked_subcommand not in ("gc", "tour"))


class LazyContext:
    """Opens the catalogue only when a command needs it (so --help stays instant).

    Opening it first finishes or undoes operations whose process died (as a
    database replays its log at start), so a restart of snapback restores the
    state a crash left; ``gc`` does the same and reports it.
    """

    def __init__(self, home: str | None, *, recover: bool = True) -> None:
        self.home = home
        self.recover = recover
        self._ctx: Context | None = None

    def get(self) -> Context:
        if self._ctx is None:
            self._ctx = Context(load_settings(self.home))
            if self.recover and journal.any_running(self._ctx):
                # only then load every flow's recovery (keeps a plain command's start-up light)
                from snapback.services.gc import recover_interrupted

                for line in recover_interrupted(self._ctx):
                    click.echo(f"snapback: interrupted operation {line}", err=True)
        return self._ctx


def context(click_ctx: click.Context) -> Context:
    obj = click_ctx.find_root().obj
    assert isinstance(obj, LazyContext)
    return obj.get()


def _register() -> None:
    from snapback.cli import (
        backups,
        gc,
        images,
        instances,
        repo_admin,
        repo_maintenance,
        snapshots,
        tour,
        volumes,
    )

    cli.add_command(volumes.volume)
    cli.add_command(snapshots.snapshot)
    cli.add_command(images.image)
    cli.add_command(instances.instance)
    cli.add_command(backups.repo)
    for command in (*repo_maintenance.COMMANDS, *repo_admin.COMMANDS):
        backups.repo.add_command(command)
    cli.add_command(backups.backup)
    cli.add_command(gc.gc)
    cli.add_command(tour.tour)


_register()


def main() -> None:
    # `kill -USR1 PID` prints every thread's stack to stderr: a command that seems
    # stuck (in librbd, libvirt or a subprocess) shows where, and carries on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    cli(prog_name="snapback")
