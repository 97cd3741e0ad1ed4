"""Saved VM images: QEMU's mapped-ram file layout, and legacy stream files.

:func:`open_image` reads either kind; :mod:`fixedram.image.layout` declares the
mapped-ram geometry.
"""

from fixedram.image.reader import BlockInfo, Image, MappedRamImage, StreamImage, open_image

__all__ = ["open_image", "Image", "MappedRamImage", "StreamImage", "BlockInfo"]
