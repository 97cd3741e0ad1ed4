"""``fixedram verify``: check an image; ``--add`` stores page checksums in it.

Exit status: 0 clean, 1 corrupt (one line per problem: each bad extent with its
RAM block and offset in the block), 2 unreadable input or a failed ``--add``.
See ``docs/checksums.md``.
"""

from __future__ import annotations

import sys

import click

from fixedram.commands import cli, one_line_errors
from fixedram.errors import ImageError, printable

__all__ = ["verify_cmd"]


@cli.command("verify")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--add", "add", is_flag=True,
              help="Checksum IMAGE in place (mapped-ram; QEMU's own images too). Refuses a "
                   "damaged image.")
@click.option("--force", is_flag=True,
              help="With --add: re-checksum even if existing checksums do not match.")
@click.option("--no-pages", is_flag=True,
              help="Check structure and metadata digests only, not page data.")
@one_line_errors
def verify_cmd(image: str, as_json: bool, add: bool, force: bool, no_pages: bool) -> None:
    """Check IMAGE's structure and, if it carries them, its checksums (exit 0/1/2)."""
    from fixedram.image.verify import add_checksums, verify_image

    if add:
        rep = add_checksums(image, force=force)
        if as_json:
            import json
            from dataclasses import asdict

            click.echo(json.dumps(asdict(rep), indent=2))
        else:
            c = rep.checksums
            click.echo(f"{image}: {'replaced' if rep.replaced else 'added'} checksums: "
                       f"{c['extents']} extents of {c['extent_size'] >> 10} KiB "
                       f"({c['size']} bytes at byte {c['file_offset']}), "
                       f"{rep.pages_read} pages read in {rep.elapsed:.2f} s")
        return
    report = verify_image(image, pages=not no_pages)
    if as_json:
        click.echo(report.to_json())
    elif report.status == "unreadable":
        raise ImageError(f"{image}: {report.problems[0].message}")
    else:
        for line in report.lines():
            click.echo(printable(line))
    sys.exit(report.exit_code)
