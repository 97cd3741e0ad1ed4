"""The bare test guest: build it, and check the memory it leaves behind.

The guest (``dirty.c`` + ``mb.ld`` next to this file) is a multiboot-v1 ELF32 program with no
OS. It stamps ``npages`` pages starting at physical ``PAGE_BASE`` with a pattern that encodes the
page index and a generation number, checks each page before overwriting it, keeps a status
block at physical ``STATUS_ADDR`` (the rest of that page holds its tick counter, its stack and
a one-byte function it calls, so that TCG keeps tracking its writes there even in QEMU < 9.0; see
"the hot page" in ``dirty.c``) and prints ``HB <n> gen=<g> cur=<page> err=<e> KiBps=<k>``
on the first serial port. See ``docs/test-guest.md``.

Parameters go on the kernel command line (``-append``): ``mib=N`` or ``pct=P``, ``rate=MiB/s``
(0 = as fast as possible), ``fill=1|0``, ``hb=ms`` and ``gens=G`` (stop dirtying once generation
``G`` is reached and just idle; 0 = never).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fixedram.errors import VMError

__all__ = [
    "MAGIC",
    "PAGE_BASE",
    "PAGE_SIZE",
    "STATUS_ADDR",
    "GuestStatus",
    "build_guest",
    "check_pages",
    "default_cache_dir",
    "expected_page",
    "read_status",
]

MAGIC = 0x54524944  # 'DIRT' as a little-endian u32
STATUS_MAGIC = b"MIGSTAT1"
PAGE_BASE = 0x400000
STATUS_ADDR = 0x3FF000
PAGE_SIZE = 4096
_WORDS = PAGE_SIZE // 4
_MUL_I = 0x9E3779B1
_MUL_GEN = 0x85EBCA77
_CHUNK = 4096  # pages per numpy pass in check_pages

CFLAGS = [
    "-m32",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-stack-protector",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-Wall",
]
LDFLAGS = [
    "-m",
    "elf_i386",
    "-z",
    "max-page-size=0x1000",
    "--build-id=none",
]
_SOURCES = ("dirty.c", "mb.ld")


def default_cache_dir() -> Path:
    """``$FIXEDRAM_CACHE`` if set, else ``~/.cache/fixedram``."""
    env = os.environ.get("FIXEDRAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fixedram"


def _source_bytes() -> dict[str, bytes]:
    pkg = resources.files(__package__)
    return {name: (pkg / name).read_bytes() for name in _SOURCES}


def _ld_supports(flag: str) -> bool:
    try:
        out = subprocess.run(["ld", "--help"], capture_output=True, text=True, check=False)
    except OSError:
        return False
    return flag in out.stdout


def build_guest(cache_dir: Path | None = None) -> Path:
    """Compile the bare guest and return the path of ``bare.elf``.

    The ELF lands in ``<cache_dir>/guest-<hash>/bare.elf`` where the hash covers the sources
    and the compiler flags, so a changed source is rebuilt and an unchanged one is reused. The
    file is built in a temporary directory and renamed into place, so concurrent builders
    (pytest-xdist workers, several CLI runs) never see a half-written ELF.

    Raises :class:`VMError` if gcc or ld is missing or fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    srcs = _source_bytes()
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + srcs[name] + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    out_dir = cache / f"guest-{h.hexdigest()[:16]}"
    elf = out_dir / "bare.elf"
    if elf.is_file():
        return elf

    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise VMError(
                f"cannot build the test guest: {tool} not found (scripts/setup.sh installs it)"
            )
    cache.mkdir(parents=True, exist_ok=True)
    ldflags = list(LDFLAGS)
    if _ld_supports("--no-warn-rwx-segments"):
        ldflags.append("--no-warn-rwx-segments")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        t = Path(tmp)
        for name, data in srcs.items():
            (t / name).write_bytes(data)
        steps = [
            ["gcc", *CFLAGS, "-c", "dirty.c", "-o", "bare.o"],
            ["ld", *ldflags, "-T", "mb.ld", "bare.o", "-o", "bare.elf"],
        ]
        for argv in steps:
            r = subprocess.run(argv, cwd=t, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise VMError(
                    f"building the test guest failed: {' '.join(argv)}\n{r.stderr.strip()}"
                )
        stage = t / "out"
        stage.mkdir()
        (t / "bare.elf").rename(stage / "bare.elf")
        try:
            stage.rename(out_dir)
        except OSError:
            # Another builder won the race; its result is identical.
            if not elf.is_file():
                raise
    return elf


class GuestStatus(dict[str, int]):
    """The status block: keys ``hb``, ``gen``, ``cur``, ``npages``, ``err``, ``rate``, ``fill``."""


def _as_u8(mem: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(mem, np.ndarray):
        return mem.reshape(-1).view(np.uint8)
    return np.frombuffer(mem, dtype=np.uint8)


def read_status(mem: bytes | bytearray | memoryview | np.ndarray, base: int = 0) -> GuestStatus:
    """Parse the guest's status block from a memory dump that starts at physical ``base``.

    Raises :class:`ValueError` if the dump does not cover the block or holds no ``MIGSTAT1``.
    """
    m = _as_u8(mem)
    off = STATUS_ADDR - base
    if off < 0 or off + 36 > m.size:
        raise ValueError("the memory dump does not cover the guest status block")
    if m[off : off + 8].tobytes() != STATUS_MAGIC:
        raise ValueError(f"no MIGSTAT1 status block at physical {STATUS_ADDR:#x}")
    vals = m[off + 8 : off + 36].view("<u4")
    keys = ("hb", "gen", "cur", "npages", "err", "rate", "fill")
    return GuestStatus({k: int(v) for k, v in zip(keys, vals, strict=True)})


def expected_page(i: int, gen: int) -> bytes:
    """The 4 KiB a page ``i`` holds after generation ``gen`` has stamped it (``fill=1``)."""
    base = ((i * _MUL_I) ^ (gen * _MUL_GEN)) & 0xFFFFFFFF
    w = np.uint32(base) ^ np.arange(_WORDS, dtype=np.uint32)
    w[0], w[1], w[2] = MAGIC, i & 0xFFFFFFFF, gen & 0xFFFFFFFF
    return w.astype("<u4").tobytes()


def check_pages(
    mem: bytes | bytearray | memoryview | np.ndarray,
    npages: int | None = None,
    *,
    base: int = 0,
    status: GuestStatus | dict[str, int] | None = None,
    fill: bool | None = None,
    max_report: int = 100,
) -> dict[str, Any]:
    """Check the workload pages in a memory dump taken while the guest was stopped.

    ``mem`` is guest-physical memory starting at physical address ``base`` (``0`` for a dump of
    all of ``pc.ram``); it must cover the status block and the workload pages. The status block
    gives the generation ``G`` and cursor ``cur``: pages below ``cur`` must hold ``G``, pages
    above it ``G-1``. Page ``cur`` is the one being written when the VM stopped, so it may be
    half written: it passes if it holds either generation (or, in generation 0, anything). In
    generation 0 pages from ``cur`` on were never written and are not checked. ``npages``,
    ``status`` and ``fill`` default to what the status block says.

    Returns a dict: ``bad_pages`` (count), ``bad`` (sorted page indexes, at most
    ``max_report``), ``checked`` (pages checked), ``gen``, ``cur``, ``npages``, ``err`` (the
    guest's own error count), ``hb``, ``fill``.
    """
    m = _as_u8(mem)
    st = dict(status) if status is not None else read_status(m, base)
    n = int(st["npages"]) if npages is None else int(npages)
    full = bool(st.get("fill", 1)) if fill is None else bool(fill)
    gen, cur = int(st["gen"]), int(st["cur"])
    off = PAGE_BASE - base
    if off < 0 or off + n * PAGE_SIZE > m.size:
        raise ValueError(
            f"the memory dump ({m.size} bytes from {base:#x}) does not cover {n} workload pages"
        )
    pages = m[off : off + n * PAGE_SIZE].view("<u4").reshape(n, _WORDS)
    idx = np.arange(n, dtype=np.uint32)
    # Expected generation per page.
    want_gen = np.where(idx < cur, np.uint32(gen), np.uint32((gen - 1) & 0xFFFFFFFF))
    checked = np.ones(n, dtype=bool)
    if gen == 0:
        checked[idx >= cur] = False
    ok = np.empty(n, dtype=bool)
    for a in range(0, n, _CHUNK):  # bounded temporaries for big guests
        b = min(n, a + _CHUNK)
        ok[a:b] = _pages_ok(pages[a:b], idx[a:b], want_gen[a:b], full)
    if 0 <= cur < n:
        # The page being written may hold either generation, or a mix (then it fails both).
        if gen == 0:
            ok[cur] = True
        else:
            one = np.array([gen], np.uint32)
            alt = bool(_pages_ok(pages[cur : cur + 1], idx[cur : cur + 1], one, full)[0])
            ok[cur] = bool(ok[cur]) or alt or _half_written(pages[cur], cur, gen, full)
    bad_mask = checked & ~ok
    bad = np.flatnonzero(bad_mask)
    return {
        "bad_pages": int(bad.size),
        "bad": [int(b) for b in bad[:max_report]],
        "checked": int(checked.sum()),
        "gen": gen,
        "cur": cur,
        "npages": n,
        "err": int(st.get("err", 0)),
        "hb": int(st.get("hb", 0)),
        "fill": int(full),
    }


def _pattern(idx: np.ndarray, gens: np.ndarray) -> np.ndarray:
    base = (idx.astype(np.uint64) * _MUL_I) ^ (gens.astype(np.uint64) * _MUL_GEN)
    return (base & 0xFFFFFFFF).astype(np.uint32)


def _pages_ok(pages: np.ndarray, idx: np.ndarray, gens: np.ndarray, full: bool) -> np.ndarray:
    ok = (pages[:, 0] == MAGIC) & (pages[:, 1] == idx) & (pages[:, 2] == gens)
    if full:
        k = np.arange(3, _WORDS, dtype=np.uint32)
        want = _pattern(idx, gens)[:, None] ^ k[None, :]
        ok &= (pages[:, 3:] == want).all(axis=1)
    return ok


def _half_written(page: np.ndarray, i: int, gen: int, full: bool) -> bool:
    """True if ``page`` is generation ``gen`` up to some word and ``gen-1`` after it."""
    idx = np.array([i], np.uint32)
    new = np.empty(_WORDS, np.uint32)
    old = np.empty(_WORDS, np.uint32)
    k = np.arange(_WORDS, dtype=np.uint32)
    new[:] = _pattern(idx, np.array([gen], np.uint32))[0] ^ k
    old[:] = _pattern(idx, np.array([gen - 1], np.uint32))[0] ^ k
    new[:3] = (MAGIC, i, gen)
    old[:3] = (MAGIC, i, gen - 1)
    words = _WORDS if full else 3
    is_new = page[:words] == new[:words]
    is_old = page[:words] == old[:words]
    if not (is_new | is_old).all():
        return False
    # The guest writes words in increasing order: a prefix is new, the rest old.
    first_old = int(np.argmax(~is_new)) if not is_new.all() else words
    return bool(is_old[first_old:].all())
