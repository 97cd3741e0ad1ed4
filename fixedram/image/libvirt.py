"""libvirt's save-image header (``virsh save`` files), declared once: read, write, complete.

A libvirt save image is a 92-byte header, the domain's XML (and an optional cookie) padded
to ``data_len`` bytes, then QEMU's migration stream (``docs/libvirt.md``)::

    0x00  16 bytes  magic: "LibvirtQemudSave" (complete) or "LibvirtQemudPart" (being written)
    0x10  u32       version (2)
    0x14  u32       data_len: bytes of XML + NUL, cookie + NUL and padding after the header
    0x18  u32       was_running: 1 = the restored domain runs, 0 = it stays paused
    0x1c  u32       format: raw 0, gzip 1, bzip2 2, xz 3, lzop 4, zstd 5, sparse 6
    0x20  u32       cookie offset, counted from the XML's start (0: no cookie)
    0x24  14 x u32  unused (zero)
    0x5c            XML, NUL, [cookie, NUL], zero padding
    0x5c + data_len QEMU's stream: plain (raw), compressed whole by the named tool, or for
                    sparse a mapped-ram stream whose offsets count from the file's start

The u32 fields are in the writer's byte order: a version above 2 means the five fields
are byte-swapped. :func:`read_header` applies the checks libvirt applies on restore (magic,
version, format, data length) and a few more a file can fail (the XML must be there and
parse); :func:`write_header` writes a header with the partial magic, :func:`mark_complete`
turns it into a complete one once everything else is durable.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from fixedram.errors import ImageError
from fixedram.io.objstore import is_object_url

__all__ = [
    "MAGIC",
    "PARTIAL_MAGIC",
    "HEADER",
    "FORMATS",
    "COMPRESSED",
    "LibvirtHeader",
    "DomainSummary",
    "is_libvirt",
    "read_header",
    "header_of",
    "header_bytes",
    "write_header",
    "mark_complete",
    "summarize_xml",
    "RESERVE",
    "decompress_payload",
    "refuse_compressed",
    "read_domain_xml",
]

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
VERSION = 2
#: magic, version, data_len, was_running, format, cookie offset, 14 unused words.
HEADER = struct.Struct("<16s5I14I")
#: libvirt's format numbers.
FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
#: Formats whose payload is the whole stream compressed by a tool (``<tool> -dc`` reads it).
COMPRESSED = frozenset(FORMATS[1:6])
#: Zero bytes left after the XML when fixedram writes a header (libvirt leaves 64 KiB so
#: that ``virsh save-image-define`` can grow the XML in place).
RESERVE = 64 << 10
#: Largest data_len accepted when reading (the XML of any real domain is far smaller).
_MAX_DATA = 64 << 20


@dataclass(frozen=True)
class DomainSummary:
    """What ``analyze`` shows of a domain XML."""

    name: str
    uuid: str
    memory: int  # bytes
    machine: str
    vcpus: int
    domain_type: str


@dataclass(frozen=True)
class LibvirtHeader:
    """A parsed libvirt save-image header."""

    version: int
    data_len: int
    was_running: bool
    format: str
    cookie_offset: int
    xml: str
    cookie: str | None
    byte_swapped: bool

    @property
    def payload_offset(self) -> int:
        """Where QEMU's stream (or its compressed form) starts in the file."""
        return HEADER.size + self.data_len

    @property
    def compressed(self) -> bool:
        """Whether the payload must go through a decompressor."""
        return self.format in COMPRESSED

    def domain(self) -> DomainSummary:
        """Name, memory, machine and vCPUs of the header's domain XML."""
        return summarize_xml(self.xml)

    def as_dict(self) -> dict[str, Any]:
        """The header and its XML summary (``analyze --json``)."""
        d = self.domain()
        return {"version": self.version, "format": self.format, "data_len": self.data_len,
                "payload_offset": self.payload_offset, "was_running": self.was_running,
                "cookie": self.cookie is not None, "byte_swapped": self.byte_swapped,
                "domain": {"name": d.name, "uuid": d.uuid, "memory": d.memory,
                           "machine": d.machine, "vcpus": d.vcpus, "type": d.domain_type}}


def is_libvirt(head: bytes) -> bool:
    """Whether ``head`` (the file's first bytes) starts with either libvirt magic."""
    return head[:16] in (MAGIC, PARTIAL_MAGIC)


