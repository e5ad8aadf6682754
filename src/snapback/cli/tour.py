"""``snapback tour``: the main job on embedded defaults."""

from __future__ import annotations

import shutil
import tempfile

import click

from snapback.cli.output import FORMAT_OPTION, emit
from snapback.config import load_settings
from snapback.services.context import Context
from snapback.services.tour import Tour, TourStep


@click.command()
@click.option("--keep", is_flag=True, help="Keep the tour's state folder and print its path.")
@FORMAT_OPTION
def tour(keep: bool, fmt: str) -> None:
    """A scripted tour in a fresh state folder: volume, snapshot, protect, clone,
    flatten, rollback, export, image upload, delete, gc."""
    home = tempfile.mkdtemp(prefix="snapback-tour-")
    try:

        def show(step: TourStep) -> None:
            if fmt == "text":
                click.echo(f"{step.seconds:8.3f}s  {step.action}\n           -> {step.result}")

        steps = Tour(Context(load_settings(home))).run(show)
        if fmt == "json":
            emit(fmt, {"home": home if keep else None, "steps": steps})
        elif keep:
            click.echo(f"state kept in {home}")
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
