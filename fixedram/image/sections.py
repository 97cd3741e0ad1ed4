"""Which section id the RAM sections get in a stream fixedram sends for an image.

A destination QEMU binds section ids to handlers as the stream goes: a START or FULL
section names its handler (``ram``, ``slirp``...) and gives it an id; every later PART or
END section, and every footer, refers to a handler by id alone, and when two handlers have
the same id the most recently started one wins. fixedram re-sends an image's device state
verbatim, with the ids the saving QEMU gave its device sections, so the id it gives RAM must
be one that no device section of the image uses (``docs/section-ids.md``). This module is
the one place that picks it: :func:`ram_section_id`, used by every stream fixedram sends
(precopy, multifd and postcopy).
"""

from __future__ import annotations

import numpy as np

from fixedram.image.reader import Image
from fixedram.stream.format import RecordType

__all__ = ["device_section_ids", "ram_section_id"]

#: Bytes that start a record carrying a section id: START, PART, END, FULL and the footer.
_ID_MARKERS = np.array(
    [RecordType.SECTION_START, RecordType.SECTION_PART, RecordType.SECTION_END,
     RecordType.SECTION_FULL, RecordType.SECTION_FOOTER], dtype=np.uint8)
#: The id used when the image does not name RAM's own id and no device section uses it.
PREFERRED_ID = 1


def device_section_ids(device_state: bytes | bytearray | memoryview) -> frozenset[int]:
    """Every id a section record of ``device_state`` (the stored blob) could carry.

    Device sections are not self-delimiting (their layout is the device's own), so the
    blob is not parsed: every byte that could start a section record (START, PART, END,
    FULL, footer) counts with the big-endian 32-bit word after it. The result contains
    every id a section of the blob really uses, plus ids of byte patterns that only look
    like one, which costs nothing but a different choice of free id.
    """
    b = np.frombuffer(device_state, dtype=np.uint8)
    if b.size < 5:
        return frozenset()
    at = np.flatnonzero(np.isin(b[:-4], _ID_MARKERS)) + 1
    ids = ((b[at].astype(np.uint32) << 24) | (b[at + 1].astype(np.uint32) << 16)
           | (b[at + 2].astype(np.uint32) << 8) | b[at + 3].astype(np.uint32))
    return frozenset(int(i) for i in np.unique(ids))


def ram_section_id(img: Image) -> int:
    """The section id for RAM in a stream that carries ``img``'s device state.

    The id RAM had in the image's own stream where the image records one and no device
    section could carry it; else the smallest id from 1 up that no device section could
    carry (:func:`device_section_ids`). Never 0: QEMU's loader starts every handler with
    id 0, so a PART or END section with id 0 can reach a handler no section named.
    """
    taken = device_section_ids(img.device_state)
    own = img.ram_section_id
    if own and own not in taken:
        return own
    sid = PREFERRED_ID
    while sid in taken:
        sid += 1
    return sid