def read_header(fd: int, size: int, where: str = "image") -> LibvirtHeader:
    """The header of the libvirt save image open as ``fd`` (``size`` bytes long).

    Raises :class:`ImageError` with one line naming the problem: an incomplete save (the
    partial magic), an unknown version or format, a data length that leaves no room for the
    stream, a missing or unparsable XML.
    """
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) < HEADER.size:
        raise ImageError(f"{where}: libvirt save header cut short ({len(raw)} of "
                         f"{HEADER.size} bytes)", 0)
    magic, *words = HEADER.unpack(raw)
    if magic == PARTIAL_MAGIC:
        raise ImageError(f"{where}: libvirt save image is incomplete (partial-save magic: the "
                         "save that wrote it did not finish)", 0)
    if magic != MAGIC:
        raise ImageError(f"{where}: not a libvirt save image (bad magic)", 0)
    version, data_len, running, fmt, cookie_off = words[:5]
    swapped = version > VERSION
    if swapped:
        version, data_len, running, fmt, cookie_off = (
            int.from_bytes(w.to_bytes(4, "little"), "big")
            for w in (version, data_len, running, fmt, cookie_off))
    if version > VERSION or version < 1:
        raise ImageError(f"{where}: libvirt save image version {version} is not supported "
                         f"(1 or {VERSION})", 16)
    if fmt >= len(FORMATS):
        raise ImageError(f"{where}: unknown libvirt save image format {fmt}", 28)
    if data_len == 0 or data_len > _MAX_DATA or HEADER.size + data_len >= size:
        raise ImageError(f"{where}: libvirt header data length {data_len} does not fit a "
                         f"{size}-byte file", 20)
    if cookie_off >= data_len:
        raise ImageError(f"{where}: libvirt cookie offset {cookie_off} is beyond the header "
                         f"data ({data_len} bytes)", 32)
    data = os.pread(fd, data_len, HEADER.size)
    xml_raw = data[: cookie_off or data_len].split(b"\0", 1)[0]
    cookie = data[cookie_off:].split(b"\0", 1)[0].decode("utf-8", "replace") \
        if cookie_off else None
    try:
        xml = xml_raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{where}: the domain XML in the libvirt header is not UTF-8",
                         HEADER.size) from None
    hdr = LibvirtHeader(version, data_len, bool(running), FORMATS[fmt], cookie_off, xml,
                        cookie, swapped)
    summarize_xml(xml, where)  # refuse a header whose XML does not describe a domain
    return hdr


def summarize_xml(xml: str, where: str = "image") -> DomainSummary:
    """Name, UUID, memory, machine type, vCPUs and type of a libvirt domain XML."""
    import xml.etree.ElementTree as ET  # only for libvirt images: not on every restore's path

    if not xml.strip():
        raise ImageError(f"{where}: the libvirt header holds no domain XML", HEADER.size)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ImageError(f"{where}: the domain XML in the libvirt header does not parse "
                         f"({e})", HEADER.size) from None
    if root.tag != "domain" or not (root.findtext("name") or "").strip():
        raise ImageError(f"{where}: the XML in the libvirt header is not a domain definition",
                         HEADER.size)
    mem = root.find("memory")
    try:
        memory = int((mem.text or "0").strip()) * _unit(mem.get("unit", "KiB")) \
            if mem is not None else 0
        vcpus = int((root.findtext("vcpu") or "1").strip())
    except ValueError:
        raise ImageError(f"{where}: the domain XML in the libvirt header has a bad memory or "
                         "vcpu value", HEADER.size) from None
    ostype = root.find("os/type")
    return DomainSummary(
        name=(root.findtext("name") or "").strip(), uuid=(root.findtext("uuid") or "").strip(),
        memory=memory, machine=ostype.get("machine", "") if ostype is not None else "",
        vcpus=vcpus, domain_type=root.get("type", ""))


