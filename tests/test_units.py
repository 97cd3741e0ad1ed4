"""The one byte-size formatter, in each form the reports, messages and progress bars print."""

from __future__ import annotations

from typing import Any

import pytest

from fixedram.units import format_size


@pytest.mark.parametrize(
    ("n", "kwargs", "text"),
    [
        (0, {}, "0 B"),
        (1023, {}, "1023 B"),
        (1024, {}, "1.0 KiB"),
        (1536 << 10, {}, "1.5 MiB"),
        (3 << 30, {}, "3.0 GiB"),
        (2 << 40, {}, "2048.0 GiB"),
        (1023.9, {}, "1023 B"),
        (2 << 40, {"sep": "", "largest": "TiB"}, "2.0TiB"),
        (512, {"sep": "", "largest": "TiB"}, "512B"),
        (4 << 30, {"exact": True}, "4 GiB"),
        ((4 << 30) + 4096, {"exact": True}, "4194308 KiB"),
        (4097, {"exact": True}, "4097 bytes"),
        (0, {"exact": True}, "0 bytes"),
    ],
)
def test_format_size(n: float, kwargs: dict[str, Any], text: str) -> None:
    assert format_size(n, **kwargs) == text
