"""QEMU migration-stream codec, sans-I/O.

:class:`StreamDecoder` turns bytes into records; :func:`encode` and
:class:`StreamEncoder` turn records into bytes. Nothing here opens a file or a
socket: channels and images live in :mod:`fixedram.io` and :mod:`fixedram.image`.
"""

from fixedram.stream.decoder import StreamDecoder
from fixedram.stream.encoder import StreamEncoder, encode
from fixedram.stream.records import (
    CommandRecord,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MappedRamHeader,
    MemSize,
    MultifdFlush,
    Packaged,
    Page,
    PageRun,
    PageSet,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VMDescription,
    Zero,
    ZeroPages,
    ZeroRun,
)

__all__ = [
    "StreamDecoder",
    "StreamEncoder",
    "encode",
    "Record",
    "FileHeader",
    "Configuration",
    "SectionStart",
    "SectionPart",
    "SectionEnd",
    "SectionFull",
    "SectionFooter",
    "CommandRecord",
    "Packaged",
    "MemSize",
    "RamBlock",
    "MappedRamHeader",
    "Page",
    "Zero",
    "PageRun",
    "ZeroRun",
    "ZeroPages",
    "PageSet",
    "MultifdFlush",
    "EndOfSection",
    "DeviceState",
    "EndOfFile",
    "VMDescription",
]
