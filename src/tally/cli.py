"""``flask sessions prune``, ``migrate`` and ``stats``."""

from __future__ import annotations

import time

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from . import quota
from .counter import store
from .sessions import lifetime_seconds
from .store import PruneReport

sessions = AppGroup("sessions", help="Look after the stored sessions.")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # unreachable


@sessions.command()
def prune() -> None:
    """Remove expired sessions (safe while the service is serving)."""
    began = time.monotonic()

    def progress(report: PruneReport) -> None:
        seen = report.removed + report.kept
        click.echo(f"... {seen} files checked, {report.removed} removed, {time.monotonic() - began:.1f}s", err=True)

    report = store().prune(lifetime_seconds(current_app), progress)
    click.echo(
        f"removed {report.removed} expired sessions, kept {report.kept}, "
        f"freed {_size(report.bytes_freed)} ({report.bytes_freed} bytes) in {time.monotonic() - began:.1f}s"
    )
    swept = quota.sweep(current_app)
    if swept is not None:
        click.echo(f"removed {swept[0]} expired per-address counts of new sessions, kept {swept[1]}")


@sessions.command()
def migrate() -> None:
    """Move sessions stored by earlier versions to the current layout (safe while serving)."""
    began = time.monotonic()

    def progress(moved: int) -> None:
        if moved % 10_000 == 0:
            click.echo(f"... {moved} moved, {time.monotonic() - began:.1f}s", err=True)

    moved = store().migrate(progress)
    click.echo(f"moved {moved} sessions to the current layout in {time.monotonic() - began:.1f}s")


@sessions.command()
def stats() -> None:
    """Count the live sessions, the space they use and the oldest one."""
    result = store().stats(lifetime_seconds(current_app))
    click.echo(f"store: {store().name}")
    click.echo(f"sessions: {result.sessions}")
    click.echo(f"bytes: {result.bytes} ({_size(result.bytes)})")
    oldest = "none" if result.oldest_age is None else f"written {result.oldest_age:.0f}s ago"
    click.echo(f"oldest: {oldest}")


def init_app(app: Flask) -> None:
    """Register the commands."""
    app.cli.add_command(sessions)
