"""Save and restore a libvirt domain (``fixedram save --libvirt`` / ``restore --libvirt``).

libvirt owns its domains' QMP monitor, so fixedram reaches QEMU through ``virsh``:
``virsh qemu-monitor-command`` runs one QMP command (and with ``--pass-fds`` hands QEMU a
descriptor for ``getfd``), which is all :func:`fixedram.qmp.save.save`,
:func:`fixedram.qmp.restore.restore` and :func:`fixedram.qmp.lazy.lazy_restore` need:
:class:`VirshMonitor` is a :class:`~fixedram.qmp.client.QMP` that speaks through it. The
``virsh`` program rather than the libvirt-python binding: it comes with the libvirt client
packages, while the binding must be built against libvirt's headers with a compiler, and
``virsh`` already offers everything used here (one QMP command per call, events read by
polling instead).

* **save**: the domain's migratable XML (``virsh dumpxml --migratable``) goes into the
  header of a libvirt sparse image that fixedram writes as a save does (``--via proxy``:
  QEMU migrates into fixedram over a socket pair; ``native``: QEMU writes the mapped-ram
  stream after the header); then the domain is destroyed, as ``virsh save`` leaves it.
  ``virsh restore`` loads the image.
* **restore**: the domain is created from the image's header XML (or ``--xml``), paused and
  with ``-incoming defer`` added through libvirt's QEMU command-line passthrough, so QEMU
  waits for fixedram's stream; fixedram loads the image (any format it reads, libvirt's
  compressed ones included) and resumes the domain through libvirt. ``--lazy`` runs the same
  domain as a postcopy destination. libvirt marks such a domain "tainted" (custom argv).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fixedram.errors import FixedramError, QMPCommandError, VMError
from fixedram.qmp.client import QMP, Events

__all__ = ["Virsh", "VirshMonitor", "incoming_xml", "save_domain", "restore_domain",
           "domain_xml_of"]

_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Seconds between two readings of QEMU's state through virsh (each is a process).
_POLL = 0.1


class Virsh:
    """Runs ``virsh`` against one connection URI (``qemu:///system`` by default)."""

    def __init__(self, uri: str | None = None, *, timeout: float = 120.0) -> None:
        exe = shutil.which("virsh")
        if exe is None:
            raise VMError("virsh is not installed (scripts/setup.sh --libvirt installs it)")
        self.exe = exe
        self.uri = uri
        self.timeout = timeout

    def argv(self, *args: str) -> list[str]:
        """The command line of ``virsh ARGS`` on this connection."""
        return [self.exe, "-q", *(("-c", self.uri) if self.uri else ()), *args]

    def run(self, *args: str, pass_fds: Sequence[int] = ()) -> str:
        """``virsh ARGS``; its stdout. A failure raises :class:`VMError` with virsh's message."""
        try:
            r = subprocess.run(self.argv(*args), capture_output=True, text=True, check=False,
                               pass_fds=tuple(pass_fds), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise VMError(f"virsh {args[0]} did not answer within {self.timeout:.0f} s") \
                from None
        if r.returncode != 0:
            lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
            msg = lines[0] if lines else f"exit status {r.returncode}"
            raise VMError(f"virsh {args[0]}: {msg.removeprefix('error: ')}")
        return r.stdout

    def state(self, domain: str) -> str:
        """``running``, ``paused``, ``shut off``..."""
        return self.run("domstate", domain).strip()


class _PolledEvents(Events):
    """No events through virsh: a wait is a pause before the next reading."""

    def __init__(self) -> None:  # no QMP session to register with
        pass

    def get(self, timeout: float) -> dict[str, Any] | None:
        time.sleep(max(timeout, _POLL))
        return None

    def close(self) -> None:
        pass


class VirshMonitor(QMP):
    """A libvirt domain's QEMU monitor reached through ``virsh qemu-monitor-command``."""

    def __init__(self, virsh: Virsh, domain: str) -> None:  # no socket, no loop thread
        self.virsh = virsh
        self.domain = domain
        self.path = Path(f"libvirt:{domain}")
        self.timeout = virsh.timeout
        self._lock = threading.Lock()
        self._version = None
        self._client = None

    def close(self) -> None:
        pass

    def batch(self, *calls: tuple[str, Mapping[str, Any] | None],
              timeout: float | None = None) -> list[Any]:
        return [self._one(name, args) for name, args in calls]

    def _one(self, name: str, args: Mapping[str, Any] | None,
             pass_fds: Sequence[int] = ()) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = dict(args)
        extra = ("--pass-fds", ",".join(map(str, pass_fds))) if pass_fds else ()
        try:
            out = self.virsh.run("qemu-monitor-command", *extra, self.domain, json.dumps(msg),
                                 pass_fds=pass_fds)
        except VMError as e:
            raise QMPCommandError(f"QMP {name}: {e}") from None
        try:
            reply = json.loads(out)
        except ValueError:
            raise VMError(f"QMP {name}: virsh returned no JSON ({out[:80]!r})") from None
        if "error" in reply:
            raise QMPCommandError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def events(self, *names: str) -> Events:
        return _PolledEvents()

    def send_fd(self, fd: int, name: str) -> None:
        self._one("getfd", {"fdname": name}, pass_fds=(fd,))

    def __repr__(self) -> str:
        return f"<VirshMonitor {self.domain}>"


def domain_xml_of(virsh: Virsh, domain: str) -> str:
    """The domain's migratable XML, as ``virsh save`` puts it in its header."""
    return virsh.run("dumpxml", "--migratable", domain)


def incoming_xml(xml: str) -> str:
    """``xml`` with ``-incoming defer`` passed to QEMU (libvirt's QEMU namespace)."""
    ET.register_namespace("qemu", _QEMU_NS)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise FixedramError(f"the domain XML does not parse ({e})") from None
    cl = root.find(f"{{{_QEMU_NS}}}commandline")
    if cl is None:
        cl = ET.SubElement(root, f"{{{_QEMU_NS}}}commandline")
    for v in ("-incoming", "defer"):
        ET.SubElement(cl, f"{{{_QEMU_NS}}}arg", value=v)
    return ET.tostring(root, encoding="unicode")


def save_domain(virsh: Virsh, domain: str, image: str | os.PathLike[str], *,
                via: str = "auto", **kw: Any) -> Any:
    """Save the libvirt ``domain`` into the libvirt sparse image ``image`` and stop it, as
    ``virsh save`` does (``kw``: :func:`fixedram.qmp.save.save`'s options). On failure the
    domain keeps running (or stays paused) as it was."""
    from fixedram.qmp.save import save

    state = virsh.state(domain)
    if state not in ("running", "paused"):
        raise VMError(f"domain {domain} is {state}: there is nothing to save")
    xml = domain_xml_of(virsh, domain)
    mon = VirshMonitor(virsh, domain)
    report = save(mon, image, via=via, libvirt_xml=xml,  # type: ignore[arg-type]
                  libvirt_running=state == "running", **kw)
    virsh.run("destroy", domain)
    return report


def restore_domain(virsh: Virsh, image: str | os.PathLike[str], *,
                   xml_file: str | None = None, paused: bool | None = None,
                   lazy: bool = False, via: str = "auto", **kw: Any) -> tuple[str, Any]:
    """Start the domain of ``image`` (its libvirt header's XML, or ``xml_file``) and load the
    image into it; returns ``(domain name, report)``. ``paused`` None: as the image says
    (a libvirt image saved from a running domain runs). On failure the domain is destroyed.
    """
    from fixedram.image.libvirt import read_domain_xml, refuse_compressed, summarize_xml
    from fixedram.image.reader import open_image

    if lazy:
        refuse_compressed(image, "a lazy restore")
    if xml_file is not None:
        xml, running = read_domain_xml(xml_file), True
    else:
        with open_image(image) as img:
            if img.libvirt is None:
                raise FixedramError(f"{image} has no libvirt header: give the domain's XML "
                                    "with --xml")
            xml, running = img.libvirt.xml, img.libvirt.was_running
    stay_paused = (not running) if paused is None else paused
    name = summarize_xml(xml).name
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="fixedram-") as f:
        f.write(incoming_xml(xml))
        f.flush()
        virsh.run("create", "--paused", f.name)
    report: Any
    try:
        mon = VirshMonitor(virsh, name)
        if lazy:
            from fixedram.qmp.lazy import lazy_restore

            report = lazy_restore(mon, image, paused=stay_paused, **kw)
            if not stay_paused and virsh.state(name) != "running":
                virsh.run("resume", name)
        else:
            from fixedram.qmp.restore import restore

            report = restore(mon, image, via=via, paused=True,  # type: ignore[arg-type]
                             **kw)
            if not stay_paused:
                virsh.run("resume", name)  # through libvirt, so that it knows
    except BaseException:
        with contextlib.suppress(FixedramError):
            virsh.run("destroy", name)
        raise
    return name, report
