"""Images in S3 object storage, against a real SeaweedFS server (``weed mini`` on loopback).

A save on one "host" (a process with its own working and staging directories and chunk
cache) is restored on another; a re-save uploads only changed chunks; faults (bad
credentials, a server that is gone, a save killed half way, a damaged chunk) leave the
previous image intact and say so in one line; the server restarts in the middle of a
full restore and the restore completes; gc deletes unreferenced chunks older than the
grace period and nothing else, also while a save uploads. (The Linux guest's lazy
restore from S3 is in test_linux.py, next to the guest it reuses.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_receive import DEVICE
from test_save_restore import (
    check_continues,
    destination,
    one_line_error,
    same_ram,
    socks,  # noqa: F401 - fixture
    source,
)

from fixedram.image.chunked import collect_garbage
from fixedram.testing.guest import read_status
from fixedram.testing.seaweed import TEST_BUCKET, Seaweed
from fixedram.testing.vm import find_qemu

pytestmark = pytest.mark.qemu

BUCKET = TEST_BUCKET


def host(sw: Seaweed, root: Path, name: str, **extra: str) -> dict[str, str]:
    """The environment of one "host": its own staging directory and chunk cache."""
    d = root / name
    (d / "stage").mkdir(parents=True, exist_ok=True)
    return sw.env(**{"FIXEDRAM_STAGING": str(d / "stage"),
                     "FIXEDRAM_CHUNK_CACHE": str(d / "cache"),
                     "FIXEDRAM_S3_RETRY_SECONDS": "3", **extra})


def fx(env: dict[str, str], *args: str, cwd: Path | None = None,
       timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fixedram", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env, cwd=cwd)


def ok(env: dict[str, str], *args: str, cwd: Path | None = None) -> dict[str, Any]:
    r = fx(env, *args, "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_save_restore_incremental_lazy(s3: Seaweed, accel: str, tmp_path: Path,
                                       shm_dir: Path, socks: Path) -> None:  # noqa: F811
    """Save to S3 on host A; analyze, verify, restore (proxy and lazy) on host B; a re-save
    of the same guest uploads only the chunks that changed."""
    qemu = find_qemu("10")
    a, b = host(s3, tmp_path, "a"), host(s3, tmp_path, "b")
    url = f"s3://{BUCKET}/guests/vm1"
    dumps = shm_dir / "s3-rt"
    dumps.mkdir()
    src = source(qemu, tmp_path, socks, accel)
    with src:
        src.wait_heartbeat(gen_at_least=1)
        ctl = str(socks / "src-ctl.qmp")
        first = ok(a, "save", "--qmp", ctl, url, "--via", "proxy", "--resume",
                   cwd=tmp_path / "a")
        up1 = first["upload"]
        assert up1["uploaded"] == up1["chunks"] > 8 and up1["reused"] == 0
        assert up1["uploaded_bytes"] < 64 << 20  # 128 MiB of RAM, about 40 MiB of data
        assert up1["early"] > 0  # chunks uploaded while the proxy wrote the image
        assert first["resumed"]
        n = src.heartbeats()[-1].n
        src.wait_heartbeat(after=n)
        # an upload that fails after the VM was paused and saved: it runs again, one line
        # (a bucket whose grace period no upload can meet makes any upload fail)
        s3.client().create_bucket(Bucket="fixedram-failing")
        _put(s3, "s3://fixedram-failing/.fixedram/gc.json", b'{"grace_seconds": 0.001}')
        e = one_line_error(fx(a, "save", "--qmp", ctl, "s3://fixedram-failing/vm",
                              "--via", "proxy", cwd=tmp_path / "a"))
        assert "grace period" in e and "the VM runs again" in e
        n = src.heartbeats()[-1].n
        src.wait_heartbeat(after=n)
        second = ok(a, "save", "--qmp", ctl, url, cwd=tmp_path / "a")
        assert second["via"] == "proxy"  # auto, for an s3:// image saved paused
        up2 = second["upload"]
        # the guest rewrites 32 MiB of stamped pages: those chunks changed, the rest not
        assert up2["reused"] > 0 and up2["uploaded"] < up2["chunks"]
        assert up2["uploaded_bytes"] < up1["uploaded_bytes"]
        assert not list((tmp_path / "a" / "stage").iterdir())  # staging copy removed
        src_mem = src.pmemsave(dumps / "src.mem")
        last_hb = src.heartbeats()[-1].n
    st = read_status(src_mem.read_bytes()[: 0x400000])
    # host B: nothing local but the URL
    rep = ok(b, "analyze", url, cwd=tmp_path / "b")
    assert rep["format"] == "mapped-ram" and rep["path"] == url  # as given, not s3:/...
    r = fx(b, "verify", url, cwd=tmp_path / "b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chunks fetched and checked" in r.stdout
    dst = destination(src, socks, "dst1")
    with dst:
        e = one_line_error(fx(b, "restore", "--qmp", str(socks / "dst1-ctl.qmp"), url,
                              "--via", "native"))
        assert "needs a local image file" in e
        rep = ok(b, "restore", "--qmp", str(socks / "dst1-ctl.qmp"), url, "--paused")
        assert rep["via"] == "proxy" and rep["channels"] == 2  # the default, as for a file
        assert same_ram(src_mem, dst.pmemsave(dumps / "dst1.mem"), accel) == []
        dst.cont()
        check_continues(dst, last_hb, st["gen"])
    dst = destination(src, socks, "dst2")
    with dst:
        c = host(s3, tmp_path, "c")
        # QEMU would start an exec: child without fixedram's S3 settings: refused first
        e = one_line_error(fx(c, "restore", "--qmp", str(socks / "dst2-ctl.qmp"), url,
                              "--lazy", "--transport", "exec"))
        assert "--transport fd or unix" in e
        # --endpoint wins over AWS_ENDPOINT_URL_S3 (as over AWS_ENDPOINT_URL)
        rep = ok(dict(c, AWS_ENDPOINT_URL_S3="http://127.0.0.1:9"), "--endpoint",
                 c["AWS_ENDPOINT_URL"], "restore", "--qmp", str(socks / "dst2-ctl.qmp"),
                 url, "--lazy")
        assert rep["status"] == "running"
        check_continues(dst, last_hb, st["gen"])
    # and back to a local file, equal page for page
    local = tmp_path / "b" / "vm.img"
    r = fx(b, "convert", url, str(local))
    assert r.returncode == 0, r.stderr
    r = fx(b, "extract", url, "-o", str(tmp_path / "b" / "from-s3.raw"))
    assert r.returncode == 0, r.stderr
    r = fx(b, "extract", str(local), "-o", str(tmp_path / "b" / "from-local.raw"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "from-s3.raw").read_bytes() == \
        (tmp_path / "b" / "from-local.raw").read_bytes()
    # gc keeps every chunk the manifest names
    g = ok(b, "gc", f"s3://{BUCKET}", "--dry-run")
    assert g["manifests"] >= 1 and g["deleted"] == 0


def _image(qemu_image: Any) -> Path:
    return qemu_image("mapped-ram").path  # type: ignore[no-any-return]


def test_faults_leave_previous_image(s3: Seaweed, tmp_path: Path, qemu_image: Any) -> None:
    """Bad credentials, missing bucket/key, a server that is gone, a killed upload and a
    damaged chunk: one line each, and the previous image stays whole."""
    img = _image(qemu_image)
    env = host(s3, tmp_path, "h")
    url = f"s3://{BUCKET}/faults/vm"
    assert fx(env, "convert", str(img), url).returncode == 0
    before = fx(env, "analyze", url, "--json")
    assert before.returncode == 0

    def intact() -> None:
        r = fx(env, "verify", url)
        assert r.returncode == 0, r.stdout + r.stderr
        assert fx(env, "analyze", url, "--json").stdout == before.stdout

    bad = dict(env, AWS_SECRET_ACCESS_KEY="wrong")
    e = one_line_error(fx(bad, "convert", str(img), url))
    assert "credentials were refused" in e
    e = one_line_error(fx(bad, "analyze", url))
    assert "credentials were refused" in e and url in e
    e = one_line_error(fx(env, "analyze", f"s3://{BUCKET}/faults/nope"))
    assert "no such object" in e
    e = one_line_error(fx(env, "analyze", "s3://no-such-bucket-here/x"))
    assert "no such bucket" in e
    intact()
    # a save killed half way: chunks may be stored, the manifest is not replaced
    big = tmp_path / "big.img"
    _write_random_image(big)
    slow = dict(env, FIXEDRAM_CHUNK_CACHE="off")
    p = subprocess.Popen([sys.executable, "-m", "fixedram", "convert", str(big), url],
                         env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before_kill = _stored_chunks(s3, BUCKET)
    deadline = time.monotonic() + 60
    while not (_stored_chunks(s3, BUCKET) - before_kill) and time.monotonic() < deadline:
        time.sleep(0.02)  # into the upload: a chunk of it is stored
    assert p.poll() is None, "the upload ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    intact()
    # the server is gone: one line, nothing changed once it is back
    s3.stop()
    try:
        e = one_line_error(fx(dict(env, FIXEDRAM_S3_RETRY_SECONDS="1"), "convert", str(img),
                              url))
        assert "unreachable" in e
    finally:
        s3.start()
    intact()
    # a damaged chunk: verify names it, a read refuses it before any byte is used
    man = json.loads(_get(s3, url))
    blk = next(b for b in man["blocks"] if b["chunks"])
    idx, name, codec, _ = blk["chunks"][0]
    key = f".fixedram/chunks/{name}" + (".zst" if codec == "zstd" else "")
    _put(s3, f"s3://{BUCKET}/{key}", b"\0" * 4096)
    fresh = dict(env, FIXEDRAM_CHUNK_CACHE="off")
    r = fx(fresh, "verify", url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"chunk {idx}" in r.stdout and name in r.stdout
    e = one_line_error(fx(fresh, "extract", url, "--block", blk["name"],
                          "-o", str(tmp_path / "x.raw")))
    assert "does not" in e and name in e
    assert not (tmp_path / "x.raw").exists()
    # a re-save repairs it (the damaged object's size differs: uploaded again)
    assert fx(env, "convert", str(img), url).returncode == 0
    assert fx(fresh, "verify", url).returncode == 0
    # a chunk deleted from the bucket: a problem naming it (exit 1), not an abort
    s3.client().delete_object(Bucket=BUCKET, Key=key)
    r = fx(fresh, "verify", url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"chunk {idx}" in r.stdout and name in r.stdout and "missing" in r.stdout
    # a server that cannot be reached still stops verify with one line (exit 2)
    gone = dict(fresh, AWS_ENDPOINT_URL="http://127.0.0.1:9", FIXEDRAM_S3_RETRY_SECONDS="1")
    gone.pop("AWS_ENDPOINT_URL_S3", None)
    r = fx(gone, "verify", url)
    assert r.returncode == 2 and "unreachable" in one_line_error(r)
    assert fx(env, "convert", str(img), url).returncode == 0
    assert fx(fresh, "verify", url).returncode == 0
    # fixedram's own prefix is no place for an image
    e = one_line_error(fx(env, "convert", str(img), f"s3://{BUCKET}/.fixedram/vm"))
    assert "fixedram's own" in e


def test_empty_and_bad_settings(s3: Seaweed, tmp_path: Path, qemu_image: Any,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty endpoint and credential variables count as unset (a command works); a
    malformed endpoint, partial credentials or a bad retry setting are one line each,
    never a traceback (obstore panics on some of them)."""
    from fixedram.errors import StoreError
    from fixedram.io.objstore import Store

    env = host(s3, tmp_path, "h", AWS_ENDPOINT_URL_S3="", AWS_REGION="",
               AWS_SESSION_TOKEN="", AWS_PROFILE="", FIXEDRAM_S3_RETRY_SECONDS="")
    url = f"s3://{BUCKET}/settings/vm"
    r = fx(env, "convert", str(_image(qemu_image)), url)
    assert r.returncode == 0, r.stderr
    e = one_line_error(fx(dict(env, AWS_ENDPOINT_URL="http://"), "analyze", url))
    assert "bad S3 endpoint 'http://' (from AWS_ENDPOINT_URL)" in e
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert Store(BUCKET).head(url.split("/", 3)[3]) is not None
    with monkeypatch.context() as m:  # bodies signed instead of CRC64-NVME-checked
        m.setenv("FIXEDRAM_S3_CHECKSUM", "sha256")
        Store(BUCKET).put("settings/signed", b"x" * 5000)
        assert bytes(Store(BUCKET).get("settings/signed")) == b"x" * 5000
    for var, value, says in (
            ("AWS_ENDPOINT_URL_S3", "garbage", "bad S3 endpoint 'garbage'"),
            ("AWS_ENDPOINT_URL_S3", "ftp://host", "bad S3 endpoint"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:99999", "bad S3 endpoint"),
            ("AWS_SECRET_ACCESS_KEY", "", "partial S3 credentials"),
            ("AWS_ACCESS_KEY_ID", " ", "partial S3 credentials"),
            ("FIXEDRAM_S3_RETRY_SECONDS", "-1", "FIXEDRAM_S3_RETRY_SECONDS='-1'"),
            ("FIXEDRAM_S3_RETRY_SECONDS", "soon", "expected a number of seconds"),
            ("FIXEDRAM_S3_CHECKSUM", "md5", "FIXEDRAM_S3_CHECKSUM='md5'")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(StoreError, match=re.escape(says)):
                Store(BUCKET).head("settings/vm")


@pytest.mark.long
@pytest.mark.parametrize("channels", [["--channels", "0"], []], ids=["one-stream", "default"])
def test_server_restart_during_restore(s3: Seaweed, accel: str, tmp_path: Path,
                                       socks: Path, shm_dir: Path,  # noqa: F811
                                       channels: list[str]) -> None:
    """The server is killed and started again while a full restore reads chunks (one stream,
    or the default two multifd channels): the requests are retried and the restored RAM
    equals the saved one."""
    qemu = find_qemu("10")
    env = host(s3, tmp_path, "h", FIXEDRAM_S3_RETRY_SECONDS="20")
    url = f"s3://{BUCKET}/restart/vm"
    dumps = shm_dir / f"s3-restart{len(channels)}"  # one per parameter: shm_dir is shared
    dumps.mkdir()
    src = source(qemu, tmp_path, socks, accel, mem="512M", append="mib=160 rate=32 hb=100")
    with src:
        src.wait_heartbeat(gen_at_least=1)
        ok(env, "save", "--qmp", str(socks / "src-ctl.qmp"), url, "--via", "proxy")
        src_mem = src.pmemsave(dumps / "src.mem")
    dst = destination(src, socks, "dst")
    with dst:
        p = subprocess.Popen([sys.executable, "-m", "fixedram", "restore", "--qmp",
                              str(socks / "dst-ctl.qmp"), url, "--paused", "--json",
                              *channels],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cache = tmp_path / "h" / "cache"
        deadline = time.monotonic() + 60
        while len(list(cache.glob("*/*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)  # the meta chunk and the first asked for: it reads pages
        os.kill(p.pid, signal.SIGSTOP)
        try:
            assert p.poll() is None, "the restore ended before the server was stopped"
            s3.stop()
        finally:
            os.kill(p.pid, signal.SIGCONT)
        time.sleep(1.0)  # its requests fail and are retried meanwhile
        s3.start()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        rep = json.loads(out)
        assert rep["pages"] > 160 * 256 and rep["channels"] == (0 if channels else 2)
        assert same_ram(src_mem, dst.pmemsave(dumps / "dst.mem"), accel) == []


def _write_random_image(path: Path) -> None:
    """A mapped-ram image with 192 MiB of incompressible data (uploads for a while)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from synth_images import write_mapped_image

    blob = os.urandom(192 << 20)
    pages = {i: blob[i * 4096 : (i + 1) * 4096] for i in range(49152)}
    write_mapped_image(path, {"pc.ram": 256 << 20}, {"pc.ram": pages})


def _get(sw: Seaweed, url: str) -> bytes:
    bucket, key = url[5:].split("/", 1)
    return sw.client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


def _put(sw: Seaweed, url: str, data: bytes) -> None:
    bucket, key = url[5:].split("/", 1)
    sw.client().put_object(Bucket=bucket, Key=key, Body=data)


# -- gc -------------------------------------------------------------------------------------

#: Grace period of the gc tests' buckets (seconds): long enough for their small uploads to
#: finish within half of it, short enough to wait for.
GC_GRACE = "8"
PIECE = 4 << 20  # one chunk


def _chunked_image(path: Path, pieces: list[bytes]) -> dict[int, bytes]:
    """A mapped-ram image whose chunk ``k`` holds ``pieces[k]``; returns its pages."""
    sys.path.insert(0, str(Path(__file__).parent))
    from synth_images import write_mapped_image

    pages = {k * 1024 + i: p[i * 4096 : (i + 1) * 4096]
             for k, p in enumerate(pieces) for i in range(1024)}
    write_mapped_image(path, {"pc.ram": 128 << 20}, {"pc.ram": pages})
    return pages


def _chunk_keys(sw: Seaweed, url: str) -> set[str]:
    """The chunk keys the manifest at ``url`` names (its meta chunk included)."""
    man = json.loads(_get(sw, url))

    def key(name: str, codec: str) -> str:
        return f".fixedram/chunks/{name}" + (".zst" if codec == "zstd" else "")

    return {key(man["meta"]["name"], man["meta"]["codec"])} | {
        key(n, c) for b in man["blocks"] for _, n, c, _ in b["chunks"]}


def _stored_chunks(sw: Seaweed, bucket: str) -> set[str]:
    pages = sw.client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=".fixedram/chunks/")
    return {o["Key"] for p in pages for o in p.get("Contents", [])}


def _same_pages(env: dict[str, str], url: str, pages: dict[int, bytes], out: Path) -> None:
    """``url`` verifies (every chunk fetched from the store) and holds exactly ``pages``."""
    fresh = dict(env, FIXEDRAM_CHUNK_CACHE="off")
    r = fx(fresh, "verify", url)
    assert r.returncode == 0, r.stdout + r.stderr
    r = fx(fresh, "extract", url, "-o", str(out))
    assert r.returncode == 0, r.stderr
    raw = out.read_bytes()
    want = bytearray(len(raw))
    for i, p in pages.items():
        want[i * 4096 : (i + 1) * 4096] = p
    assert raw == want


def test_early_upload_rewritten_chunks(s3: Seaweed, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks uploaded while the image is being written (as a save through the proxy
    does) stay right when the image changes afterwards: a write into a chunk being read
    waits for the read, and chunks written again after their upload (a page rewritten, a
    chunk zeroed, the last chunk changed once more at the end) are stored as they end;
    the object image holds exactly the final pages. A chunk deleted (as by gc) just after
    the manifest is put back from a place of the image that still holds its bytes."""
    from fixedram.image import chunked
    from fixedram.image.writer import MappedRamWriter
    from fixedram.io.objstore import Store
    from fixedram.stream import Configuration, RamBlock

    env = host(s3, tmp_path, "h", FIXEDRAM_CHUNK_CACHE="off")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{BUCKET}/early"
    p = [os.urandom(PIECE) for _ in range(4)]
    held_key = chunked.chunk_key(chunked.chunk_name(p[2]), "raw")
    # chunk 0's first content: uploaded early from chunk 0, which changes afterwards; the
    # final image holds it as chunk 4
    moved_key = chunked.chunk_key(chunked.chunk_name(p[0]), "raw")
    at, go = threading.Event(), threading.Event()
    real_put = Store.put

    def put(self: Store, key: str, data: Any) -> None:
        if key == held_key and not go.is_set():
            at.set()  # chunk 2 is being read: hold its PUT
            assert go.wait(60)
        real_put(self, key, data)
        if key == "early":  # the manifest: a gc deletes a chunk it names just after
            s3.client().delete_object(Bucket=BUCKET, Key=moved_key)

    monkeypatch.setattr(Store, "put", put)
    early = chunked.EarlyUpload(url)
    path = tmp_path / "early.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = MappedRamWriter(fd, observer=early)
        w.begin(Configuration("pc-q35-10.0"), [RamBlock("pc.ram", 32 << 20)], section_id=1)
        for k in range(4):  # in order, as a paused guest's pages come: 0-2 are taken
            w.write_pages("pc.ram", k * 1024, [p[k]])
        assert at.wait(60)
        t = threading.Thread(target=w.write_pages,
                             args=("pc.ram", 2 * 1024 + 7, [b"\x27" * 4096]))
        t.start()
        t.join(1.0)
        assert t.is_alive()  # the write into chunk 2 waits while chunk 2 is read
        go.set()
        t.join(60)
        w.zero_pages("pc.ram", 1024, 1024)  # chunk 1: no data any more
        # scattered pages (a multifd packet of a guest with zero pages between its others)
        # into chunk 2, taken already: far apart (the observer hears of each run; chunk 3
        # too) and close together (of the stretch they lie in)
        scattered = np.array([2 * 1024 + 100, 3 * 1024 + 9, 2 * 1024 + 500, 2 * 1024 + 502,
                              2 * 1024 + 504], dtype=np.int64)
        views = [memoryview(bytes([0x31 + i]) * 4096) for i in range(len(scattered))]
        w.write_page_set("pc.ram", scattered[:2], views[:2])
        w.write_page_set("pc.ram", scattered[2:], views[2:])
        w.write_pages("pc.ram", 4 * 1024, [p[0]])  # the first content of chunk 0
        w.write_pages("pc.ram", 5, [b"\x05" * 4096])  # chunk 0 changes last
        w.finish(DEVICE, b'{"page_size": 4096}')
    finally:
        os.close(fd)
    try:
        rep = chunked.upload(path, url, early=early)
    finally:
        early.close()
    monkeypatch.undo()
    final = {k * 1024 + i: p[k][i * 4096 : (i + 1) * 4096]
             for k in (0, 2, 3) for i in range(1024)}
    final |= {4 * 1024 + i: p[0][i * 4096 : (i + 1) * 4096] for i in range(1024)}
    final[5] = b"\x05" * 4096
    final[2 * 1024 + 7] = b"\x27" * 4096
    final |= {int(pg): bytes([0x31 + i]) * 4096 for i, pg in enumerate(scattered)}
    assert rep.chunks == 5  # the meta chunk and chunks 0, 2, 3, 4
    assert rep.early == 3  # 2 (read again after its write), 3 and 4; 0 from the image
    assert rep.restored == 1  # the deleted chunk, from chunk 4 (chunk 0 holds other bytes)
    _same_pages(env, url, final, tmp_path / "early.raw")


@pytest.mark.long
def test_gc_deletes_old_unreferenced_chunks(s3: Seaweed, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """gc deletes the chunks no manifest names once older than the grace period; chunks a
    manifest names, and unreferenced ones younger than the grace period, stay; the images
    are whole afterwards."""
    bucket = "fixedram-gc"
    s3.client().create_bucket(Bucket=bucket)
    env = host(s3, tmp_path, "h")
    assert "whole bucket" in one_line_error(fx(env, "gc", f"s3://{bucket}/a"))
    ok(env, "gc", f"s3://{bucket}", "--grace", GC_GRACE)
    p = [os.urandom(PIECE) for _ in range(5)]
    a_pages = _chunked_image(tmp_path / "a.img", [p[0], p[1]])
    _chunked_image(tmp_path / "b.img", [p[0], p[2], p[3]])
    c_pages = _chunked_image(tmp_path / "c.img", [p[4]])
    a, b = f"s3://{bucket}/a", f"s3://{bucket}/b"
    for img, url in (("a.img", a), ("b.img", b)):
        assert fx(env, "convert", str(tmp_path / img), url).returncode == 0
    first_b = _chunk_keys(s3, b)
    assert fx(env, "convert", str(tmp_path / "c.img"), b).returncode == 0  # replaces b
    used = _chunk_keys(s3, a) | _chunk_keys(s3, b)
    gone = first_b - used  # b's first chunks that no manifest names any more
    assert len(gone) >= 2  # p[2] and p[3] at least (p[0] is a's too)
    time.sleep(float(GC_GRACE) + 0.5)  # every chunk so far is older than the grace period
    young = f".fixedram/chunks/{'f' * 32}"
    s3.client().put_object(Bucket=bucket, Key=young, Body=b"an unreferenced young chunk")
    dry = ok(env, "gc", f"s3://{bucket}", "--dry-run")
    assert dry["deleted"] == len(gone) and _stored_chunks(s3, bucket) == used | gone | {young}
    dry = ok(env, "gc", f"s3://{bucket}", "--dry-run", "--grace", "100000")
    assert dry["deleted"] == 0  # with that grace period; the bucket's stays as it was:
    assert json.loads(_get(s3, f"s3://{bucket}/.fixedram/gc.json"))["grace_seconds"] == 8
    # a marked object larger than a reader accepts stops gc before it deletes anything
    # (the limit lowered, in this process, to spare the server a 64 MiB object)
    from fixedram.errors import ImageError
    from fixedram.image import chunked

    _put(s3, f"s3://{bucket}/huge", b'{"fixedram-chunked-image":1,' + b" " * 4000)
    with monkeypatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        m.setattr(chunked, "MAX_MANIFEST", 4000)
        with pytest.raises(ImageError, match=r"huge.*nothing deleted"):
            collect_garbage(f"s3://{bucket}")
    assert _stored_chunks(s3, bucket) == used | gone | {young}
    s3.client().delete_object(Bucket=bucket, Key="huge")
    rep = ok(env, "gc", f"s3://{bucket}")
    assert rep["manifests"] == 2 and rep["deleted"] == len(gone) and rep["young"] == 1
    assert rep["referenced"] == len(used)
    assert _stored_chunks(s3, bucket) == used | {young}
    _same_pages(env, a, a_pages, tmp_path / "a.raw")
    _same_pages(env, b, c_pages, tmp_path / "b.raw")


def test_gc_during_save(s3: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc runs while a save uploads two old unreferenced chunks again, in the two ways a
    listing goes stale: chunk 0 is written again after gc listed it (gc's check before
    deleting sees the new time and keeps it), chunk 1 after gc checked it and before it
    deletes it (the save finds it gone after writing its manifest and puts it again). The
    save and gc run in this process, each request against the real server; the save is
    held at those PUTs (and at its manifest until gc is done) to force the interleaving."""
    from fixedram.image import chunked
    from fixedram.io.objstore import Store

    bucket = "fixedram-gc-save"
    s3.client().create_bucket(Bucket=bucket)
    env = host(s3, tmp_path, "h", FIXEDRAM_CHUNK_CACHE="off")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    grace = 8.0  # the held save (about 0.3 s) must finish within half of it
    chunked.write_grace(Store(bucket), grace)
    p = [os.urandom(PIECE) for _ in range(6)]
    _chunked_image(tmp_path / "old.img", p[:2])
    old = f"s3://{bucket}/old"
    chunked.upload(tmp_path / "old.img", old)
    x0, x1 = (chunked.chunk_key(chunked.chunk_name(c), "raw") for c in p[:2])
    assert {x0, x1} <= _chunk_keys(s3, old)
    s3.client().delete_object(Bucket=bucket, Key="old")  # its chunks: unreferenced
    time.sleep(grace + 0.5)  # ... and older than the grace period
    new_pages = _chunked_image(tmp_path / "new.img", p)  # the old chunks and 4 more
    new = f"s3://{bucket}/new"

    ev = {k: threading.Event() for k in ("x0_at", "x0_go", "x0_done", "x1_at", "x1_go",
                                          "x1_done", "gc_done")}
    real_put, real_list, real_delete = Store.put, Store.list, Store.delete

    def put(self: Store, key: str, data: Any) -> None:
        for x, name in ((x0, "x0"), (x1, "x1")):
            if key == x and not ev[f"{name}_done"].is_set():
                ev[f"{name}_at"].set()  # HEADed (old), about to PUT it again
                assert ev[f"{name}_go"].wait(60)
                real_put(self, key, data)
                ev[f"{name}_done"].set()
                return
        if key == "new":
            assert ev["gc_done"].wait(60)
        real_put(self, key, data)

    def listing(self: Store, prefix: str) -> Any:
        out = list(real_list(self, prefix))
        if prefix == chunked.CHUNK_PREFIX and threading.current_thread() is \
                threading.main_thread():  # gc listed the chunks: x0 is written again
            ev["x0_go"].set()
            assert ev["x0_done"].wait(60)
        return iter(out)

    def delete(self: Store, keys: Any) -> None:
        keys = list(keys)
        if x1 in keys:  # gc checked x1 (unchanged), about to delete: x1 is written again
            ev["x1_go"].set()
            assert ev["x1_done"].wait(60)
        real_delete(self, keys)

    monkeypatch.setattr(Store, "put", put)
    monkeypatch.setattr(Store, "list", listing)
    monkeypatch.setattr(Store, "delete", delete)
    result: list[Any] = []

    def save() -> None:
        try:
            result.append(chunked.upload(tmp_path / "new.img", new))
        except BaseException as e:  # reported below
            result.append(e)
            for e_ in ev.values():
                e_.set()

    t = threading.Thread(target=save)
    t.start()
    try:
        assert ev["x0_at"].wait(60) and ev["x1_at"].wait(60)
        rep = collect_garbage(f"s3://{bucket}")  # while the save is under way
    finally:
        ev["gc_done"].set()
        for k in ("x0_go", "x1_go", "x0_done", "x1_done"):
            ev[k].set()
        t.join(120)
    monkeypatch.undo()
    assert isinstance(result[0], chunked.UploadReport), result
    assert rep.manifests == 0  # the save's manifest was not written yet
    assert rep.changed == 1  # x0: written again after the listing, kept
    assert rep.deleted == 2  # x1 (put back by the save) and the old image's meta chunk
    assert result[0].restored == 1  # x1
    assert {x0, x1} <= _stored_chunks(s3, bucket)
    ok(env, "gc", f"s3://{bucket}")  # and once more after it
    _same_pages(env, new, new_pages, tmp_path / "new.raw")


def test_gc_removes_records_of_deleted_images(s3: Seaweed, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """gc deletes the working-set record (``.fixedram/working-sets/KEY``) of a key whose
    image was deleted once it is older than the grace period; the records of existing
    images, and young ones, stay (the rule gc applies to chunks)."""
    from fixedram.image import chunked

    bucket = "fixedram-gc-records"
    s3.client().create_bucket(Bucket=bucket)
    env = host(s3, tmp_path, "h")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _chunked_image(tmp_path / "a.img", [os.urandom(PIECE)])
    for key in ("keep", "gone"):
        chunked.upload(tmp_path / "a.img", f"s3://{bucket}/{key}")
        _put(s3, f"s3://{bucket}/{chunked.RECORD_PREFIX}{key}", b"a record")
    s3.client().delete_object(Bucket=bucket, Key="gone")  # its record stays behind
    young = chunked.RECORD_PREFIX + "never/saved"
    grace = 3.0  # each young object below is read by gc well within it
    rep = collect_garbage(f"s3://{bucket}", grace=grace)
    assert rep.records == 2 and rep.orphan_records == 0  # younger than the grace period
    time.sleep(grace + 0.5)
    _put(s3, f"s3://{bucket}/{young}", b"a young record")
    rep = collect_garbage(f"s3://{bucket}", dry_run=True)
    assert rep.records == 3 and rep.orphan_records == 1
    assert len(_records(s3, bucket)) == 3  # a dry run deletes nothing
    rep = collect_garbage(f"s3://{bucket}")
    assert rep.manifests == 1 and rep.orphan_records == 1
    assert _records(s3, bucket) == {chunked.RECORD_PREFIX + "keep", young}
    assert "1 of deleted images" in rep.summary()


def _records(sw: Seaweed, bucket: str) -> set[str]:
    got = sw.client().list_objects_v2(Bucket=bucket, Prefix=".fixedram/working-sets/")
    return {o["Key"] for o in got.get("Contents", [])}


def test_cache_trim_spares_others_files(tmp_path: Path) -> None:
    """Trimming the chunk cache removes the least recently used chunks, never another
    process's write in progress (``.tmp-*``) or lock (``*.lock``), however old."""
    from fixedram.image.objimage import DiskCache

    cache = DiskCache(tmp_path / "cache", max_bytes=2000)
    sub = tmp_path / "cache" / "ab"
    sub.mkdir()
    for i, name in enumerate([".tmp-x1y2", "abcd.lock", "ab01", "ab02", "ab03"]):
        f = sub / name
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))  # the two others' files are the oldest
    cache.trim()
    assert sorted(f.name for f in sub.iterdir()) == [".tmp-x1y2", "ab02", "ab03",
                                                      "abcd.lock"]


# -- reading ----------------------------------------------------------------------------------


def _stored_image(s3: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str,
                  n: int, pieces: list[bytes] | None = None) -> tuple[str, list[bytes]]:
    """An image of ``n`` chunks of random pages (or of ``pieces``) stored at ``key``, and
    its pages; this process gets the store's settings (for reading it in-process)."""
    env = host(s3, tmp_path, "h")
    pages = _chunked_image(tmp_path / "a.img",
                           pieces or [os.urandom(PIECE) for _ in range(n)])
    url = f"s3://{BUCKET}/{key}"
    assert fx(env, "convert", str(tmp_path / "a.img"), url).returncode == 0
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return url, pages


def test_sequential_read_bounded_memory(s3: Seaweed, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequential read of an object image (a full restore's) returns every page and keeps
    only a few chunks in memory at its end (those read ahead and passed leave); chunks of
    random requests (a lazy restore's) stay in memory and read nothing ahead, a reader
    moving on to the next chunk does."""
    from fixedram.image.objimage import BEHIND, open_object_image
    from fixedram.image.reader import PageSlots

    n = 24
    url, pages = _stored_image(s3, tmp_path, monkeypatch, "seq", n)
    with open_object_image(url, cache=False) as img:
        meta = img.source.fetched  # the meta chunk
        slots = PageSlots(bytearray(256 * 4096), 0, 4096, 256)
        for first in range(0, n * 1024, 256):
            img.read_slots("pc.ram", first, 256, slots)
            got = slots.array[:256].tobytes()
            assert got == b"".join(pages[p] for p in range(first, first + 256))
        src = img.source
        assert len(src.mem) <= BEHIND + 1, sorted(src.mem)
        assert src.fetched == meta + n  # each chunk once: read ahead, then used
        for i in (20, 3, 11, 7, 3, 20):
            src.chunk("pc.ram", i)
        _settle(src)
        assert {("pc.ram", i) for i in (20, 3, 11, 7)} <= set(src.mem)
        # random requests read nothing ahead (each would have fetched 16 chunks)
        assert src.fetched <= meta + n + 4, src.fetched
        before = src.fetched
        src.chunk("pc.ram", 8)  # moving on from 7: read ahead again
        _settle(src)
        assert src.fetched > before + 4, (before, src.fetched)


def test_read_ahead_once(s3: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that takes each page once (a lazy restore) reads a chunk ahead at most once:
    after a sequential pass, moving on again through chunks read ahead and dropped fetches
    only the chunks asked for (a plain reader reads ahead again:
    test_sequential_read_bounded_memory). Every page still reads back as stored."""
    from fixedram.image.objimage import open_object_image

    n = 24
    url, pages = _stored_image(s3, tmp_path, monkeypatch, "once", n)
    with open_object_image(url, cache=False) as img:
        img.read_ahead_once()
        src = img.source
        meta = src.fetched
        for i in range(n):
            src.chunk("pc.ram", i)
        _settle(src)
        assert src.fetched == meta + n
        before = src.fetched
        for i in (7, 8, 9):  # moving on: nothing read ahead again
            data = src.chunk("pc.ram", i)
            assert data is not None
            assert bytes(data[:4096]) == pages[i * 1024]
        _settle(src)
        assert src.fetched == before + 3, (before, src.fetched)


def test_page_views_are_the_chunks(s3: Seaweed, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An object image gives a run of pages as views of its checked chunks, one per chunk
    the run lies in, without a copy (a multifd packet goes out from them); a chunk not
    stored (all zeros) reads as zeros; a run outside the block is refused. O_DIRECT reads,
    which it cannot do, are refused where required."""
    from fixedram.errors import FixedramError, ImageError
    from fixedram.image.objimage import open_object_image

    pieces = [os.urandom(PIECE), bytes(PIECE), os.urandom(PIECE)]
    url, pages = _stored_image(s3, tmp_path, monkeypatch, "views", 3, pieces)
    with open_object_image(url, cache=False) as img:
        assert img.holds_pages
        views = img.page_views("pc.ram", 1000, 1100)  # 24 + 1024 (zeros) + 52 pages
        assert [len(v) // 4096 for v in views] == [24, 1024, 52]
        assert b"".join(views) == b"".join(pages[p] for p in range(1000, 2100))
        chunk0 = img.source.chunk("pc.ram", 0)
        assert chunk0 is not None and views[0].obj is chunk0.obj  # the chunk's own bytes
        assert img.source.chunk("pc.ram", 1) is None  # not stored
        with pytest.raises(ImageError, match="outside block"):
            img.page_views("pc.ram", 32760, 16)
        # no local file to read with O_DIRECT: refused when required, else read as always
        with pytest.raises(FixedramError, match="no local file to read with O_DIRECT"):
            img.open_direct("required")
        assert img.open_direct(True) is False and not img.direct


def test_multifd_packets_from_chunks(s3: Seaweed, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``send_multifd`` of an object image over two channels into fixedram's own multifd
    destination: packets go out from the chunks' memory, across chunk boundaries, from a
    chunk not stored (zero pages with data bits), and with pages scattered among absent
    ones; the received image holds the same pages and verifies."""
    sys.path.insert(0, str(Path(__file__).parent))
    from synth_images import write_mapped_image

    from fixedram.endpoint.multifd_send import send_multifd
    from fixedram.endpoint.receive import receive_listening
    from fixedram.image import open_image
    from fixedram.image.objimage import open_object_image
    from fixedram.image.verify import verify_image
    from fixedram.io.channel import listen

    pages = {i: os.urandom(4096) for i in range(1, 1024)}  # chunk 0: packets 1 page off
    pages.update({i: bytes(4096) for i in range(1024, 2048)})  # chunk 1: zeros, not stored
    pages.update({i: os.urandom(4096) for i in range(2048, 3072, 2)})  # chunk 2: scattered
    src = tmp_path / "src.img"
    write_mapped_image(src, {"pc.ram": 16 << 20}, {"pc.ram": pages})
    env = host(s3, tmp_path, "h")
    url = f"s3://{BUCKET}/multifd"
    assert fx(env, "convert", str(src), url).returncode == 0
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    lst = listen(f"unix:{tmp_path}/m.sock")
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = receive_listening(lst, tmp_path / "dst.img", channels=2)
        except BaseException as e:  # reported below
            result["error"] = e

    th = threading.Thread(target=run)
    th.start()
    with open_object_image(url, cache=False) as img:
        assert img.holds_pages
        rep = send_multifd(img, lst.address, 2)
    th.join(60)
    lst.close()
    assert "error" not in result, result.get("error")
    assert rep.pages_sent == len(pages) == result["report"].pages_written
    with open_image(src) as a, open_image(tmp_path / "dst.img") as b:
        assert (a.present("pc.ram") == b.present("pc.ram")).all()
        assert a.read("pc.ram", 0, 4096) == b.read("pc.ram", 0, 4096)
    assert verify_image(tmp_path / "dst.img").status == "ok"


def _settle(src: Any) -> None:
    """Wait until a chunk source has no fetch in flight."""
    while True:
        with src.lock:
            flying = list(src.flight.values())
        if not flying:
            return
        for f in flying:
            f.result()
