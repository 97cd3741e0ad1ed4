"""The Linux test guest with QEMU's default devices: the short real-guest subset of the suite.

QEMU without ``-nodefaults`` adds user networking, whose device-state section (``slirp``)
takes a low section id; in a lazy restore the device state reaches QEMU before the RAM parts,
so a RAM section id equal to slirp's sent every later RAM part to slirp's loader and killed
the guest ("Missing section footer for slirp"). ``docs/section-ids.md`` has the rule. The
full matrix of configurations is ``tests/test_linux_matrix.py`` (``pytest -m matrix``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from linux_matrix import Config, Source, check_restore

from fixedram.guest.linux import LinuxGuest
from fixedram.image import open_image
from fixedram.image.sections import device_section_ids, ram_section_id

DEFAULTS = Config("defaults", defaults=True, mem="384M")


@pytest.fixture(scope="module")
def source(linux_guest: LinuxGuest, tmp_path_factory: pytest.TempPathFactory,
           shm_dir: Path) -> Iterator[Source]:
    """A Linux guest with QEMU's default devices (no -nodefaults), booted once."""
    src = Source.boot(DEFAULTS, linux_guest, tmp_path_factory.mktemp("linux-defaults"),
                      shm_dir)
    try:
        yield src
    finally:
        src.close()


@pytest.mark.qemu
def test_device_section_takes_low_id(source: Source) -> None:
    """The premise: with default devices a device section of the image carries the id a
    fixed choice would give RAM, and the chosen RAM id is none of the device sections'."""
    saved = source.save("proxy")
    with open_image(saved.path) as img:
        taken = device_section_ids(img.device_state)
        assert 1 in taken
        sid = ram_section_id(img)
        assert sid not in taken
        assert img.ram_section_id is not None


@pytest.mark.qemu
def test_lazy_restore_running(source: Source) -> None:
    """The bug: a lazy restore of a guest with user networking runs on."""
    check_restore(source.save("proxy"), source, "lazy", paused=False)


@pytest.mark.qemu
def test_lazy_restore_paused_same_ram(source: Source) -> None:
    """Lazy restore, paused until every page is in: RAM equals the source's."""
    check_restore(source.save("proxy"), source, "lazy", paused=True)


@pytest.mark.qemu
def test_proxy_restore(source: Source) -> None:
    """A full restore through fixedram (precopy) of the same image."""
    check_restore(source.save("proxy"), source, "proxy", paused=True)


def test_ram_section_id_avoids_device_ids(tmp_path: Path) -> None:
    """The id the image names is kept unless a device section could carry it; then the
    smallest free one."""
    from fixedram.stream import EndOfSection, SectionFooter, encode
    from fixedram.stream.format import RecordType

    def full(sid: int, name: bytes) -> bytes:
        return (bytes([RecordType.SECTION_FULL]) + sid.to_bytes(4, "big") + bytes([len(name)])
                + name + (0).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00" * 7
                + encode(SectionFooter(sid)))

    blob = full(0, b"timer") + full(1, b"slirp") + full(2, b"cpu")
    assert {0, 1, 2} <= device_section_ids(blob)
    assert device_section_ids(b"") == frozenset()
    assert encode(EndOfSection())  # the encoder is the one the stream uses

    class Img:
        device_state = blob
        ram_section_id: int | None = None

    img = Img()
    assert ram_section_id(img) == 3  # type: ignore[arg-type]
    img.ram_section_id = 7
    assert ram_section_id(img) == 7  # type: ignore[arg-type]
    img.ram_section_id = 1
    assert ram_section_id(img) == 3  # type: ignore[arg-type]
    img.ram_section_id = 0  # every handler starts with id 0 in QEMU's loader
    img.device_state = b""
    assert ram_section_id(img) == 1  # type: ignore[arg-type]
