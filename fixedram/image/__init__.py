"""Saved VM images: QEMU's mapped-ram file layout, and legacy stream files.

:func:`open_image` reads either kind; :class:`MappedRamWriter` writes mapped-ram
files; :mod:`fixedram.image.layout` declares the mapped-ram geometry. Each name is imported
from its module when first used (reading an image does not import the writer).
"""

from typing import TYPE_CHECKING

from fixedram._lazy import lazy_exports

if TYPE_CHECKING:
    from fixedram.image.reader import BlockInfo, Image, MappedRamImage, StreamImage, open_image
    from fixedram.image.writer import BlockLayout, MappedRamWriter, mapped_configuration

__all__ = [
    "BlockInfo",
    "BlockLayout",
    "Image",
    "MappedRamImage",
    "MappedRamWriter",
    "StreamImage",
    "mapped_configuration",
    "open_image",
]

__getattr__ = lazy_exports(__name__, {
    **dict.fromkeys(["BlockInfo", "Image", "MappedRamImage", "StreamImage", "open_image"],
                    "reader"),
    **dict.fromkeys(["BlockLayout", "MappedRamWriter", "mapped_configuration"], "writer"),
})
