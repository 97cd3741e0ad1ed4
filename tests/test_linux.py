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
from linux_matrix import Config, Source, check_restore, fixedram

from fixedram.image import open_image
from fixedram.image.sections import device_section_ids, ram_section_id
from fixedram.testing.guest.linux import LinuxGuest
from fixedram.testing.seaweed import TEST_BUCKET, Seaweed

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
        names = [d["name"] for d in img.vmdesc_json()["devices"]]
        taken = device_section_ids(img.device_state, names)
        assert 1 in taken
        sid = ram_section_id(img)
        assert sid not in taken
        # the VM description lets the blob be walked exactly: RAM keeps its own id
        assert img.ram_section_id is not None and sid == img.ram_section_id


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


def _full(sid: int, name: bytes, data: bytes = b"\x00" * 7) -> bytes:
    """A FULL section with its footer, as QEMU writes a device's state."""
    from fixedram.stream import SectionFooter, encode
    from fixedram.stream.format import RecordType

    return (bytes([RecordType.SECTION_FULL]) + sid.to_bytes(4, "big") + bytes([len(name)])
            + name + (0).to_bytes(4, "big") + (1).to_bytes(4, "big") + data
            + encode(SectionFooter(sid)))


class _Img:
    """What ram_section_id reads of an image."""

    def __init__(self, blob: bytes, names: list[str] | None, own: int | None) -> None:
        self.device_state = blob
        self.ram_section_id = own
        self._names = names

    def vmdesc_json(self) -> object:
        return None if self._names is None else {"devices": [{"name": n} for n in self._names]}


def test_device_section_ids_exact_with_the_vm_description() -> None:
    """With the VM description the blob is walked section by section: exact ids, even
    where device data holds bytes that look like a footer."""
    # slirp's own footer inside its data, another id's footer and a PART look-alike
    tricky = b"\x7e\x00\x00\x00\x01\x99\x7e\x00\x00\x00\x02\x02\x00\x00\x00\x05"
    blob = _full(0, b"timer") + _full(1, b"slirp", tricky) + _full(7, b"cpu")
    assert device_section_ids(blob, ["timer", "slirp", "cpu"]) == {0, 1, 7}
    # without it (or when it does not describe the blob) every look-alike counts too
    loose = device_section_ids(blob)
    assert {0, 1, 2, 5, 7} <= loose
    assert device_section_ids(blob, ["timer", "cpu"]) == loose
    assert device_section_ids(blob[:-1], ["timer", "slirp", "cpu"]) == device_section_ids(
        blob[:-1])
    assert device_section_ids(b"") == frozenset()


def test_ram_section_id_avoids_device_ids() -> None:
    """The id the image names is kept unless a device section could carry it (or it is 0);
    then the smallest free one."""
    blob = _full(0, b"timer") + _full(1, b"slirp") + _full(2, b"cpu")
    names = ["timer", "slirp", "cpu"]
    assert ram_section_id(_Img(blob, names, None)) == 3  # type: ignore[arg-type]
    assert ram_section_id(_Img(blob, names, 7)) == 7  # type: ignore[arg-type]
    assert ram_section_id(_Img(blob, names, 1)) == 3  # type: ignore[arg-type]
    # every handler starts with id 0 in QEMU's loader: never 0
    assert ram_section_id(_Img(b"", None, 0)) == 1  # type: ignore[arg-type]
    # no VM description: the loose set; the chosen id is still none of the real ones
    sid = ram_section_id(_Img(blob, None, 1))  # type: ignore[arg-type]
    assert sid not in (0, 1, 2)


@pytest.mark.qemu
def test_lazy_restore_from_s3(source: Source, s3: Seaweed, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's image in S3 (a real server), restored lazily from there: pages are
    served from the chunks as the guest asks, and the guest runs on."""
    for k, v in s3.env(FIXEDRAM_CHUNK_CACHE=str(tmp_path / "cache"),
                       FIXEDRAM_STAGING=str(tmp_path)).items():
        monkeypatch.setenv(k, v)
    saved = source.save("proxy")
    url = f"s3://{TEST_BUCKET}/linux/defaults"
    r = fixedram("convert", str(saved.path), url)
    assert r.returncode == 0, r.stderr
    check_restore(saved, source, "lazy", paused=False, image=url)
