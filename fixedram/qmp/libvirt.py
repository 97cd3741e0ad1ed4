"""Save and restore a libvirt domain (``fixedram save --libvirt`` / ``restore --libvirt``).

libvirt owns its domains' QMP monitor, so fixedram reaches QEMU through libvirt's QMP
passthrough, with the libvirt-python binding (an optional dependency: ``pip install
'fixedram[libvirt]'``, or ``scripts/setup.sh --libvirt``): one connection per command, each
QMP command a call on it (``virDomainQemuMonitorCommand``; ``...WithFiles`` hands QEMU a
descriptor for ``getfd``), and QEMU's events delivered by libvirt
(``virConnectDomainQemuMonitorEventRegister``) to a queue, so that waits end on them as with
a direct monitor. :class:`LibvirtMonitor` is a :class:`~fixedram.qmp.client.QMP` that speaks
through it, which is all :func:`fixedram.qmp.save.save`, :func:`fixedram.qmp.restore.restore`
and :func:`fixedram.qmp.lazy.lazy_restore` need. Why the binding and not ``virsh``
(``docs/libvirt.md`` §4): a ``virsh`` process per command cost 25-60 ms each, a dozen and
more per operation, and offered no events.

* **save**: the domain's migratable XML goes into the header of a libvirt sparse image that
  fixedram writes as a save does (``--via proxy``: QEMU migrates into fixedram, over 2
  multifd channels, or one socket pair where QEMU cannot connect to fixedram; ``native``:
  QEMU writes the mapped-ram stream after the header); then the domain is destroyed, as
  ``virsh save`` leaves it. ``virsh restore`` loads the image.
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
import queue
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fixedram.errors import ImageError, QMPCommandError, VMError
from fixedram.qmp.client import DEFAULT_TIMEOUT, QMP, Events

__all__ = ["Libvirt", "LibvirtMonitor", "save_domain", "restore_domain", "incoming_xml"]

_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_MISSING = ("the libvirt Python binding is not installed (pip install 'fixedram[libvirt]', "
            "or scripts/setup.sh --libvirt)")

_loop_lock = threading.Lock()
_loop_started = False


def _binding() -> tuple[Any, Any]:
    """The ``libvirt`` and ``libvirt_qemu`` modules; :class:`VMError` when not installed."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise VMError(_MISSING) from None
    return libvirt, libvirt_qemu


