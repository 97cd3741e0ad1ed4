"""``fixedram restore``: load an image into a QEMU started with ``-incoming defer``, over QMP
(like ``virsh restore``)."""

from __future__ import annotations

import json
import time

import click

from fixedram.cli import cli, direct_io_options, direct_mode, one_line_errors
from fixedram.commands.save import show_progress
from fixedram.units import format_size

__all__ = ["restore_command"]


@cli.command("restore")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--qmp", "qmp_socket", required=True, metavar="SOCKET", type=click.Path(),
              help="QMP unix socket of a QEMU started with the same VM options plus "
                   "-incoming defer.")
@click.option("--via", type=click.Choice(["auto", "native", "proxy"]), default="auto",
              show_default=True,
              help="native: QEMU (>= 9.0) loads the mapped-ram file itself; proxy: fixedram "
                   "streams the image into QEMU (any QEMU, any image).")
@click.option("--paused", is_flag=True, help="Leave the VM paused after the load.")
@click.option("--progress/--no-progress", "progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--lazy", is_flag=True,
              help="Run the guest at once and serve its pages on demand (postcopy). If the "
                   "image or fixedram fails after the guest started, the guest cannot "
                   "continue and must be killed.")
@click.option("--transport", type=click.Choice(["fd", "unix", "exec"]), default="fd",
              show_default=True, help="--lazy: how the stream reaches QEMU.")
@click.option("--push-rate", type=str, default=None, metavar="RATE",
              help="--lazy: throttle the background push to RATE bytes/s (64M, 1G...).")
@direct_io_options("Read")
@click.option("--channels", type=click.IntRange(0, 255), default=0, show_default=True,
              metavar="N",
              help="multifd channels (sets capability multifd and multifd-channels on the "
                   "destination): native, QEMU's reader threads; proxy, fixedram sends the "
                   "pages over N connections.")
@one_line_errors
def restore_command(image: str, qmp_socket: str, via: str, paused: bool,
                    progress: bool | None, as_json: bool,
                    lazy: bool = False, transport: str = "fd",
                    push_rate: str | None = None, direct_io: bool = False,
                    require_direct_io: bool = False,
                    channels: int = 0) -> None:
    """Restore IMAGE into the waiting QEMU behind --qmp, then resume the VM.

    The image is checked against the destination's machine type and RAM blocks first; a
    mismatch is refused before QEMU receives anything, and QEMU stays usable.
    """
    started = time.monotonic()
    from fixedram.qmp.client import QMP
    from fixedram.qmp.progress import ProgressBar
    from fixedram.qmp.restore import restore

    direct = direct_mode(direct_io, require_direct_io)
    if lazy:
        if channels or direct:
            raise click.UsageError("--lazy takes neither --channels nor --direct-io")
        _lazy(image, qmp_socket, paused, progress, as_json, transport, push_rate, started)
        return

    with QMP.connect(qmp_socket) as qmp, \
            ProgressBar("restore", disable=not show_progress(progress)) as bar:
        r = restore(qmp, image, via=via, paused=paused,  # type: ignore[arg-type]
                    progress=bar, channels=channels, direct_io=direct)
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=2))
        return
    click.echo(
        f"restored {r.image} ({r.image_format}) into {r.machine} (QEMU {r.qemu_version}) via "
        f"{r.via}" + (f", {r.channels} channels" if r.channels else "")
        + (", O_DIRECT" if r.direct_io else "") + f" in {r.total_time:.2f} s\n"
        f"  load {r.load_time:.2f} s: {r.pages} pages, {format_size(r.bytes)}"
        f" ({r.mb_per_s:.0f} MB/s), {r.zero_pages} zero pages; RAM {format_size(r.ram_size)}\n"
        f"  VM {r.status}"
    )


def _lazy(image: str, qmp_socket: str, paused: bool, progress: bool | None, as_json: bool,
          transport: str, push_rate: str | None, started: float) -> None:
    """``restore --lazy``: :func:`fixedram.qmp.lazy.lazy_restore` and its report."""
    from fixedram.commands.save import parse_rate
    from fixedram.qmp.client import QMP
    from fixedram.qmp.lazy import lazy_restore
    from fixedram.qmp.progress import ProgressBar

    rate = parse_rate(push_rate) if push_rate else None
    with QMP.connect(qmp_socket) as qmp, \
            ProgressBar("lazy restore", disable=not show_progress(progress)) as bar:
        r = lazy_restore(qmp, image, transport=transport,  # type: ignore[arg-type]
                         paused=paused, progress=bar, push_rate=rate,
                         started=started)
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=2))
        return
    click.echo(
        f"lazily restored {r.image} ({r.image_format}) into {r.machine} (QEMU "
        f"{r.qemu_version}) over {r.transport}\n"
        f"  time to running {r.time_to_running * 1000:.0f} ms"
        f"{' (paused)' if paused else ''}; total {r.total_time:.2f} s\n"
        f"  {r.pages} pages: {r.pages_on_demand} served on demand ({r.requests} requests), "
        f"{r.pages_pushed} pushed; {r.zero_on_demand} zero pages on demand; RAM "
        f"{format_size(r.ram_size)}\n"
        f"  VM {r.status}"
    )
