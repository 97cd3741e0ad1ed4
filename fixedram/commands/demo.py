"""``fixedram demo``: live-save a test VM into a fixed-offset image, restore it, verify.

The one command that uses the test support in :mod:`fixedram.testing` (see :mod:`fixedram.demo`).
"""

from __future__ import annotations

import json
import sys

import click

from fixedram.commands import cli, one_line_errors

__all__ = ["demo_command"]


@cli.command("demo")
@click.option("--mem", default="256M", show_default=True, metavar="SIZE",
              help="Guest RAM (-m); a quarter of it is kept dirty.")
@click.option("--keep", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep the image, memory dumps and QEMU logs in DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def demo_command(mem: str, keep: str | None, as_json: bool) -> None:
    """Boot a test guest, save it live with fixedram, restore it, prove RAM is identical.

    Exits 1 when a check fails.
    """
    from fixedram.demo import format_report, run_demo

    report = run_demo(mem=mem, keep=keep, progress=not as_json and sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
    if not report["ok"]:
        sys.exit(1)
