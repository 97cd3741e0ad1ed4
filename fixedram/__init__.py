"""fixedram: save a QEMU guest's RAM to a file where every page has a fixed offset.

The file layout is QEMU's own ``mapped-ram`` format, so QEMU 9.0+ loads fixedram's
images natively and fixedram reads QEMU's. fixedram also speaks QEMU's precopy
migration stream itself, which lets it receive a live migration from any QEMU
(7.2 included) into such an image and send an image back into any QEMU.
"""

from fixedram.errors import FixedramError

__all__ = ["FixedramError"]
__version__ = "0.1.0"