def _unit(u: str) -> int:
    """Bytes in one libvirt memory unit: ``KB``/``MB``/... are powers of 1000, ``k``/``KiB``/
    ``M``/``MiB``/... powers of 1024."""
    table = {"b": 1, "bytes": 1, "kb": 1000, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
    try:
        return table[u.strip().lower()]
    except KeyError:
        raise ValueError(u) from None


def header_bytes(xml: str, *, fmt: str = "sparse", was_running: bool = True,
                 partial: bool = True, reserve: int = RESERVE) -> bytes:
    """A whole header (header, XML, NUL, zero padding), ready to write at offset 0.

    No cookie is written (libvirt accepts a header without one). The stream goes at
    ``len(result)``.
    """
    body = xml.rstrip("\n").encode("utf-8") + b"\0"
    data_len = len(body) + reserve
    head = HEADER.pack(PARTIAL_MAGIC if partial else MAGIC, VERSION, data_len,
                       int(was_running), FORMATS.index(fmt), 0, *([0] * 14))
    return head + body + b"\0" * reserve


def write_header(fd: int, header: bytes) -> None:
    """Write ``header`` (from :func:`header_bytes`) at offset 0 of ``fd``."""
    done = 0
    while done < len(header):
        done += os.pwrite(fd, header[done:], done)


def mark_complete(fd: int) -> None:
    """Turn the partial magic at offset 0 into the complete one (the caller fsyncs)."""
    if os.pwrite(fd, MAGIC, 0) != len(MAGIC):
        raise OSError("short write of the libvirt magic")


#: Room a decompressed stream may take beyond the domain's memory: page headers, the device
#: state, the VM description and RAM the domain XML does not count (video memory, ROMs).
DECOMPRESS_HEADROOM = 1 << 30


def decompress_payload(fd: int, header: LibvirtHeader, where: str = "image") -> int:
    """The stream of a compressed libvirt image, decompressed into an unnamed temporary file
    (in ``$TMPDIR``) by the format's own tool (``zstd -dc``...), as libvirt reads it.

    The output is bounded (``RLIMIT_FSIZE`` of the tool): a saved stream carries each page
    once, so it is no larger than the header's domain memory plus
    :data:`DECOMPRESS_HEADROOM`; a payload that decompresses to more is refused rather than
    filling the disk. Returns the temporary file's descriptor (the caller closes it; the
    file goes with it). A missing tool or a payload the tool rejects raises
    :class:`ImageError`.
    """
    import resource
    import shutil
    import signal
    import subprocess
    import tempfile

    tool = header.format
    exe = shutil.which(tool)
    if exe is None:
        raise ImageError(f"{where}: a {tool}-compressed libvirt image needs the '{tool}' "
                         "program, which is not installed")
    memory = header.domain().memory
    limit = memory + memory // 256 + DECOMPRESS_HEADROOM if memory > 0 else None

    def bound() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with tempfile.TemporaryFile(prefix="fixedram-libvirt-") as out:
        src = os.dup(fd)
        try:
            os.lseek(src, header.payload_offset, os.SEEK_SET)
            r = subprocess.run([exe, "-dc"], stdin=src, stdout=out, stderr=subprocess.PIPE,
                               check=False, preexec_fn=bound)
        finally:
            os.close(src)
        if r.returncode == -signal.SIGXFSZ or (limit is not None and
                                              os.fstat(out.fileno()).st_size >= limit):
            raise ImageError(f"{where}: the {tool} payload decompresses to more than "
                             f"{limit} bytes, more than a stream of the domain's "
                             f"{memory} bytes of memory can be", header.payload_offset)
        if r.returncode != 0:
            msg = (r.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
            raise ImageError(f"{where}: {tool} -dc could not decompress the libvirt payload: "
                             f"{msg}", header.payload_offset)
        return os.dup(out.fileno())


def header_of(path: str | os.PathLike[str]) -> LibvirtHeader | None:
    """The libvirt header of the file ``path`` (checked as :func:`read_header` does), or
    None when the file does not start with a libvirt magic or ``path`` names an object
    (``s3://``: object images are never libvirt images)."""
    if is_object_url(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ImageError(f"cannot open {path}: {e.strerror}") from None
    try:
        if not is_libvirt(os.pread(fd, 16, 0)):
            return None
        return read_header(fd, os.fstat(fd).st_size, str(path))
    finally:
        os.close(fd)


def refuse_compressed(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`ImageError` if ``path`` is a compressed libvirt image: ``what`` (a lazy
    restore) needs the pages at fixed places in the file, which only raw and sparse have."""
    hdr = header_of(path)
    if hdr is not None and hdr.compressed:
        raise ImageError(f"{path}: {what} needs random access to the pages, which a "
                         f"{hdr.format}-compressed libvirt image does not give: restore it "
                         "in full, or convert it first (fixedram convert)")


def read_domain_xml(path: str | os.PathLike[str]) -> str:
    """A domain XML file to put in a header (``--libvirt-xml``), checked to be one."""
    try:
        with open(path, encoding="utf-8") as f:
            xml = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"cannot read the domain XML {path}: {e}") from None
    summarize_xml(xml, str(path))
    return xml
