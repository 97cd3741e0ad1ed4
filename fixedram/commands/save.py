"""``fixedram save``: save a running QEMU VM into a mapped-ram image over QMP (like
``virsh save``)."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from fixedram.commands import cli, one_line_errors
from fixedram.units import format_size

__all__ = ["parse_rate", "save_command", "show_progress"]


def parse_rate(text: str) -> int:
    """``64M`` / ``1G`` / ``1048576`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?(?:/s)?\s*", text)
    if not m:
        raise click.BadParameter(f"bad size {text!r} (e.g. 64M, 1G)")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " "))


def _ms(s: float | None) -> str:
    return "?" if s is None else f"{s * 1000:.0f} ms"


def show_progress(flag: bool | None) -> bool:
    """Whether a command draws a progress bar: ``--progress/--no-progress`` if given, else
    when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


@cli.command("save")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--qmp", "qmp_socket", metavar="SOCKET", type=click.Path(),
              help="QMP unix socket of the running QEMU (a free monitor).")
@click.option("--libvirt", "domain", metavar="DOMAIN",
              help="Save this libvirt domain (instead of --qmp) into a libvirt sparse image "
                   "that virsh restore loads; the domain ends stopped, as with virsh save.")
@click.option("--connect", "uri", metavar="URI", help="--libvirt: libvirt connection URI "
              "(as virsh -c; default: libvirt's default).")
@click.option("--libvirt-xml", "libvirt_xml", type=click.Path(dir_okay=False, exists=True),
              metavar="XML", help="With --qmp: write a libvirt sparse image with this domain "
                                  "XML in its header.")
@click.option("--live", is_flag=True,
              help="Keep the guest running while RAM is copied (default: pause it first).")
@click.option("--via", type=click.Choice(["auto", "native", "proxy"]), default="auto",
              show_default=True,
              help="native: QEMU (>= 9.0) writes mapped-ram itself; proxy: QEMU migrates "
                   "into fixedram, which writes the image (any QEMU). auto: native where "
                   "QEMU can, except for an s3:// IMAGE saved paused: proxy, which uploads "
                   "chunks while it writes them.")
@click.option("--resume", is_flag=True, help="Run the VM again after a successful save.")
@click.option("--direct-io", is_flag=True, help="Write page data with O_DIRECT.")
@click.option("--channels", type=click.IntRange(0, 64), default=None, metavar="N",
              help="multifd channels: native, QEMU's writer threads (default 2); proxy, "
                   "parallel connections into fixedram (default 2; one where QEMU cannot "
                   "connect to fixedram, and for a paused save to s3://; 0: one "
                   "connection).")
@click.option("--bandwidth", metavar="RATE", help="Limit the copy to RATE bytes/s (64M, 1G); "
              "default unlimited.")
@click.option("--live-timeout", type=float, metavar="SECONDS",
              help="With --live: pause the guest if the copy has not converged after this long.")
@click.option("--progress/--no-progress", "progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def save_command(image: str, qmp_socket: str | None, live: bool, via: str, resume: bool,
                 direct_io: bool, channels: int | None, bandwidth: str | None,
                 live_timeout: float | None, progress: bool | None, as_json: bool,
                 domain: str | None = None, uri: str | None = None,
                 libvirt_xml: str | None = None) -> None:
    """Save the RAM and device state of the VM behind --qmp into IMAGE (mapped-ram).

    IMAGE is replaced atomically, and only by a complete, fsynced image. The VM stays paused
    afterwards unless --resume; if the save fails, a VM that was running runs again (for an
    s3:// IMAGE, also when the upload fails: it happens while fixedram still holds the VM).
    """
    from fixedram.errors import FixedramError
    from fixedram.image.chunked import staging
    from fixedram.io.objstore import is_object_url
    from fixedram.qmp.client import QMP
    from fixedram.qmp.progress import ProgressBar
    from fixedram.qmp.save import MAX_BANDWIDTH, save

    rate = parse_rate(bandwidth) if bandwidth else MAX_BANDWIDTH
    if (qmp_socket is None) == (domain is None):
        raise click.UsageError("give one of --qmp SOCKET and --libvirt DOMAIN")
    if (domain or libvirt_xml) and is_object_url(image):
        raise click.UsageError("a libvirt image is a local file, not an s3:// object")
    if domain is not None:
        if resume or libvirt_xml:
            raise click.UsageError("--libvirt stops the domain (as virsh save) and writes its "
                                   "own XML: no --resume, no --libvirt-xml")
        from fixedram.qmp.libvirt import Libvirt, save_domain

        with Libvirt(uri) as lv, ProgressBar("save", disable=not show_progress(progress)) as bar:
            r = save_domain(lv, domain, image, via=via, live=live,
                            direct_io=direct_io, progress=bar, max_bandwidth=rate,
                            stop_after=live_timeout, multifd_channels=channels)
        _report(r, as_json, f"domain {domain} stopped", image, None)
        return
    from fixedram.image.libvirt import read_domain_xml

    xml = read_domain_xml(libvirt_xml) if libvirt_xml else None
    assert qmp_socket is not None
    obj = is_object_url(image)
    with staging(image) as (target, finish, early), QMP.connect(qmp_socket) as qmp:
        was_running = qmp.status() == "running"
        with ProgressBar("save", disable=not show_progress(progress)) as bar:
            r = save(qmp, target, live=live, via=via,  # type: ignore[arg-type]
                     resume=resume and not obj, direct_io=direct_io, progress=bar,
                     max_bandwidth=rate, stop_after=live_timeout, multifd_channels=channels,
                     libvirt_xml=xml, observer=early)
        try:
            upload = finish()
        except FixedramError as e:
            if not was_running:
                raise
            qmp.cmd("cont")  # as for any failed save: a VM that was running runs again
            e.args = (f"{e} (the VM runs again)",)
            raise
        if resume and obj:
            qmp.cmd("cont")
            r.resumed = True
    _report(r, as_json, "VM " + ("resumed" if r.resumed else "left paused"), image, upload)


def _report(r: Any, as_json: bool, after: str, image: str, upload: Any) -> None:
    """The save's report; ``upload``: what an object-store save uploaded (or None)."""
    if as_json:
        click.echo(json.dumps({**r.as_dict(), "image": image,
                               **({"upload": upload.as_dict()} if upload else {})},
                              indent=2))
        return
    if upload:
        click.echo(f"uploaded {upload.summary()}")
    click.echo(
        f"saved {r.machine} (QEMU {r.qemu_version}) to {image if upload else r.image} "
        f"via {r.via}{f' over {r.channels} multifd channels' if r.channels else ''}"
        f"{' (live)' if r.live else ''} in {r.total_time:.2f} s\n"
        f"  migration {r.migration_time:.2f} s (QEMU total {_ms(r.qemu_total_time)}, "
        f"downtime {_ms(r.downtime)}), {format_size(r.bytes_transferred)} transferred, "
        f"{r.pages_transferred} pages, {r.dirty_passes} passes\n"
        f"  image: {r.pages_in_image} pages, {format_size(r.image_apparent_size)} apparent, "
        f"{format_size(r.image_allocated_size)} allocated; RAM {format_size(r.ram_size)}\n"
        f"  {after}"
    )
