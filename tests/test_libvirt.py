"""libvirt save images against a real libvirt (11.x): ``virsh save`` -> fixedram, and
fixedram -> ``virsh restore``.

A private ``libvirtd`` (:class:`fixedram.testing.libvirt.Libvirtd`: its configuration, state
and sockets in a temporary directory) runs TCG domains with the bare test guest and, once,
the Linux test guest. Like the QEMU fixtures, nothing here skips: without libvirt (``scripts/
setup.sh --libvirt``, which ``--dev`` includes) the fixture fails with that message.

A restore passes when the restored guest's RAM equals the saved guest's (``pmemsave`` of the
paused domain before the save and after the restore, or ``extract`` of the image) and its
heartbeat carries on from where it was saved: the next numbers, no reboot. The default run
has about a minute of these; raw images, proxy saves, the Linux guest and a domain on QEMU 7.2
are behind ``pytest -m libvirt_long``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixedram.testing.guest.linux import LinuxGuest, linux_append
from fixedram.testing.libvirt import Libvirtd, domain_xml, emulator_script
from fixedram.testing.vm import parse_heartbeats

PY = str(Path(sys.executable).absolute())
MEM_MIB = 128


def fr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "fixedram", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def ok(*args: str) -> str:
    r = fr(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    with Libvirtd(tmp_path_factory.mktemp("libvirtd")) as d:
        yield d


class Domain:
    """A transient domain of the private daemon, its serial log and its QMP (through virsh)."""

    def __init__(self, d: Libvirtd, name: str, workdir: Path, xml: str) -> None:
        self.d, self.name, self.workdir = d, name, workdir
        self.serial = workdir / f"{name}.log"
        self.xml = workdir / f"{name}.xml"
        self.xml.write_text(xml)

    def create(self) -> None:
        self.d.virsh("create", str(self.xml))

    def state(self) -> str:
        return self.d.virsh("domstate", self.name, check=False).strip()

    def qmp(self, cmd: str, **args: object) -> object:
        out = self.d.virsh("qemu-monitor-command", self.name,
                           json.dumps({"execute": cmd, "arguments": args}))
        return json.loads(out)["return"]

    def pmemsave(self, path: Path) -> bytes:
        self.qmp("pmemsave", val=0, size=MEM_MIB << 20, filename=str(path))
        return path.read_bytes()

    def last_hb(self) -> int:
        hbs = parse_heartbeats(self.serial.read_bytes())
        return hbs[-1].n if hbs else -1

    def wait_hb(self, after: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hbs = [h for h in parse_heartbeats(self.serial.read_bytes()) if h.n > after]
            if hbs:
                assert all(h.err == 0 for h in hbs)
                return hbs[0].n
            time.sleep(0.05)
        raise AssertionError(f"no heartbeat after {after}: {self.serial.read_bytes()[-200:]!r}")

    def destroy(self) -> None:
        if self.state() in ("running", "paused"):
            self.d.virsh("destroy", self.name)


@pytest.fixture
def bare(libvirtd: Libvirtd, guest_elf: Path, tmp_path: Path) -> Iterator[Domain]:
    """The bare guest under libvirt, its 16 MiB stamped, idling at generation 2."""
    dom = Domain(libvirtd, "frbare", tmp_path,
                 domain_xml("frbare", guest_elf, tmp_path / "frbare.log", mem_mib=MEM_MIB,
                            cmdline="mib=16 rate=0 hb=100 gens=2"))
    dom.create()
    try:
        dom.wait_hb(after=3)
        yield dom
    finally:
        dom.destroy()


def _save_paused(dom: Domain, image: Path, *virsh_opts: str) -> tuple[bytes, int]:
    """Pause, dump RAM, ``virsh save``: the RAM and the last heartbeat before the save."""
    dom.d.virsh("suspend", dom.name)
    ram = dom.pmemsave(image.with_suffix(".src.mem"))
    hb = dom.last_hb()
    dom.d.virsh("save", dom.name, str(image), *virsh_opts)
    return ram, hb


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", [pytest.param("raw", marks=pytest.mark.libvirt_long),
                                 "sparse", "zstd", "gzip"])
def test_virsh_save_read_everywhere(bare: Domain, tmp_path: Path, fmt: str) -> None:
    """A ``virsh save`` image of each kind: analyze, verify, extract (= pmemsave), convert,
    then restore --libvirt (paused, as saved): RAM equal, and the guest carries on."""
    img = tmp_path / f"{fmt}.sav"
    ram, hb = _save_paused(bare, img, "--image-format", fmt)
    rep = json.loads(ok("analyze", "--json", str(img)))
    assert rep["libvirt"]["format"] == fmt
    assert rep["libvirt"]["was_running"] is False
    assert rep["libvirt"]["domain"]["name"] == "frbare"
    assert rep["libvirt"]["domain"]["memory"] == MEM_MIB << 20
    assert rep["format"] == ("mapped-ram" if fmt == "sparse" else "stream")
    ok("verify", str(img))
    ok("extract", str(img), "-o", str(tmp_path / "pc.ram"))
    assert (tmp_path / "pc.ram").read_bytes() == ram
    ok("convert", str(img), str(tmp_path / "conv.img"))
    ok("verify", str(tmp_path / "conv.img"))
    if fmt in ("zstd", "gzip"):
        r = fr("restore", "--libvirt", "--connect", bare.d.uri, "--lazy", str(img))
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
        assert f"{fmt}-compressed" in r.stderr
    via = "proxy" if fmt == "sparse" else "auto"  # sparse: fixedram's send, not QEMU's load
    ok("restore", "--libvirt", "--connect", bare.d.uri, "--via", via, str(img))
    assert bare.state() == "paused"
    assert bare.pmemsave(tmp_path / "dst.mem") == ram
    bare.d.virsh("resume", bare.name)
    assert bare.wait_hb(after=hb) == hb + 1


@pytest.mark.qemu
@pytest.mark.parametrize("via", ["native",
                                 pytest.param("proxy", marks=pytest.mark.libvirt_long)])
def test_fixedram_save_virsh_restore(bare: Domain, tmp_path: Path, via: str) -> None:
    """``save --libvirt`` stops the domain and writes an image ``virsh restore`` loads: RAM
    equal, and the guest carries on."""
    img = tmp_path / "fr.sav"
    bare.d.virsh("suspend", bare.name)
    ram = bare.pmemsave(tmp_path / "src.mem")
    hb = bare.last_hb()
    ok("save", "--libvirt", bare.name, "--connect", bare.d.uri, "--via", via, str(img))
    assert bare.state() not in ("running", "paused")
    assert json.loads(ok("analyze", "--json", str(img)))["libvirt"]["format"] == "sparse"
    with open(img, "rb") as f:
        assert f.read(16) == b"LibvirtQemudSave"
    bare.d.virsh("restore", str(img))
    assert bare.state() == "paused"  # saved paused: virsh restore leaves it paused
    assert bare.pmemsave(tmp_path / "dst.mem") == ram
    bare.d.virsh("resume", bare.name)
    assert bare.wait_hb(after=hb) == hb + 1


@pytest.mark.qemu
def test_save_running_restore_lazy(bare: Domain, tmp_path: Path) -> None:
    """A running domain saved by fixedram restores running (``was_running``), lazily too."""
    img = tmp_path / "run.sav"
    ok("save", "--libvirt", bare.name, "--connect", bare.d.uri, str(img))
    hb = bare.last_hb()
    assert json.loads(ok("analyze", "--json", str(img)))["libvirt"]["was_running"] is True
    ok("restore", "--libvirt", "--lazy", "--connect", bare.d.uri, str(img))
    assert bare.state() == "running"
    assert bare.wait_hb(after=hb) == hb + 1


@pytest.mark.qemu
def test_restore_refused_while_the_domain_runs(bare: Domain, tmp_path: Path) -> None:
    """``restore --libvirt`` of an image whose domain (same name) is running again: one line,
    and the running domain is left alone."""
    img = tmp_path / "again.sav"
    bare.d.virsh("save", bare.name, str(img))
    bare.serial.write_bytes(b"")
    bare.create()
    hb = bare.wait_hb(after=1)
    r = fr("restore", "--libvirt", "--connect", bare.d.uri, str(img))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "frbare" in r.stderr and "already" in r.stderr, r.stderr
    assert bare.state() == "running"
    assert bare.wait_hb(after=hb) > hb


def test_without_the_binding_one_line(tmp_path: Path) -> None:
    """``--libvirt`` where libvirt-python cannot be imported: one line naming the extra."""
    for cmd in (["save", "--libvirt", "vm", str(tmp_path / "x.sav")],
                ["restore", "--libvirt", __file__]):
        r = subprocess.run([PY, "-c", "import sys; sys.modules['libvirt'] = None; "
                            "from fixedram.cli import main; main()", *cmd],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "fixedram[libvirt]" in r.stderr


def _corrupt(src: bytes, at: int, data: bytes) -> bytes:
    return src[:at] + data + src[at + len(data):]


@pytest.mark.qemu
def test_corrupt_header_refused(bare: Domain, tmp_path: Path) -> None:
    """Every broken header or XML: one line, exit status 2, before anything else."""
    img = tmp_path / "good.sav"
    bare.d.virsh("save", bare.name, str(img))
    good = img.read_bytes()
    (data_len,) = struct.unpack_from("<I", good, 20)
    cases = {
        "partial": (_corrupt(good, 0, b"LibvirtQemudPart"), "incomplete"),
        "version": (_corrupt(good, 16, struct.pack("<I", 3)), "version"),
        "format": (_corrupt(good, 28, struct.pack("<I", 7)), "format 7"),
        "data_len": (_corrupt(good, 20, struct.pack("<I", len(good))), "data length"),
        "cookie": (_corrupt(good, 32, struct.pack("<I", data_len + 5)), "cookie offset"),
        "xml": (_corrupt(good, 92, b"<domian"), "XML"),
        "xml-cut": (_corrupt(good, 92 + 40, b"\0"), "XML"),
        "relabel": (_corrupt(good, 28, struct.pack("<I", 6)), "says sparse"),
    }
    for name, (data, word) in cases.items():
        bad = tmp_path / f"{name}.sav"
        bad.write_bytes(data)
        for cmd in (["analyze"], ["verify"], ["restore", "--libvirt", "--connect",
                                              bare.d.uri]):
            r = fr(*cmd, str(bad))
            assert r.returncode == 2, (name, cmd, r.stderr)
            assert len(r.stderr.splitlines()) == 1, (name, cmd, r.stderr)
            assert word in r.stderr, (name, cmd, r.stderr)
    assert bare.state() not in ("running", "paused")  # no restore started a domain


@pytest.mark.qemu
@pytest.mark.libvirt_long
def test_linux_guest_round_trip(libvirtd: Libvirtd, linux_guest: LinuxGuest,
                                tmp_path: Path) -> None:
    """The Linux guest: ``virsh save --image-format sparse`` -> fixedram convert to a libvirt
    image of its own -> ``virsh restore``, and ``restore --libvirt`` of libvirt's image: the
    guest carries on with its data intact (err=0, same digest)."""
    dom = Domain(libvirtd, "frlinux", tmp_path,
                 domain_xml("frlinux", linux_guest.kernel, tmp_path / "frlinux.log",
                            initrd=linux_guest.initrd, mem_mib=256,
                            cmdline=linux_append(hb=500)))
    dom.create()
    try:
        dom.wait_hb(after=1, timeout=120)
        digest = parse_heartbeats(dom.serial.read_bytes())[-1].data
        img = tmp_path / "linux.sav"
        dom.d.virsh("save", dom.name, str(img), "--image-format", "sparse")
        hb = dom.last_hb()
        xml = tmp_path / "mig.xml"
        xml.write_text(_header_xml(img))
        ok("convert", "--libvirt-xml", str(xml), str(img), str(tmp_path / "fr.sav"))
        dom.d.virsh("restore", str(tmp_path / "fr.sav"))
        n = dom.wait_hb(after=hb)
        assert n == hb + 1
        dom.destroy()
        dom.serial.write_bytes(b"")  # the same beats again: only the new ones count
        ok("restore", "--libvirt", "--connect", libvirtd.uri, str(img))
        assert dom.wait_hb(after=hb) == hb + 1
        dom.wait_hb(after=hb + 3)
        last = parse_heartbeats(dom.serial.read_bytes())[-1]
        assert last.err == 0 and last.data == digest
    finally:
        dom.destroy()


def _header_xml(img: Path) -> str:
    from fixedram.image.reader import open_image

    with open_image(img) as im:
        assert im.libvirt is not None
        return im.libvirt.xml


@pytest.mark.qemu
@pytest.mark.libvirt_long
def test_qemu72_domain_saved_restored_on_qemu10(libvirtd: Libvirtd, guest_elf: Path,
                                               tmp_path: Path) -> None:
    """A libvirt domain on QEMU 7.2 (machine pc-q35-7.2), saved by ``save --libvirt --via
    proxy`` (7.2 has no mapped-ram: fixedram writes the sparse image), restored by ``virsh
    restore --xml`` on QEMU 10 with the same machine: RAM equal, the guest carries on."""
    emu = emulator_script(tmp_path / "qemu72", "7.2")
    dom = Domain(libvirtd, "fr72", tmp_path,
                 domain_xml("fr72", guest_elf, tmp_path / "fr72.log", mem_mib=MEM_MIB,
                            cmdline="mib=16 rate=0 hb=100 gens=2", machine="pc-q35-7.2",
                            emulator=str(emu)))
    dom.create()
    try:
        dom.wait_hb(after=3)
        assert dom.qmp("query-version")["qemu"]["major"] == 7  # type: ignore[index]
        img = tmp_path / "q72.sav"
        ram, hb = _save_paused_by_fixedram(dom, img, "--via", "proxy")
        assert json.loads(ok("analyze", "--json", str(img)))["libvirt"]["format"] == "sparse"
        xml = _header_xml(img).replace(str(emu), shutil.which("qemu-system-x86_64") or "")
        (tmp_path / "q10.xml").write_text(xml)
        dom.d.virsh("restore", "--xml", str(tmp_path / "q10.xml"), str(img))
        assert dom.qmp("query-version")["qemu"]["major"] >= 10  # type: ignore[index]
        assert dom.state() == "paused"
        assert dom.pmemsave(tmp_path / "dst.mem") == ram
        dom.d.virsh("resume", dom.name)
        assert dom.wait_hb(after=hb) == hb + 1
    finally:
        dom.destroy()


def _save_paused_by_fixedram(dom: Domain, image: Path, *opts: str) -> tuple[bytes, int]:
    """Pause, dump RAM, ``fixedram save --libvirt``: the RAM and the last heartbeat before
    the save; the domain is stopped afterwards."""
    dom.d.virsh("suspend", dom.name)
    ram = dom.pmemsave(image.with_suffix(".src.mem"))
    hb = dom.last_hb()
    ok("save", "--libvirt", dom.name, "--connect", dom.d.uri, *opts, str(image))
    assert dom.state() not in ("running", "paused")
    return ram, hb


def test_compressed_payload_bounded_by_the_domain_memory(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed payload that decompresses to more than a stream of the header's domain
    memory can be (a compression bomb) is refused in one line, not written out to the disk."""
    from fixedram.image import libvirt as lv

    monkeypatch.setattr(lv, "DECOMPRESS_HEADROOM", 1 << 20)
    xml = ("<domain type='qemu'><name>bomb</name><memory unit='KiB'>1024</memory>"
           "<vcpu>1</vcpu><os><type machine='pc-q35-10.0'>hvm</type></os></domain>")
    bomb = subprocess.run(["zstd", "-c", "-q"], input=bytes(16 << 20), capture_output=True,
                          check=True).stdout
    img = tmp_path / "bomb.sav"
    img.write_bytes(lv.header_bytes(xml, fmt="zstd", partial=False) + bomb)
    fd = os.open(img, os.O_RDONLY)
    try:
        hdr = lv.read_header(fd, img.stat().st_size)
        with pytest.raises(Exception, match="decompresses to more than") as e:
            lv.decompress_payload(fd, hdr)
        assert type(e.value).__name__ == "ImageError"
    finally:
        os.close(fd)
