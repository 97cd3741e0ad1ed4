"""``fixedram restore``: load an image into a QEMU started with ``-incoming defer``, over QMP
(like ``virsh restore``)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from fixedram.commands import (
    cli,
    direct_io_options,
    direct_mode,
    lazy_options,
    one_line_errors,
)
from fixedram.commands.save import parse_rate, show_progress
from fixedram.units import format_size

__all__ = ["restore_command"]


@cli.command("restore")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--qmp", "qmp_socket", metavar="SOCKET", type=click.Path(),
              help="QMP unix socket of a QEMU started with the same VM options plus "
                   "-incoming defer.")
@click.option("--libvirt", "use_libvirt", is_flag=True,
              help="Instead of --qmp: start the image's libvirt domain (from its header XML, "
                   "or --xml) and restore into it, as virsh restore does.")
@click.option("--connect", "uri", metavar="URI", help="--libvirt: libvirt connection URI "
              "(as virsh -c; default: libvirt's default).")
@click.option("--xml", "xml_file", type=click.Path(dir_okay=False, exists=True), metavar="XML",
              help="--libvirt: the domain XML (for images without a libvirt header).")
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
@lazy_options("--lazy")
@direct_io_options("Read")
@click.option("--channels", type=click.IntRange(0, 255), default=None, metavar="N",
              help="multifd channels (sets capability multifd and multifd-channels on the "
                   "destination): native, QEMU's reader threads; proxy, fixedram sends the "
                   "pages over N connections; 0: one stream. Default: 2 for a proxy restore "
                   "of a mapped-ram image (a file or s3://) read buffered, one stream where "
                   "QEMU cannot listen for them; else 0.")
@one_line_errors
def restore_command(image: str, qmp_socket: str, via: str, paused: bool,
                    progress: bool | None, as_json: bool,
                    lazy: bool = False, transport: str = "fd",
                    push_rate: str | None = None, direct_io: bool = False,
                    require_direct_io: bool = False,
                    channels: int | None = None, use_libvirt: bool = False, uri: str | None = None,
                    xml_file: str | None = None, no_record: bool = False,
                    no_prefetch: bool = False, prefetch_rate: str | None = None) -> None:
    """Restore IMAGE into the waiting QEMU behind --qmp, then resume the VM.

    The image is checked against the destination's machine type and RAM blocks first; a
    mismatch is refused before QEMU receives anything, and QEMU stays usable.
    """
    started = time.monotonic()
    direct = direct_mode(direct_io, require_direct_io)
    if use_libvirt == (qmp_socket is not None):
        raise click.UsageError("give one of --qmp SOCKET and --libvirt")
    if lazy and (channels or direct):
        raise click.UsageError("--lazy takes neither --channels nor --direct-io")
    if not lazy and (no_record or no_prefetch or prefetch_rate):
        raise click.UsageError("--no-record, --no-prefetch and --prefetch-rate go with --lazy")
    lazy_kw = {"transport": transport, "started": started,
               "push_rate": parse_rate(push_rate) if push_rate else None,
               "prefetch_rate": parse_rate(prefetch_rate) if prefetch_rate else None,
               "prefetch": not no_prefetch, "record": not no_record}
    if use_libvirt:
        from fixedram.io.objstore import is_object_url

        if is_object_url(image):
            raise click.UsageError("--libvirt restores a local image file, not an s3:// object")
        _libvirt(image, uri, xml_file, paused, lazy, via, progress, as_json,
                 lazy_kw if lazy else {"channels": channels, "direct_io": direct})
        return
    assert qmp_socket is not None
    if lazy:
        _lazy(image, qmp_socket, paused, progress, as_json, lazy_kw)
        return
    from fixedram.qmp.client import QMP
    from fixedram.qmp.progress import ProgressBar
    from fixedram.qmp.restore import restore

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
          kw: dict[str, Any]) -> None:
    """``restore --lazy``: :func:`fixedram.qmp.lazy.lazy_restore` (``kw``: its options) and
    its report."""
    from fixedram.qmp.client import QMP
    from fixedram.qmp.lazy import lazy_restore
    from fixedram.qmp.progress import ProgressBar

    with QMP.connect(qmp_socket) as qmp, \
            ProgressBar("lazy restore", disable=not show_progress(progress)) as bar:
        r = lazy_restore(qmp, image, paused=paused, progress=bar, **kw)
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
        + (f"  working set: {r.pages_prefetched + r.zero_prefetched} of "
           f"{r.working_set_pages} recorded pages prefetched\n" if r.working_set_pages else "")
        + f"  working-set record: {r.record}\n"
        f"  VM {r.status}"
    )


def _libvirt(image: str, uri: str | None, xml_file: str | None, paused: bool, lazy: bool,
             via: str, progress: bool | None, as_json: bool, kw: dict[str, Any]) -> None:
    """``restore --libvirt``: :func:`fixedram.qmp.libvirt.restore_domain` (``kw``: the options
    of the load) and its report. The loader is imported there, while libvirt starts QEMU."""
    from fixedram.qmp.libvirt import Libvirt, restore_domain
    from fixedram.qmp.progress import ProgressBar

    with Libvirt(uri) as lv, \
            ProgressBar("restore", disable=not show_progress(progress)) as bar:
        name, r = restore_domain(lv, image, xml_file=xml_file,
                                 paused=True if paused else None, lazy=lazy, via=via,
                                 progress=bar, **kw)
    if as_json:
        click.echo(json.dumps({"domain": name, **r.as_dict()}, indent=2))
        return
    how = "lazily" if lazy else f"via {r.via}"
    click.echo(f"restored {r.image} ({r.image_format}) into libvirt domain {name} {how} in "
               f"{r.total_time:.2f} s; RAM {format_size(r.ram_size)}")
