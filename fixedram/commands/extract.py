"""``fixedram extract``: write one RAM block of an image as a raw memory file.

The work is :func:`fixedram.image.analyze.extract_block`.
"""

from __future__ import annotations

import click

from fixedram.commands import cli, one_line_errors

__all__ = ["extract_cmd"]


@cli.command("extract")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--block", default="pc.ram", show_default=True, help="RAM block to write out.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Raw output file (sparse where pages are absent).",
)
@one_line_errors
def extract_cmd(image: str, block: str, output: str) -> None:
    """Write one RAM block of IMAGE as a raw memory file."""
    from fixedram.image.analyze import extract_block

    n = extract_block(image, block, output)
    click.echo(f"{output}: {n} bytes of '{block}'", err=True)