def _start_event_loop(libvirt: Any) -> None:
    """libvirt's own event loop in a daemon thread, once per process (before the first
    connection: libvirt delivers events, and keeps connections alive, only with one)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="fixedram-libvirt-events", daemon=True).start()
        _loop_started = True


def _message(e: Exception) -> str:
    get = getattr(e, "get_error_message", None)
    msg = get() if get is not None else None
    return " ".join(str(msg or e).split())


class Libvirt:
    """A connection to libvirt (``uri``: as ``virsh -c``; None: libvirt's default). A
    context manager; every libvirt failure is a one-line :class:`VMError`."""

    def __init__(self, uri: str | None = None) -> None:
        libvirt, qemu = _binding()
        self.api, self.qemu_api = libvirt, qemu  # the binding's two modules
        _start_event_loop(libvirt)
        # libvirt prints every error on stderr unless a handler takes it: ours are raised
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.uri = uri
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            where = f" at {uri}" if uri else ""
            raise VMError(f"cannot connect to libvirt{where}: {_message(e)}") from None

    def call(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, a libvirt failure raised as ``VMError("libvirt WHAT: ...")``."""
        try:
            return fn(*args)
        except self.api.libvirtError as e:
            raise VMError(f"libvirt {what}: {_message(e)}") from None

    def domain(self, name: str) -> Any:
        """The domain called ``name``."""
        return self.call("domain", self.conn.lookupByName, name)

    def state(self, dom: Any) -> str:
        """``running``, ``paused``, ``shut off``..."""
        lv = self.api
        st = self.call("domain state", dom.state)[0]
        return {lv.VIR_DOMAIN_RUNNING: "running", lv.VIR_DOMAIN_PAUSED: "paused",
                lv.VIR_DOMAIN_SHUTOFF: "shut off", lv.VIR_DOMAIN_SHUTDOWN: "in shutdown",
                lv.VIR_DOMAIN_CRASHED: "crashed", lv.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
                lv.VIR_DOMAIN_BLOCKED: "running"}.get(st, "unknown")

    def migratable_xml(self, dom: Any) -> str:
        """The domain's XML as ``virsh dumpxml --migratable`` (and ``virsh save``) give it."""
        return str(self.call("dumpxml", dom.XMLDesc, self.api.VIR_DOMAIN_XML_MIGRATABLE))

    def create_paused(self, xml: str) -> Any:
        """Start a transient domain from ``xml``, paused (``virsh create --paused``)."""
        return self.call("create", self.conn.createXML, xml, self.api.VIR_DOMAIN_START_PAUSED)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> Libvirt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LibvirtEvents(Events):
    """QEMU events of one domain, as libvirt passes them on, queued for :meth:`get`."""

    def __init__(self, lv: Libvirt, dom: Any, names: tuple[str, ...]) -> None:
        self._lv = lv
        self._q: queue.Queue[dict[str, Any]] = queue.Queue()
        wanted = set(names)

        def cb(_conn: Any, _dom: Any, event: str, secs: int, micros: int, details: str | None,
               _opaque: Any) -> None:
            if not wanted or event in wanted:
                self._q.put({"event": event, "data": json.loads(details) if details else {},
                             "timestamp": {"seconds": secs, "microseconds": micros}})

        self._id: int | None = lv.call("event registration", lv.qemu_api.qemuMonitorEventRegister,
                                        lv.conn, dom, None, cb, None, 0)

    def get(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self._q.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def close(self) -> None:
        cid, self._id = self._id, None
        if cid is not None:
            with contextlib.suppress(Exception):
                self._lv.qemu_api.qemuMonitorEventDeregister(self._lv.conn, cid)


class LibvirtMonitor(QMP):
    """A libvirt domain's QEMU monitor, reached through libvirt's QMP passthrough."""

    def __init__(self, lv: Libvirt, dom: Any) -> None:  # no socket, no loop thread
        self.lv = lv
        self.dom = dom
        self.name = str(dom.name())
        self.path = Path(f"libvirt:{self.name}")
        self.timeout = DEFAULT_TIMEOUT
        self._lock = threading.Lock()
        self._version = None
        self._client = None

    def close(self) -> None:
        pass

    def batch(self, *calls: tuple[str, Mapping[str, Any] | None],
              timeout: float | None = None) -> list[Any]:
        return [self._one(name, args) for name, args in calls]

    def _one(self, name: str, args: Mapping[str, Any] | None, fd: int | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = dict(args)
        q = self.lv.qemu_api
        try:
            if fd is None:
                out = q.qemuMonitorCommand(self.dom, json.dumps(msg), 0)
            else:
                out = q.qemuMonitorCommandWithFiles(self.dom, json.dumps(msg), [fd], 0)[0]
        except self.lv.api.libvirtError as e:
            raise QMPCommandError(f"QMP {name}: {_message(e)}") from None
        try:
            reply = json.loads(out)
        except ValueError:
            raise VMError(f"QMP {name}: libvirt returned no JSON ({str(out)[:80]!r})") from None
        if "error" in reply:
            raise QMPCommandError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def events(self, *names: str) -> Events:
        return _LibvirtEvents(self.lv, self.dom, names)

    def send_fd(self, fd: int, name: str) -> None:
        self._one("getfd", {"fdname": name}, fd=fd)

    def __repr__(self) -> str:
        return f"<LibvirtMonitor {self.name}>"


def incoming_xml(xml: str) -> str:
    """``xml`` with ``-incoming defer`` passed to QEMU (libvirt's QEMU namespace)."""
    ET.register_namespace("qemu", _QEMU_NS)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ImageError(f"the domain XML does not parse ({e})") from None
    cl = root.find(f"{{{_QEMU_NS}}}commandline")
    if cl is None:
        cl = ET.SubElement(root, f"{{{_QEMU_NS}}}commandline")
    for v in ("-incoming", "defer"):
        ET.SubElement(cl, f"{{{_QEMU_NS}}}arg", value=v)
    return ET.tostring(root, encoding="unicode")


def save_domain(lv: Libvirt, domain: str, image: str | os.PathLike[str], *,
                via: str = "auto", **kw: Any) -> Any:
    """Save the libvirt ``domain`` into the libvirt sparse image ``image`` and stop it, as
    ``virsh save`` does (``kw``: :func:`fixedram.qmp.save.save`'s options). On failure the
    domain keeps running (or stays paused) as it was."""
    from fixedram.qmp.save import save

    dom = lv.domain(domain)
    state = lv.state(dom)
    if state not in ("running", "paused"):
        raise VMError(f"domain {domain} is {state}: there is nothing to save")
    xml = lv.migratable_xml(dom)
    report = save(LibvirtMonitor(lv, dom), image, via=via,  # type: ignore[arg-type]
                  libvirt_xml=xml, libvirt_running=state == "running", **kw)
    lv.call("destroy", dom.destroy)
    return report


def restore_domain(lv: Libvirt, image: str | os.PathLike[str], *,
                   xml_file: str | None = None, paused: bool | None = None,
                   lazy: bool = False, via: str = "auto", **kw: Any) -> tuple[str, Any]:
    """Start the domain of ``image`` (its libvirt header's XML, or ``xml_file``) and load the
    image into it; returns ``(domain name, report)``. ``paused`` None: as the image says
    (a libvirt image saved from a running domain runs). On failure the domain is destroyed.

    libvirt starts the domain (QEMU's start-up, most of a restore's fixed cost) in a thread
    while this one imports the loader; the image is then checked against the running domain
    before QEMU is sent a byte, as :func:`fixedram.qmp.restore.restore` does.
    """
    from fixedram.image.libvirt import header_of, read_domain_xml, refuse_compressed
    from fixedram.qmp.common import Worker

    if lazy:
        refuse_compressed(image, "a lazy restore")
    if xml_file is not None:
        xml, running = read_domain_xml(xml_file), True
    else:
        hdr = header_of(image)
        if hdr is None:
            raise ImageError(f"{image} has no libvirt header: give the domain's XML "
                                "with --xml")
        xml, running = hdr.xml, hdr.was_running
    stay_paused = (not running) if paused is None else paused
    creating = Worker.started("fixedram-libvirt-create",
                              lambda: lv.create_paused(incoming_xml(xml)))
    try:
        load = _loader(lazy)
    except BaseException:
        creating.join()
        if creating.result is not None:
            with contextlib.suppress(Exception):
                creating.result.destroy()
        raise
    creating.join()
    if creating.error is not None:
        raise creating.error
    dom = creating.result
    mon = LibvirtMonitor(lv, dom)
    report: Any
    try:
        if lazy:
            report = load(mon, image, paused=stay_paused, **kw)
            if not stay_paused and lv.state(dom) != "running":
                lv.call("resume", dom.resume)
        else:
            report = load(mon, image, via=via, paused=True, **kw)
            if not stay_paused:
                lv.call("resume", dom.resume)  # through libvirt, so that it knows
    except BaseException:
        with contextlib.suppress(Exception):
            dom.destroy()
        raise
    return mon.name, report


def _loader(lazy: bool) -> Any:
    """:func:`~fixedram.qmp.lazy.lazy_restore` or :func:`~fixedram.qmp.restore.restore`,
    imported with the image reader they use."""
    import fixedram.image.reader  # noqa: F401

    if lazy:
        from fixedram.qmp.lazy import lazy_restore

        return lazy_restore
    from fixedram.qmp.restore import restore

    return restore
