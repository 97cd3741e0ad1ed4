"""Image checks, each rule in one place: what makes an image whole and restorable.

A check returns every :class:`Problem` it finds. ``fixedram verify`` lists them all; a
restore stops at the first (:func:`raise_first`), with the problem's one-line error.

Where each rule lives:

* the stream decoder (:mod:`fixedram.stream.decoder`) refuses what the wire format
  forbids: record syntax, block lengths, the target page size, and each mapped-ram
  block header's fields (version, page size, bitmap behind the header, pages region
  page-aligned and behind the bitmap). As it skips each block's pages before the next
  record, the blocks' regions follow each other in the file and cannot overlap;
* :func:`mapped_bounds` (run by :func:`~fixedram.image.reader.open_image` on each
  mapped-ram block as it is read): the bitmap and the pages region lie inside the file;
* :func:`structure`, on an open image: no bitmap bit set beyond a block, device state
  present, VM description present (mapped-ram) and a JSON object with a device list;
* :func:`checksum_metadata`: a mapped-ram image's checksum extension, and the digests of
  the metadata it covers (page data is compared by :mod:`fixedram.image.verify`);
* :func:`require_restorable`: what a restore needs besides, then all of the above.

So an image :func:`~fixedram.image.reader.open_image` accepts is well-formed on the
wire and within its file; the checks here look at what it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import InitVar, dataclass
from typing import TYPE_CHECKING

from fixedram.errors import ImageError
from fixedram.image.layout import PAGE_SIZE, bitmap_bytes
from fixedram.stream import MappedRamHeader

if TYPE_CHECKING:
    from fixedram.image.checksum import Checksums, Geometry
    from fixedram.image.reader import Image

__all__ = [
    "Problem",
    "structure",
    "require_restorable",
    "mapped_bounds",
    "raise_first",
    "raise_counted",
    "checksum_metadata",
    "check_metadata",
]


@dataclass
class Problem:
    """One finding. ``block``/``offset``/``length`` locate page data (offset in the block).

    ``message`` is how ``verify`` lists it; ``refusal``, where given, how a restore words
    its error (:meth:`error`) when that differs.
    """

    kind: str
    message: str
    block: str | None = None
    offset: int | None = None
    length: int | None = None
    file_offset: int | None = None
    refusal: InitVar[str | None] = None

    def __post_init__(self, refusal: str | None) -> None:
        self._refusal = refusal

    def error(self) -> ImageError:
        """The one-line :class:`ImageError` that refuses the image over this problem."""
        return ImageError(self._refusal or self.message, self.file_offset)


def raise_first(problems: Iterable[Problem]) -> None:
    """Raise the first problem's :meth:`~Problem.error`; later ones are not looked for."""
    for p in problems:
        raise p.error()


def raise_counted(problems: list[Problem], what: str) -> None:
    """Raise one :class:`ImageError` for all of ``problems``: ``what: first (and N more)``."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ImageError(f"{what}: {problems[0].message}{more}")


def mapped_bounds(name: str, length: int, m: MappedRamHeader, file_size: int) -> list[Problem]:
    """The bitmap and pages region of mapped-ram block ``name`` must lie inside the file."""
    out = []
    bm_end = m.bitmap_offset + bitmap_bytes(length // PAGE_SIZE)
    if bm_end > file_size:
        out.append(
            Problem(
                "structure",
                f"RAM block '{name}': bitmap at byte {m.bitmap_offset} ends at byte {bm_end}, "
                f"past the end of the file ({file_size} bytes)",
                block=name,
                file_offset=m.bitmap_offset,
            )
        )
    if m.pages_offset + length > file_size:
        out.append(
            Problem(
                "structure",
                f"RAM block '{name}': pages region at byte {m.pages_offset} ends at byte "
                f"{m.pages_offset + length}, past the end of the file ({file_size} bytes)",
                block=name,
                file_offset=m.pages_offset,
            )
        )
    return out


def _bitmaps(img: Image) -> Iterator[Problem]:
    """A bitmap bit set beyond its block's last page (read in bounded pieces)."""
    for name in img.blocks:
        try:
            img.last_present(name)  # walks the whole bitmap
        except ImageError as e:
            yield Problem("bitmap", e.message, block=name, file_offset=e.offset)


def _complete(img: Image) -> Iterator[Problem]:
    """The stream tail is there: device state, and a mapped-ram image's VM description."""
    if not img.device_state:
        yield Problem(
            "structure",
            "no device state (image incomplete)",
            refusal="image is incomplete: no device state",
        )
    if img.format == "mapped-ram" and img.vmdesc is None:
        yield Problem(
            "structure",
            "no VM description after the end-of-stream marker (image incomplete)",
            refusal="image is incomplete: no VM description after the end-of-stream marker",
        )


