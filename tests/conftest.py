"""Shared fixtures: the bare test guest, QEMU binaries, QEMU-written images, an S3 server.

QEMU fixtures never skip: if QEMU is missing, :func:`fixedram.testing.vm.find_qemu` raises
:class:`fixedram.errors.VMError` saying so (and that ``scripts/setup.sh`` installs it), and the
test errors with that message. Mark tests that use them ``@pytest.mark.qemu``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu_images import KINDS, ImageCase, ImageSpec, make_image

from fixedram.testing.guest import build_guest
from fixedram.testing.guest.linux import LinuxGuest, build_linux_guest
from fixedram.testing.seaweed import TEST_BUCKET, Seaweed
from fixedram.testing.vm import QemuBinary, choose_accel, find_qemu


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    """The bare test guest ELF (built once, cached by source hash)."""
    return build_guest()


@pytest.fixture(scope="session")
def qemu10() -> QemuBinary:
    """QEMU 10 (``qemu-system-x86_64`` on PATH)."""
    return find_qemu("10")


@pytest.fixture(scope="session")
def qemu72() -> QemuBinary:
    """QEMU 7.2, unpacked by ``scripts/setup.sh`` into ``.cache/qemu-7.2``."""
    return find_qemu("7.2")


@pytest.fixture(scope="session")
def accel(qemu10: QemuBinary, guest_elf: Path) -> str:
    """``kvm`` or ``tcg`` (``$FIXEDRAM_ACCEL`` overrides the probe)."""
    return choose_accel(qemu10)


@pytest.fixture(scope="session")
def shm_dir() -> Iterator[Path]:
    """A session-wide scratch directory on tmpfs (``/dev/shm``) when there is one, for memory
    dumps; removed at the end of the session."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="fixedram-test-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def qemu_image(
    tmp_path_factory: pytest.TempPathFactory, shm_dir: Path, accel: str, guest_elf: Path
) -> Callable[[str | ImageSpec], ImageCase]:
    """Factory: ``qemu_image("mapped-ram") -> ImageCase``; each kind is made once per session.

    Kinds are the keys of :data:`qemu_images.KINDS` (``legacy``, ``legacy-idle``,
    ``legacy-exec``, ``legacy-pc``, ``mapped-ram``, ``mapped-ram-idle``, ``mapped-ram-multifd2``,
    ``mapped-ram-offset``, ``mapped-ram-pc``, ``legacy-7.2``, ``legacy-7.2-idle``); an
    :class:`ImageSpec` makes a custom one. Treat the returned files as read-only: copy before
    modifying.
    """
    cache: dict[str | ImageSpec, ImageCase] = {}
    root = tmp_path_factory.mktemp("qemu-images")

    def make(kind: str | ImageSpec) -> ImageCase:
        if isinstance(kind, str) and kind not in KINDS:
            raise KeyError(f"unknown image kind {kind!r}; known: {', '.join(KINDS)}")
        if kind not in cache:
            n = len(cache)
            cache[kind] = make_image(kind, root / f"{n:02d}", shm_dir / f"{n:02d}", accel=accel)
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def linux_guest() -> LinuxGuest:
    """The Linux test guest (kernel + initramfs), built once from the packages
    ``scripts/setup.sh`` downloaded, and cached (see :mod:`fixedram.testing.guest.linux`)."""
    return build_linux_guest()



@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """A SeaweedFS server (``weed mini`` on loopback, authentication on) for the module,
    with the bucket ``TEST_BUCKET`` created; killed afterwards."""
    sw = Seaweed(tmp_path_factory.mktemp("seaweed"))
    sw.start()
    try:
        sw.client().create_bucket(Bucket=TEST_BUCKET)
        yield sw
    finally:
        sw.stop()
