"""Saved VM images: QEMU's mapped-ram file layout, and legacy stream files.

:func:`open_image` reads either kind; :class:`MappedRamWriter` writes mapped-ram
files; :mod:`fixedram.image.layout` declares the mapped-ram geometry.
"""

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