def _vmdesc_parses(img: Image) -> Iterator[Problem]:
    """The VM description, where there is one, is a JSON object with a device list."""
    if img.vmdesc is None:
        return
    try:
        desc = img.vmdesc_json()
        if not isinstance(desc, dict) or not isinstance(desc.get("devices", []), list):
            raise ValueError("not a JSON object with a device list")
    except (ValueError, UnicodeDecodeError) as e:
        yield Problem("vmdesc", f"VM description does not parse: {e}")


def structure(img: Image) -> list[Problem]:
    """Every structural problem of the open image ``img``, in file order."""
    return [*_bitmaps(img), *_complete(img), *_vmdesc_parses(img)]


def require_restorable(img: Image) -> None:
    """Raise :class:`ImageError` for the first reason ``img`` cannot be restored.

    Cheap checks first: the configuration, the stream tail, then each block's bitmap;
    then the checksum extension (if any) and the digests of headers, bitmaps and device
    state, before the first byte is sent (page data is checked while it is read).
    """
    if img.configuration.ignore_shared:
        raise ImageError("image was saved with x-ignore-shared (RAM not in the image)")
    raise_first(_complete(img))
    raise_first(_bitmaps(img))
    check_metadata(img)


# -- the checksum extension's metadata -----------------------------------------------------


def checksum_metadata(img: Image) -> tuple[Checksums | None, list[Problem]]:
    """A mapped-ram image's checksum extension (None when it has none, or an unusable one)
    and every problem with it and with the metadata it covers: the file's end, the blocks
    and their geometry as checksummed, the digests of each block's header and bitmap and of
    the stream tail. Cheap: reads headers, bitmaps and the stream tail only."""
    from fixedram.image.checksum import Geometry, find

    geom = Geometry.of_image(img)
    found = find(img.fileno(), geom)
    if found.checksums is None:
        if found.error is None:
            return None, []
        return None, [Problem("extension", f"checksum extension unusable: {found.error}")]
    return found.checksums, _meta_problems(img, found.checksums, geom)


def _meta_problems(img: Image, cs: Checksums, geom: Geometry) -> list[Problem]:
    """The extension against the image: its geometry first, then the metadata digests."""
    from fixedram.image.checksum import hash_range

    out: list[Problem] = []
    if cs.stream_end != geom.stream_end:
        out.append(
            Problem(
                "extension",
                f"file is {geom.stream_end} bytes but was {cs.stream_end} when checksummed "
                "(appended to or truncated?)",
            )
        )
        return out
    sums = cs.by_name()
    names = [b.name for b in geom.blocks]
    if names != [b.name for b in cs.blocks]:
        out.append(
            Problem(
                "extension",
                f"checksums describe blocks {[b.name for b in cs.blocks]}, the image has {names}",
            )
        )
        return out
    for b in geom.blocks:
        s = sums[b.name]
        if (s.length, s.pages_offset) != (b.length, b.pages_offset):
            out.append(
                Problem(
                    "extension",
                    f"RAM block '{b.name}': checksummed as {s.length} bytes at "
                    f"{s.pages_offset}, image has {b.length} bytes at {b.pages_offset}",
                    block=b.name,
                )
            )
    if out:
        return out
    what_of = {
        "header": "stream prefix / block record and header",
        "bitmap": "page bitmap",
        "tail": "device state / VM description (stream tail)",
    }
    for name, what, start, end in geom.meta_regions():
        want = (
            cs.tail_digest
            if what == "tail"
            else (sums[name].header_digest if what == "header" else sums[name].bitmap_digest)
        )
        if hash_range(img.fileno(), start, end) != want:
            where = f"RAM block '{name}': " if name else ""
            out.append(
                Problem(
                    f"{what}-checksum",
                    f"{where}{what_of[what]} (file bytes 0x{start:x}-0x{end - 1:x}) does not "
                    "match its checksum",
                    block=name or None,
                    file_offset=start,
                    length=end - start,
                )
            )
    return out


def check_metadata(img: Image) -> Checksums | None:
    """Before sending: raise :class:`ImageError` if the extension or metadata digests fail.

    Returns the extension (None when the image has none). Cheap: reads headers,
    bitmaps and the stream tail only.
    """
    if img.format != "mapped-ram":
        return None
    cs, found = checksum_metadata(img)
    if cs is None:
        raise_first(found)  # an unusable extension, in its own words
        return None
    raise_counted(found, "image fails its checksums")
    return cs
