"""Which section id the RAM sections get in a stream fixedram sends for an image.

A destination QEMU binds section ids to handlers as the stream goes: a START or FULL section
names its handler (``ram``, ``slirp``...) and gives it an id; every later PART or END
section, and every footer, refers to a handler by id alone, and when two handlers have been
given the same id, the one QEMU registered first gets them. fixedram re-sends an image's
device state verbatim, with the ids the saving QEMU gave its device sections, so the id it
gives RAM must be one that no device section of the image uses (``docs/section-ids.md``).
This module is the one place that picks it: :func:`ram_section_id`, used by every stream
fixedram sends (precopy, multifd and postcopy).
"""

from __future__ import annotations

from collections.abc import Sequence

from fixedram._lazy import numpy as np
from fixedram.errors import FixedramError
from fixedram.image.reader import Image
from fixedram.stream.format import RecordType

__all__ = ["device_section_ids", "ram_section_id"]

#: Bytes that start a record carrying a section id: START, PART, END, FULL and the footer.
_ID_MARKERS = [int(t) for t in (RecordType.SECTION_START, RecordType.SECTION_PART,
                                RecordType.SECTION_END, RecordType.SECTION_FULL,
                                RecordType.SECTION_FOOTER)]
#: The id used when the image does not name RAM's own id and no device section uses it.
PREFERRED_ID = 1


def device_section_ids(device_state: bytes | bytearray | memoryview,
                       names: Sequence[str] | None = None) -> frozenset[int]:
    """Every id a section record of ``device_state`` (the stored blob) could carry.

    With ``names`` (the device sections the VM description lists, in stream order), the
    blob is first walked as that sequence of FULL sections, each ended by its footer: when
    the walk accounts for every byte and every name, its ids are exact. Otherwise (no VM
    description, no footers, other records) the blob is not parsed, since device sections
    are not self-delimiting: every byte that could start a section record (START, PART,
    END, FULL, footer) counts with the big-endian 32-bit word after it. That set contains
    every id a section really uses, plus ids of byte patterns that only look like one,
    which costs nothing but a different choice of free id.
    """
    if names:
        exact = _walk(bytes(device_state), [n.encode("latin-1") for n in names])
        if exact is not None:
            return exact
    b = np.frombuffer(device_state, dtype=np.uint8)
    if b.size < 5:
        return frozenset()
    at = np.flatnonzero(np.isin(b[:-4], _ID_MARKERS)) + 1
    ids = ((b[at].astype(np.uint32) << 24) | (b[at + 1].astype(np.uint32) << 16)
           | (b[at + 2].astype(np.uint32) << 8) | b[at + 3].astype(np.uint32))
    return frozenset(int(i) for i in np.unique(ids))


def _walk(blob: bytes, names: list[bytes]) -> frozenset[int] | None:
    """The ids of ``blob`` read as FULL sections named ``names`` in order, each closed by
    its footer and followed by the next one's header (or the end); None if it is not."""
    full, footer = RecordType.SECTION_FULL, RecordType.SECTION_FOOTER
    ids: set[int] = set()
    p = 0
    for k, name in enumerate(names):
        end = p + 6 + len(name)
        if end + 8 > len(blob) or blob[p] != full or blob[p + 5 : end] != bytes([len(name)]) \
                + name:
            return None
        sid = int.from_bytes(blob[p + 1 : p + 5], "big")
        tag = bytes([footer]) + blob[p + 1 : p + 5]
        nxt = names[k + 1] if k + 1 < len(names) else None
        q = blob.find(tag, end + 8)
        while q >= 0:
            e = q + 5
            if nxt is None:
                if e == len(blob):
                    break
            elif (blob[e : e + 1] == bytes([full])
                  and blob[e + 5 : e + 6 + len(nxt)] == bytes([len(nxt)]) + nxt):
                break
            q = blob.find(tag, q + 1)
        if q < 0:
            return None
        ids.add(sid)
        p = q + 5
    return frozenset(ids) if p == len(blob) else None


def _section_names(img: Image) -> list[str] | None:
    """The idstr of every device section the image's VM description lists, in order."""
    try:
        desc = img.vmdesc_json()
    except (ValueError, FixedramError):
        return None
    devices = desc.get("devices") if isinstance(desc, dict) else None
    if not isinstance(devices, list):
        return None
    names = [d.get("name") for d in devices if isinstance(d, dict)]
    good = [n for n in names if isinstance(n, str) and 0 < len(n) < 256]
    return good if good and len(good) == len(names) == len(devices) else None


def ram_section_id(img: Image) -> int:
    """The section id for RAM in a stream that carries ``img``'s device state.

    The id RAM had in the image's own stream where the image records one and no device
    section could carry it; else the smallest id from 1 up that no device section could
    carry (:func:`device_section_ids`). Never 0: QEMU's loader starts every handler with
    id 0, so a PART or END section with id 0 can reach a handler no section named.
    """
    cached = img.__dict__.get("_ram_sid")  # one image, one answer: work it out once
    if cached is not None:
        return int(cached)
    taken = device_section_ids(img.device_state, _section_names(img))
    own = img.ram_section_id
    if own and own not in taken:
        sid = own
    else:
        sid = PREFERRED_ID
        while sid in taken:
            sid += 1
    img.__dict__["_ram_sid"] = sid
    return sid
