"""``fixedram gc``: delete the chunks of an object-store bucket that no image references,
and the working-set records of images that were deleted.

Safe against saves running at the same time (the rule is in
:mod:`fixedram.image.chunked` and ``docs/object-storage.md``): a chunk goes only when no
manifest in the bucket names it and it is older than the bucket's grace period.
"""

from __future__ import annotations

import json

import click

from fixedram.commands import cli, one_line_errors

__all__ = ["gc_cmd"]


@cli.command("gc")
@click.argument("bucket", metavar="s3://BUCKET")
@click.option("--grace", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="Set the bucket's grace period first (default 86400; saves started "
                   "afterwards follow it). Lowering it while saves run is unsafe: a running "
                   "save relies on the period it read when it started.")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted, delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def gc_cmd(bucket: str, grace: float | None, dry_run: bool, as_json: bool) -> None:
    """Delete the chunks in BUCKET that no image's manifest references, and the
    working-set records of deleted images."""
    from fixedram.image.chunked import collect_garbage

    r = collect_garbage(bucket, grace=grace, dry_run=dry_run)
    click.echo(json.dumps(r.as_dict(), indent=2) if as_json else r.summary())
