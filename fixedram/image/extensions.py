"""Where fixedram's extensions live in a mapped-ram image: the paddings QEMU never reads.

Each RAM block's pages region starts on a 1 MiB boundary; between the end of the block's
bitmap and that boundary lies padding that QEMU neither reads nor writes (it reads the
bitmap, then runs of set bits from ``pages_offset``). fixedram keeps two extensions there,
both invisible to QEMU, which still loads the image natively:

* the **checksums** (:mod:`fixedram.image.checksum`, ``docs/checksums.md``) grow from the
  *slot* (the bitmap's end rounded up to 64 bytes) of the block with the most room;
* the **working set** (:mod:`fixedram.image.workingset`, ``docs/working-set.md``) takes
  :data:`WS_AREA` bytes at the *end* of one padding: two copies of :data:`WS_COPY` bytes,
  at ``pages_offset - WS_AREA`` and ``pages_offset - WS_COPY``.

This module is the one place that says which bytes each may use (:class:`Geometry`):

* :meth:`Geometry.working_set_block`: the block with the second-most room (ties: stream
  order), so that it never shares a padding with the checksums when the image has two or
  more blocks with room; with a single usable block, that block, if it holds the working
  set's area plus :data:`WS_MIN_SHARED` bytes for checksums.
* :meth:`Geometry.checksum_room`: a padding's room minus the working set's area where both
  share it. The checksums' block is the one with the most of that room (the block with the
  most room, as before the working set existed, whenever two blocks have room).

A reader finds the checksums by looking at every block's slot and the working set at every
block's two copy offsets (one 64-byte read each): placement is a writer's rule, never
trusted by a reader. A checksum extension written before this rule (an image whose
checksums reach into the working set's area: over ~112 GiB of RAM in a single padding) is
found by :meth:`Geometry.overlaps`, and the working-set writer then declines with a
warning rather than touch it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fixedram.errors import FixedramError
from fixedram.image.layout import PAGE_SIZE, align_up, bitmap_bytes

__all__ = [
    "BlockGeometry",
    "Geometry",
    "ExtensionError",
    "SLOT_ALIGN",
    "WS_COPY",
    "WS_AREA",
    "WS_MIN_SHARED",
]

#: Slots start 64-byte aligned, so an 8-byte magic never straddles a sector.
SLOT_ALIGN = 64
#: Bytes of one copy of the working-set record (header included).
WS_COPY = 64 << 10
#: The working set's area at the end of a padding: two copies.
WS_AREA = 2 * WS_COPY
#: With a single usable padding, what must be left for checksums before the working set
#: may share it (a few blocks at 1 MiB extents).
WS_MIN_SHARED = 64 << 10


class ExtensionError(FixedramError):
    """An extension of a mapped-ram image is damaged, unsupported, or cannot be written."""


@dataclass(frozen=True)
class BlockGeometry:
    """Where a block's header, bitmap and pages lie (absolute file offsets)."""

    name: str
    length: int
    bitmap_offset: int
    pages_offset: int

    @property
    def npages(self) -> int:
        return self.length // PAGE_SIZE

    @property
    def bitmap_end(self) -> int:
        return self.bitmap_offset + bitmap_bytes(self.npages)

    @property
    def slot(self) -> int:
        """Where the checksum extension may start in this block's padding."""
        return align_up(self.bitmap_end, SLOT_ALIGN)

    @property
    def room(self) -> int:
        """Bytes of padding from the slot to the pages region."""
        return max(0, self.pages_offset - self.slot)

    @property
    def pages_end(self) -> int:
        return self.pages_offset + self.length

    @property
    def ws_copies(self) -> tuple[int, int]:
        """File offsets of the working set's two copies, were it in this padding."""
        return self.pages_offset - WS_AREA, self.pages_offset - WS_COPY


@dataclass(frozen=True)
class Geometry:
    """The file layout an extension describes: blocks in stream order and the stream span."""

    blocks: tuple[BlockGeometry, ...]
    base: int  # first byte of the stream
    stream_end: int  # size of the stream (the file size)

    @classmethod
    def of_image(cls, img: object) -> Geometry:
        """The geometry of an opened mapped-ram :class:`~fixedram.image.Image`."""
        from fixedram.image.reader import Image

        assert isinstance(img, Image)
        if img.format != "mapped-ram":
            raise ExtensionError("checksums and working sets are only supported in mapped-ram "
                                 f"images (this is a {img.format} image)")
        blocks = []
        for b in img.blocks.values():
            assert b.mapped is not None
            blocks.append(BlockGeometry(b.name, b.length, b.mapped.bitmap_offset,
                                        b.mapped.pages_offset))
        return cls(tuple(blocks), img.base_offset, img.file_size)

    # -- who may use which bytes ------------------------------------------------------------

    def _by_room(self) -> list[BlockGeometry]:
        return sorted(self.blocks, key=lambda b: -b.room)  # stable: ties in stream order

    def working_set_block(self) -> BlockGeometry | None:
        """The block whose padding ends with the working set's area (None: no room)."""
        ranked = self._by_room()
        if len(ranked) >= 2 and ranked[1].room >= WS_AREA:
            return ranked[1]
        if ranked and ranked[0].room >= WS_AREA + WS_MIN_SHARED:
            return ranked[0]
        return None

    def checksum_room(self, b: BlockGeometry) -> int:
        """Bytes the checksum extension may use from ``b``'s slot."""
        ws = self.working_set_block()
        return b.room - WS_AREA if ws is not None and ws.slot == b.slot else b.room

    def checksum_block(self) -> BlockGeometry | None:
        """The block whose slot a new checksum extension goes to."""
        return max(self.blocks, key=self.checksum_room, default=None)

    @staticmethod
    def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
        """Whether byte ranges ``[start, end)`` ``a`` and ``b`` share a byte."""
        return a[0] < b[1] and b[0] < a[1]

    # -- what QEMU reads ---------------------------------------------------------------------

    def meta_regions(self) -> list[tuple[str, str, int, int]]:
        """``(block, what, start, end)`` of every byte range QEMU reads besides page data.

        Per block: ``header`` (from the end of the previous pages region, or the stream
        start, to the bitmap: stream prefix, block record, MappedRamHeader) and
        ``bitmap`` (up to the 64-byte aligned slot); then ``tail`` (block ``""``): from
        the end of the last pages region to the end of the stream (EOS, PART/END ram,
        device state, EOF, VM description). Padding after the slot is not covered.
        """
        out: list[tuple[str, str, int, int]] = []
        start = self.base
        for b in self.blocks:
            out.append((b.name, "header", start, b.bitmap_offset))
            out.append((b.name, "bitmap", b.bitmap_offset, b.slot))
            start = b.pages_end
        out.append(("", "tail", start, self.stream_end))
        return out

    def check(self) -> None:
        """Regions must be in order and inside the stream (else extensions make no sense)."""
        pos = self.base
        for b in self.blocks:
            if not pos <= b.bitmap_offset <= b.bitmap_end <= b.pages_offset:
                raise ExtensionError(f"RAM block '{b.name}': header, bitmap and pages are not "
                                     "in file order")
            pos = b.pages_end
        if pos > self.stream_end:
            raise ExtensionError("pages regions run past the end of the stream")
