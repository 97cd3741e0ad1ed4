"""``fixedram analyze``: describe an image (format, machine, RAM blocks, devices, sizes).

The report comes from :func:`fixedram.image.analyze.analyze_image`; ``--json`` prints it as
``docs/analyze-schema.md`` describes.
"""

from __future__ import annotations

import click

from fixedram.commands import cli, one_line_errors

__all__ = ["analyze_cmd"]


@cli.command("analyze")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (docs/analyze-schema.md)."
)
@one_line_errors
def analyze_cmd(image: str, as_json: bool) -> None:
    """Describe IMAGE: format, machine, RAM blocks, devices, sizes."""
    from fixedram.image.analyze import analyze_image, format_report

    report = analyze_image(image)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
