"""Byte layouts of QEMU's migration stream, declared once.

Every constant and fixed-size structure of the precopy stream, the return path and
multifd packets lives here; the decoder, the encoder and the image code import
them rather than spelling numbers out. Integers on the wire are big-endian.
Facts from QEMU 7.2 and 10.0: ``docs/protocol.md``, ``docs/multifd.md``, ``docs/mapped-ram.md``.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

__all__ = [
    "FILE_MAGIC",
    "FILE_VERSION",
    "RecordType",
    "Command",
    "RamFlag",
    "ReturnPathMsg",
    "MAPPED_RAM_HEADER",
    "MAPPED_RAM_VERSION",
    "MAPPED_RAM_ALIGN",
    "TARGET_PAGE_SIZE",
    "RAM_SECTION",
    "RAM_SECTION_VERSION",
    "MAX_PACKAGED",
    "MAX_VMDESC",
    "MAX_DEVICE_STATE",
    "MAX_RAM",
    "MULTIFD_MAGIC",
    "MULTIFD_VERSION",
    "MULTIFD_INIT",
    "MULTIFD_PAGES_PER_PACKET",
    "MULTIFD_PACKET_HEADER",
    "MULTIFD_PACKET_FIELDS",
    "MULTIFD_PACKET_PREFIX",
    "MULTIFD_PACKET_REST",
    "MultifdFlag",
]

FILE_MAGIC = 0x5145564D  # "QEVM"
FILE_VERSION = 3

#: x86 target page size; every RAM offset and length is a multiple of it.
TARGET_PAGE_SIZE = 4096

RAM_SECTION = "ram"
RAM_SECTION_VERSION = 4

#: Upper bounds on lengths read from the wire, so a hostile stream cannot make
#: fixedram buffer without limit. QEMU itself caps PACKAGED at 16 MiB.
MAX_PACKAGED = 1 << 24
MAX_VMDESC = 64 << 20
MAX_DEVICE_STATE = 1 << 30
#: Most guest RAM (MEM_SIZE total) fixedram accepts: 16 TiB, beyond any x86 guest QEMU
#: runs on common hosts and ext4's largest file. Readers and the receiver keep per-page
#: state (1 to 8 bytes per 4 KiB page), so a claimed size must be capped before use.
MAX_RAM = 1 << 44


class RecordType(IntEnum):
    """First byte of a top-level stream record."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class Command(IntEnum):
    """Sub-type of a COMMAND record (``be16 cmd, be16 len, payload``)."""

    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


#: Payload length each fixed-length command must have (None: variable).
COMMAND_LENGTHS: dict[int, tuple[int, ...] | None] = {
    Command.OPEN_RETURN_PATH: (0,),
    Command.PING: (4,),
    Command.POSTCOPY_ADVISE: (0, 16),
    Command.POSTCOPY_LISTEN: (0,),
    Command.POSTCOPY_RUN: (0,),
    Command.POSTCOPY_RAM_DISCARD: None,
    Command.PACKAGED: (4,),
    Command.ENABLE_COLO: (0,),
    Command.POSTCOPY_RESUME: (0,),
    Command.RECV_BITMAP: None,
    Command.SWITCHOVER_START: (0,),
}


class RamFlag(IntFlag):
    """Low bits of every ``be64`` word that starts a record inside the ``ram`` section."""

    FULL = 0x001
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


class ReturnPathMsg(IntEnum):
    """Messages the destination sends back (``be16 type, be16 len, payload``)."""

    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


#: Capabilities the configuration section can name (QEMU validates these two).
CAP_MAPPED_RAM = "mapped-ram"
CAP_IGNORE_SHARED = "x-ignore-shared"

CONFIG_CAPABILITIES = "configuration/capabilities"
CONFIG_PAGE_BITS = "configuration/target-page-bits"
CONFIG_UUID = "configuration/uuid"

# --- mapped-ram -----------------------------------------------------------------

#: Per-block header that follows ``used_length`` in MEM_SIZE when mapped-ram is on:
#: be32 version, be64 page_size, be64 bitmap_offset (absolute), be64 pages_offset (absolute).
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
MAPPED_RAM_VERSION = 1
#: QEMU places each block's pages region on a 1 MiB boundary of the file.
MAPPED_RAM_ALIGN = 1 << 20

# --- multifd --------------------------------------------------------------------

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
#: Channel init packet: magic, version, 16-byte uuid, channel id, 39 bytes of zero.
MULTIFD_INIT = struct.Struct(">II16sB7x32x")
#: 512 KiB of pages per packet on a 4 KiB-page target.
MULTIFD_PAGES_PER_PACKET = (512 << 10) // TARGET_PAGE_SIZE
#: Packet header up to the offsets array, field by field in wire order (big-endian struct
#: codes): magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num,
#: zero_pages, 28 reserved, ramblock[256]. The one declaration of the header: the structs
#: below and the numpy record of :mod:`fixedram.stream.multifd` are built from it.
MULTIFD_PACKET_FIELDS: tuple[tuple[str, str], ...] = (
    ("magic", "I"),
    ("version", "I"),
    ("flags", "I"),
    ("alloc", "I"),
    ("normal", "I"),
    ("next", "I"),
    ("num", "Q"),
    ("nzero", "I"),
    ("pad", "28x"),
    ("name", "256s"),
)
#: The whole header up to the offsets array.
MULTIFD_PACKET_HEADER = struct.Struct(">" + "".join(c for _, c in MULTIFD_PACKET_FIELDS))
#: Its prefix, common to every packet kind: magic, version, flags.
MULTIFD_PACKET_PREFIX = struct.Struct(">" + "".join(c for _, c in MULTIFD_PACKET_FIELDS[:3]))
#: The rest of the header of a RAM packet, after the prefix.
MULTIFD_PACKET_REST = struct.Struct(">" + "".join(c for _, c in MULTIFD_PACKET_FIELDS[3:]))


class MultifdFlag(IntFlag):
    """``flags`` of a multifd packet."""

    SYNC = 0x01
    COMPRESSION_MASK = 0x3E
    DEVICE_STATE = 0x40


# Small structs used on hot paths.
BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
