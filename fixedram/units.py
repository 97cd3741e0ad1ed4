"""Byte sizes for people: the one formatter every report, message and progress bar uses.

It sits at the bottom of the package (it imports nothing of fixedram), next to
:mod:`fixedram.errors`, so every layer can use it.
"""

from __future__ import annotations

__all__ = ["format_size"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_size(n: float, *, sep: str = " ", largest: str = "GiB", exact: bool = False) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 MiB``, ``3.0 GiB``.

    The unit is the largest one, up to ``largest``, that ``n`` reaches; one decimal, bytes
    as a whole number. ``sep`` goes between number and unit (``""`` for ``1.5MiB``, as the
    progress bars print it). ``exact``: the largest unit ``n`` is a whole multiple of, as a
    whole number (``2 GiB``), else the byte count (``4097 bytes``), for messages that
    compare sizes.
    """
    top = _UNITS.index(largest)
    if exact:
        for i in range(top, 0, -1):
            shift = 10 * i
            if n >= 1 << shift and n % (1 << shift) == 0:
                return f"{int(n) >> shift}{sep}{_UNITS[i]}"
        return f"{n}{sep}bytes"
    i = 0
    while abs(n) >= 1024 and i < top:
        n /= 1024
        i += 1
    return f"{int(n)}{sep}B" if i == 0 else f"{n:.1f}{sep}{_UNITS[i]}"
