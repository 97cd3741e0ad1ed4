"""``fixedram restore``: load an image into a QEMU started with ``-incoming defer``, over QMP
(like ``virsh restore``)."""

from __future__ import annotations

import json

import click

from fixedram.cli import cli, one_line_errors
from fixedram.commands.save import _show_progress, fmt_size

__all__ = ["restore_command"]


@cli.command("restore")
@click.argument("image", type=click.Path(dir_okay=False, exists=True))
@click.option("--qmp", "qmp_socket", required=True, metavar="SOCKET", type=click.Path(),
              help="QMP unix socket of a QEMU started with the same VM options plus "
                   "-incoming defer.")
@click.option("--via", type=click.Choice(["auto", "native", "proxy"]), default="auto",
              show_default=True,
              help="native: QEMU (>= 9.0) loads the mapped-ram file itself; proxy: fixedram "
                   "streams the image into QEMU (any QEMU, any image).")
@click.option("--paused", is_flag=True, help="Leave the VM paused after the load.")
@click.option("--multifd-channels", type=click.IntRange(0, 64), default=0, show_default=True,
              help="native: load with this many multifd channels.")
@click.option("--progress/--no-progress", "progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def restore_command(image: str, qmp_socket: str, via: str, paused: bool,
                    multifd_channels: int, progress: bool | None, as_json: bool) -> None:
    """Restore IMAGE into the waiting QEMU behind --qmp, then resume the VM.

    The image is checked against the destination's machine type and RAM blocks first; a
    mismatch is refused before QEMU receives anything, and QEMU stays usable.
    """
    from fixedram.qmp.client import QMP
    from fixedram.qmp.progress import ProgressBar
    from fixedram.qmp.restore import restore

    with QMP.connect(qmp_socket) as qmp, \
            ProgressBar("restore", disable=not _show_progress(progress)) as bar:
        r = restore(qmp, image, via=via, paused=paused,  # type: ignore[arg-type]
                    progress=bar, multifd_channels=multifd_channels)
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=2))
        return
    click.echo(
        f"restored {r.image} ({r.image_format}) into {r.machine} (QEMU {r.qemu_version}) via "
        f"{r.via} in {r.total_time:.2f} s\n"
        f"  load {r.load_time:.2f} s: {r.pages} pages, {fmt_size(r.bytes)}"
        f" ({r.mb_per_s:.0f} MB/s), {r.zero_pages} zero pages; RAM {fmt_size(r.ram_size)}\n"
        f"  VM {r.status}"
    )
