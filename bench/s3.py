"""Object storage benchmark: fixedram against the S3 client library alone, in one run.

One ``weed mini`` server (SeaweedFS, on loopback, started here and killed afterwards, as
the tests do) holds everything. A Linux test guest (``--mem`` of RAM, ``--data-mib`` MiB
of random data in tmpfs plus ``--dirty-mib`` MiB the workload keeps rewriting) is saved,
restored and saved again; every figure is from this run on this machine:

* **save**: ``fixedram save --via proxy s3://…`` (the guest paused, its RAM staged and
  uploaded) against a PUT of the same bytes (the image's data chunks, read into memory
  first) with the client library alone, ``WORKERS`` requests in flight, by obstore and
  by boto3. Ratio: the client's time over fixedram's (goal >= 0.8).
* **restore**: ``fixedram restore --via proxy s3://…`` into a fresh QEMU (cold chunk
  cache, until the guest runs; two multifd channels, the default, and one stream,
  ``--channels 0``, their order reversed every other round) against parallel GETs of the same
  objects (the chunks the manifest names). Goal >= 0.8. The client library's time counts
  neither Python's start-up nor its imports; the same restore, and fixedram's read of the
  image (``send s3://… >/dev/null``), also run through a resident server (``fixedram
  serve``, docs/resident-server.md, started here on a private socket), which takes them
  out of fixedram's time too.
* **re-save**: the guest runs until its workload has rewritten its dirty region (the
  changed share of RAM is counted page by page between two local saves), then is saved to
  the same key again: bytes uploaded against the first save's (goal <= 10 %).
* **lazy**: ``fixedram restore --lazy`` time to running from S3 (cold cache) and from a
  local image.
* **CPU**: user + system seconds of the fixedram process per GiB of guest data; and per
  read of the image, the CPU seconds of the S3 server process, of the client (fixedram, or
  the client library alone) and of the destination QEMU (its load), each from its own
  process in the same run. Their sum over the cores gives the shortest restore the host
  allows: the server's and the client library's work for the GETs and QEMU's load cannot
  be avoided by any restore, and the ratio of the GETs alone to that bound is the best a
  restore could reach here.
* **zstd**: level 1 on this guest's data chunks: size kept and CPU per GiB, what the
  upload decided per chunk.

Run as root, free page reporting is held off for the run and ``--warm-gib`` of free memory
touched first (``bench.common.steady_memory``; ``--keep-page-reporting`` leaves it on).
Usage::

    nice -n 10 .venv/bin/python -m bench.s3                 # 1 GiB guest, 512 MiB data
    nice -n 10 .venv/bin/python -m bench.s3 --mem 512M --data-mib 128 --dirty-mib 24   # quick

Writes ``bench/results/s3-<stamp>.json`` and ``.md`` (the markdown table, as the README
shows it) and prints the table; ``--table RESULTS.json`` prints it again from a results
file. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FIXEDRAM,
    ResidentServer,
    add_memory_args,
    command_env,
    compile_package,
    cpu_seconds,
    describe_memory,
    memory_of,
)
from fixedram.image import open_image
from fixedram.image.chunked import CHUNK_SIZE, WORKERS, chunk_name
from fixedram.image.layout import PAGE_SIZE
from fixedram.testing.guest.linux import build_linux_guest, linux_append
from fixedram.testing.seaweed import Seaweed
from fixedram.testing.vm import Guest, choose_accel, find_qemu, parse_mem_size

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench"
GIB = 1 << 30
MIB = 1 << 20


# -- running fixedram ----------------------------------------------------------------------


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process."""
    return {k: cpu_seconds(p) for k, p in pids.items()}


def cpu_since(before: dict[str, float], pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds each named process spent since :func:`cpu_of` gave ``before``."""
    return {k: cpu_seconds(p) - before[k] for k, p in pids.items()}


def run(args: list[str], env: dict[str, str], watch: Guest | None = None,
        discard: bool = False, others: dict[str, int] | None = None,
        server: ResidentServer | None = None) -> dict[str, Any]:
    """Run ``fixedram ARGS``: wall seconds, CPU seconds (user + system, the child's own),
    its JSON report, and with ``watch`` the time until that guest runs (polled on the
    harness's QMP monitor every 2 ms, as bench/lazy.py does); ``discard``: its standard
    output goes to /dev/null; ``others``: processes (name: pid) whose CPU seconds
    meanwhile go into ``cpu_of`` (with ``watch``: until that guest runs, as
    ``time_to_running``; the guest's own running is not QEMU's load). ``server``: a resident
    server the command goes through; its CPU seconds then add the server's and the command
    child's."""
    others = others or {}
    env = command_env(env, server)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        c0 = cpu_of(others)
        s0 = server.cpu() if server is not None else 0.0
        t = time.monotonic()
        p = subprocess.Popen([*FIXEDRAM, *args], stdout=subprocess.DEVNULL if discard else out,
                             stderr=err, env=env)
        ttr = spent = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if watch is not None and ttr is None and watch.status() == "running":
                ttr = time.monotonic() - t
                spent = cpu_since(c0, others)
            time.sleep(0.002)
        wall = time.monotonic() - t
        if spent is None:
            spent = cpu_since(c0, others)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode:
            raise RuntimeError(f"fixedram {shlex.join(args)} failed: "
                               f"{err.read().decode(errors='replace').strip()}")
        return {"wall": wall,
                "cpu": ru.ru_utime + ru.ru_stime + (server.cpu() - s0 if server else 0.0),
                "time_to_running": ttr if ttr is not None else wall, "cpu_of": spent,
                "report": json.loads(out.read()) if "--json" in args else {}}


# -- the client library alone (run in a child process: its own CPU figure) ----------------


def _client(lib: str) -> tuple[Callable[[str, bytes], None], Callable[[str], int]]:
    """put(key, body) and get(key) -> bytes read, by ``lib``, from the environment."""
    env = os.environ
    endpoint, region = env["AWS_ENDPOINT_URL"], env.get("AWS_DEFAULT_REGION", "us-east-1")
    key_id, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    if lib == "obstore":
        import obstore
        from obstore.store import S3Store

        # PUT bodies checked the way fixedram's are (unsigned, CRC64-NVME header:
        # fixedram.io.objstore), so that both do the same work per byte
        store = S3Store(BUCKET, endpoint=endpoint, region=region, access_key_id=key_id,
                        secret_access_key=secret, virtual_hosted_style_request=False,
                        unsigned_payload=True, checksum_algorithm="crc64nvme",
                        client_options={"allow_http": True})
        return (lambda k, b: obstore.put(store, k, b),
                lambda k: len(obstore.get(store, k).bytes()))
    import boto3
    from botocore.config import Config

    c = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                     aws_access_key_id=key_id, aws_secret_access_key=secret,
                     config=Config(max_pool_connections=2 * WORKERS))
    return (lambda k, b: c.put_object(Bucket=BUCKET, Key=k, Body=b),
            lambda k: len(c.get_object(Bucket=BUCKET, Key=k)["Body"].read()))


def client_main(argv: list[str]) -> None:
    """``client put LIB IMAGE PREFIX`` or ``client get LIB KEYS_FILE``: one JSON line with
    the wall and CPU seconds of the transfer alone (the data is read beforehand)."""
    op, lib, *rest = argv
    put, get = _client(lib)
    if op == "put":
        bodies = data_chunks(Path(rest[0]))

        def put_one(i: int, b: bytes) -> int:
            put(f"{rest[1]}{i}", b)
            return len(b)

        jobs: list[Callable[[], int]] = [
            (lambda i=i, b=b: put_one(i, b)) for i, b in enumerate(bodies)]
    else:
        jobs = [(lambda k=k: get(k)) for k in Path(rest[0]).read_text().split()]
    ru0, t = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        moved = sum(pool.map(lambda f: f(), jobs))
    wall, ru = time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
    print(json.dumps({"wall": wall, "cpu": cpu, "bytes": moved, "objects": len(jobs)}))


def run_client(args: list[str], env: dict[str, str],
               others: dict[str, int] | None = None) -> dict[str, Any]:
    """:func:`client_main` in a child process; ``others`` as for :func:`run` (their CPU
    seconds over the child's whole run, start-up and reading the data included: a few
    hundredths of the server's, which idles meanwhile)."""
    others = others or {}
    c0 = cpu_of(others)
    r = subprocess.run([sys.executable, "-m", "bench.s3", "client", *args], env=env,
                       capture_output=True, text=True, check=False, cwd=ROOT)
    spent = cpu_since(c0, others)
    if r.returncode:
        raise RuntimeError(f"client {args[:2]} failed: {r.stderr.strip()[-500:]}")
    return {**json.loads(r.stdout), "cpu_of": spent}


def data_pieces(path: Path, size: int) -> Iterator[bytearray]:
    """The image's pieces of ``size`` bytes (block by block) that hold data, as fixedram
    cuts its chunks (zero pieces left out)."""
    per = size // PAGE_SIZE
    with open_image(path) as img:
        for name, blk in img.blocks.items():
            for first in range(0, blk.npages, per):
                data = img.read(name, first, min(per, blk.npages - first))
                if np.frombuffer(data, np.uint8).any():
                    yield data


def data_chunks(path: Path) -> list[bytes]:
    """The image's chunks holding data, as fixedram cuts them (zero chunks left out)."""
    return [bytes(d) for d in data_pieces(path, CHUNK_SIZE)]


# -- measurements on the images ------------------------------------------------------------


def changed_pages(a: Path, b: Path) -> tuple[int, int]:
    """Pages that differ between two images of one guest, and the guest's pages."""
    per = 16384  # 64 MiB at a time
    diff = total = 0
    with open_image(a) as ia, open_image(b) as ib:
        for name, blk in ia.blocks.items():
            total += blk.npages
            for first in range(0, blk.npages, per):
                n = min(per, blk.npages - first)
                x = np.frombuffer(ia.read(name, first, n), np.uint8).reshape(n, PAGE_SIZE)
                y = np.frombuffer(ib.read(name, first, n), np.uint8).reshape(n, PAGE_SIZE)
                diff += int(np.count_nonzero((x != y).any(axis=1)))
    return diff, total


def resave_by_chunk_size(a: Path, b: Path, sizes: list[int]) -> dict[int, list[int]]:
    """For each chunk size: ``[bytes a re-save of b after a uploads, bytes of a's data
    chunks]`` (uncompressed), i.e. the chunks of ``b`` holding data that ``a`` has not."""
    out = {}
    for size in sizes:
        have: set[str] = set()
        first = 0
        for data in data_pieces(a, size):
            have.add(chunk_name(data))
            first += len(data)
        again = sum(len(d) for d in data_pieces(b, size) if chunk_name(d) not in have)
        out[size] = [again, first]
    return out


def zstd_on(chunks: list[bytes]) -> dict[str, Any]:
    """zstd on each chunk: bytes in and out and CPU seconds of compressing every chunk;
    then the upload's own choice (:func:`encode_chunk`: chunks kept compressed, bytes
    saved, CPU seconds); and the CPU seconds of hashing them."""
    import zstandard

    from fixedram.image.chunked import ZSTD_LEVEL, encode_chunk

    z = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    c0 = time.process_time()
    sizes = [len(z.compress(c)) for c in chunks]
    cpu = time.process_time() - c0
    c0 = time.process_time()
    chosen = [encode_chunk(memoryview(c)) for c in chunks]
    chosen_cpu = time.process_time() - c0
    c0 = time.process_time()
    for c in chunks:
        chunk_name(c)
    hash_cpu = time.process_time() - c0
    kept = [(len(b), len(c)) for (codec, b), c in zip(chosen, chunks, strict=True)
            if codec == "zstd"]
    return {"bytes": sum(map(len, chunks)), "compressed": sum(sizes), "cpu": cpu,
            "chosen_cpu": chosen_cpu, "hash_cpu": hash_cpu, "chunks": len(chunks),
            "kept": len(kept), "kept_saving": sum(n - s for s, n in kept)}


# -- the run -------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    qemu = find_qemu("10")
    lx = build_linux_guest()
    accel = choose_accel(qemu)
    work = Path(tempfile.mkdtemp(prefix="fixedram-bench-s3-", dir=args.dir))
    socks = Path(tempfile.mkdtemp(prefix="frs3-", dir="/tmp"))
    res: dict[str, Any] = {"host": platform.node(), "qemu": qemu.version_str, "accel": accel,
                           "mem": args.mem, "data_mib": args.data_mib,
                           "dirty_mib": args.dirty_mib, "workers": WORKERS,
                           "chunk_size": CHUNK_SIZE, "load_before": os.getloadavg(),
                           "cores": os.cpu_count(),
                           "command": " ".join([*(["nice", "-n", str(os.nice(0))]
                                                  if os.nice(0) else []),
                                                ".venv/bin/python -m bench.s3",
                                                shlex.join(sys.argv[1:])]).strip()}
    sw = Seaweed(work / "weed")
    src: Guest | None = None
    resident: ResidentServer | None = None
    try:
        sw.start()
        # a resident server (docs/resident-server.md) for the same read and restore without
        # Python's start-up and imports: the client library's figures have none either
        resident = ResidentServer()
        assert sw.proc is not None
        server = {"server": sw.proc.pid}
        import boto3

        e = sw.env()
        boto3.client("s3", endpoint_url=sw.endpoint, region_name="us-east-1",
                     aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"]
                     ).create_bucket(Bucket=BUCKET)
        (work / "stage").mkdir()
        caches = iter(range(1000))

        def env() -> dict[str, str]:
            """A client's environment: a chunk cache of its own (cold)."""
            return sw.env(FIXEDRAM_STAGING=str(work / "stage"),
                          FIXEDRAM_CHUNK_CACHE=str(work / f"cache{next(caches)}"))

        url = f"s3://{BUCKET}/guests/vm"
        img1, img2 = work / "save1.img", work / "save2.img"
        ctl = socks / "src.qmp"
        src = Guest(qemu, work, name="src", mem=args.mem, accel=accel, kernel=lx.kernel,
                    initrd=lx.initrd, qmp_timeout=300,
                    append=linux_append(data=args.data_mib, mib=args.dirty_mib, rate=0,
                                        hb=500),
                    extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
        src.start()
        print("# booting the guest and filling its data ...", file=sys.stderr, flush=True)
        src.wait_heartbeat(gen_at_least=2, timeout=600)
        save = ["save", "--qmp", str(ctl), "--via", "proxy", "--json", "--no-progress"]
        print("# save to S3 ...", file=sys.stderr, flush=True)
        res["save_s3"] = run([*save, url], env())
        run(["convert", url, str(img1)], env())  # the same image, local
        chunks = data_chunks(img1)
        res["data_bytes"] = sum(map(len, chunks))
        res["zstd"] = zstd_on(chunks)
        del chunks
        for lib in ("obstore", "boto3"):
            print(f"# upload by {lib} alone ...", file=sys.stderr, flush=True)
            res[f"put_{lib}"] = run_client(["put", lib, str(img1), f"alone-{lib}/"], env())
        man = _manifest(url, env())
        keys = work / "keys"
        keys.write_text("\n".join(
            [".fixedram/chunks/" + man["meta"]["name"]
             + (".zst" if man["meta"]["codec"] == "zstd" else "")]
            + [f".fixedram/chunks/{n}" + (".zst" if c == "zstd" else "")
               for b in man["blocks"] for _, n, c, _ in b["chunks"]]))

        def restore(extra: list[str], image: str, name: str,
                    through: ResidentServer | None = None,
                    ) -> dict[str, Any]:
            dst = Guest.like(src, name=name, incoming=True)  # type: ignore[arg-type]
            dctl = socks / f"{name}.qmp"
            dst.extra_args = ("-qmp", f"unix:{dctl},server=on,wait=off")
            with dst:
                assert dst.pid is not None
                r = run(["restore", "--qmp", str(dctl), "--json", "--no-progress", *extra,
                         image], env(), watch=dst, others={**server, "qemu": dst.pid},
                        server=through)
                dst.wait_heartbeat(after=src.heartbeats()[-1].n, timeout=120)  # type: ignore[union-attr]
            return r

        for i in range(args.repeat):
            print(f"# restores, round {i + 1} ...", file=sys.stderr, flush=True)
            # the full restores from S3 take turns going first (the order reversed every
            # other round): with free page reporting on, the first restore after a while
            # pays more for QEMU's first touches of memory on this host
            s3_full = [("restore_s3", ["--via", "proxy"], url),
                       ("restore_s3_one", ["--via", "proxy", "--channels", "0"], url),
                       ("restore_s3_server", ["--via", "proxy"], url)]
            for key, extra, image in (*(s3_full[::-1] if i % 2 else s3_full),
                                      ("restore_local", ["--via", "proxy"], str(img1)),
                                      ("lazy_s3", ["--lazy"], url),
                                      ("lazy_local", ["--lazy"], str(img1))):
                got = restore(extra, image, f"dst-{key}-{i}",
                              resident if key.endswith("_server") else None)
                want = {"restore_s3": 2, "restore_s3_one": 0, "restore_s3_server": 2}.get(key)
                if want is not None and got["report"].get("channels") != want:
                    raise RuntimeError(f"{key}: restored over {got['report'].get('channels')} "
                                       f"channels, not {want} (can QEMU reach the socket?)")
                res.setdefault(key, []).append(got)
            for lib in ("obstore", "boto3"):
                res.setdefault(f"get_{lib}", []).append(
                    run_client(["get", lib, str(keys)], env(), server))
            res.setdefault("send_s3", []).append(run(["send", url], env(), discard=True,
                                                     others=server))
            res.setdefault("send_s3_server", []).append(
                run(["send", url], env(), discard=True, others=server, server=resident))
        print("# the guest runs on, then the re-save ...", file=sys.stderr, flush=True)
        gen = src.heartbeats()[-1].gen
        src.cont()
        src.wait_heartbeat(gen_at_least=gen + 2, timeout=300)
        res["resave_s3"] = run([*save, url], env())
        run(["convert", url, str(img2)], env())
        res["changed_pages"], res["guest_pages"] = changed_pages(img1, img2)
        res["resave_by_chunk_size"] = resave_by_chunk_size(img1, img2, [1 << 20, 2 << 20,
                                                                        4 << 20])
    finally:
        if src is not None:
            src.kill()
        try:
            if resident is not None:
                resident.close()
        finally:
            sw.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(socks, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    return res


def _manifest(url: str, env: dict[str, str]) -> dict[str, Any]:
    """The manifest document of ``url``."""
    bucket, key = url[5:].split("/", 1)
    r = subprocess.run([sys.executable, "-m", "bench.s3", "client", "manifest", bucket, key],
                       env=env, capture_output=True, check=True, cwd=ROOT)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


# -- the table -----------------------------------------------------------------------------


def table(r: dict[str, Any]) -> str:
    """The results as the README's markdown table."""
    med = statistics.median
    gib = r["data_bytes"] / GIB

    def m(key: str, field: str) -> float:
        v = r[key]
        return float(med([x[field] for x in v]) if isinstance(v, list) else v[field])

    def of(key: str, proc: str) -> float:
        """Median CPU seconds of process ``proc`` during the runs of ``key``."""
        return float(med([x["cpu_of"][proc] for x in r[key]]))

    def rate(sec: float) -> str:
        return f"{sec:.2f} s ({r['data_bytes'] / MIB / sec:.0f} MiB/s)"

    up1, up2 = r["save_s3"]["report"]["upload"], r["resave_s3"]["report"]["upload"]
    z = r["zstd"]
    save_s, put_o, put_b = m("save_s3", "wall"), m("put_obstore", "wall"), m("put_boto3", "wall")
    rst_s, get_o, get_b = m("restore_s3", "wall"), m("get_obstore", "wall"), m("get_boto3", "wall")
    snd_s = m("send_s3", "wall")
    by_size = ", ".join(f"{int(k) >> 20} MiB: {100 * v[0] / v[1]:.1f} %"
                        for k, v in r["resave_by_chunk_size"].items())
    rows = [
        ("save to S3 (pause, stage, upload)", rate(save_s),
         f"obstore PUTs {rate(put_o)}; boto3 {rate(put_b)}",
         f"{put_o / save_s:.2f}x", ">= 0.8x"),
        ("&nbsp;&nbsp;of which: until the staging file is complete / the upload left then",
         f"{save_s - up1['seconds']:.2f} s / {up1['seconds']:.2f} s"
         + (f" ({up1['early']} of {up1['chunks']} chunks uploaded during the first)"
            if up1.get("early") else ""), "", "", ""),
        ("restore from S3 (proxy, 2 channels: the default; cold cache, to running)",
         rate(rst_s),
         f"obstore GETs {rate(get_o)}; boto3 {rate(get_b)}",
         f"{get_o / rst_s:.2f}x", ">= 0.8x"),
        *([("&nbsp;&nbsp;the same restore as one stream (`--channels 0`)",
            rate(m("restore_s3_one", "wall")), "", f"{get_o / m('restore_s3_one', 'wall'):.2f}x",
            "")] if "restore_s3_one" in r else []),
        *([("&nbsp;&nbsp;the same restore through a resident server (`fixedram serve`)",
            rate(m("restore_s3_server", "wall")), "",
            f"{get_o / m('restore_s3_server', 'wall'):.2f}x", "")]
          if "restore_s3_server" in r else []),
        ("&nbsp;&nbsp;restore from a local image (proxy)", f"{m('restore_local', 'wall'):.2f} s",
         "", f"S3: {m('restore_local', 'wall') / rst_s:.2f}x of local", ""),
        ("fixedram's read of the image: `send s3://… >/dev/null`", rate(snd_s),
         f"obstore GETs {rate(get_o)}", f"{get_o / snd_s:.2f}x", ">= 0.8x"),
        *([("&nbsp;&nbsp;the same read through a resident server",
            rate(m("send_s3_server", "wall")), "",
            f"{get_o / m('send_s3_server', 'wall'):.2f}x", "")]
          if "send_s3_server" in r else []),
        (f"re-save after {100 * r['changed_pages'] / r['guest_pages']:.1f} % of RAM changed",
         f"{up2['uploaded_bytes'] / MIB:.1f} MiB uploaded ({up2['uploaded']} chunks, "
         f"{up2['reused']} reused)", f"first save: {up1['uploaded_bytes'] / MIB:.1f} MiB",
         f"{100 * up2['uploaded_bytes'] / max(1, up1['uploaded_bytes']):.1f} %", "<= 10 %"),
        ("&nbsp;&nbsp;re-save's data by chunk size (uncompressed)", by_size, "", "", ""),
        ("lazy restore, time to running: S3 / local",
         f"{m('lazy_s3', 'time_to_running'):.2f} s / {m('lazy_local', 'time_to_running'):.2f} s",
         f"all pages in: {m('lazy_s3', 'wall'):.2f} s / {m('lazy_local', 'wall'):.2f} s", "", ""),
        ("fixedram CPU per GiB of data: save / restore (S3); restore (local)",
         f"{m('save_s3', 'cpu') / gib:.2f} s / {m('restore_s3', 'cpu') / gib:.2f} s; "
         f"{m('restore_local', 'cpu') / gib:.2f} s",
         f"obstore {m('put_obstore', 'cpu') / gib:.2f} s / {m('get_obstore', 'cpu') / gib:.2f} s;"
         f" boto3 {m('put_boto3', 'cpu') / gib:.2f} s / {m('get_boto3', 'cpu') / gib:.2f} s",
         "", ""),
        *(_bound_rows(r, of, m) if "cpu_of" in r["get_obstore"][0] else []),
        ("zstd -1 where it pays (sampled first)",
         f"{z['kept']} of {z['chunks']} chunks kept compressed, "
         f"{z['kept_saving'] / MIB:.1f} MiB saved, "
         f"{z['chosen_cpu'] / (z['bytes'] / GIB):.2f} CPU-s/GiB",
         f"every chunk compressed: {z['compressed'] / z['bytes']:.2f} of the size, "
         f"{z['cpu'] / (z['bytes'] / GIB):.2f} CPU-s/GiB; xxh3: "
         f"{z['hash_cpu'] / (z['bytes'] / GIB):.2f} CPU-s/GiB", "", ""),
    ]
    head = (f"QEMU {r['qemu']} ({r['accel']}), Linux guest of {r['mem']} holding "
            f"{r['data_bytes'] / MIB:.0f} MiB of data ({r['data_mib']} MiB random), one "
            f"`weed mini` on loopback, {r['workers']} requests in flight, "
            f"{r['chunk_size'] >> 20} MiB chunks; load average "
            f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after "
            "(2 cores, shared)"
            + f"; {describe_memory(r.get('memory'))}"
            + (f"; medians of {len(r['restore_s3'])} restores."
               if len(r["restore_s3"]) > 1 else "."))
    lines = [head, "", "| | fixedram | client library alone | ratio | goal |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", f"`{r['command'].strip()}`"]
    return "\n".join(lines)


def _bound_rows(r: dict[str, Any], of: Callable[[str, str], float],
                m: Callable[[str, str], float]) -> list[tuple[str, ...]]:
    """The rows of where a restore's CPU goes and the shortest restore it allows: the S3
    server's and the client library's CPU for the GETs alone, plus QEMU's CPU for the load
    (from the restores from S3: QEMU until the guest runs), over the host's cores; at least
    QEMU's load alone (one thread)."""
    cores = r.get("cores") or 2
    get_o, srv, cli = m("get_obstore", "wall"), of("get_obstore", "server"), m("get_obstore", "cpu")
    qemu = of("restore_s3", "qemu")
    bound = max((srv + cli + qemu) / cores, qemu)
    return [
        ("CPU-s per read of the image: S3 server / client / destination QEMU",
         f"restore: {of('restore_s3', 'server'):.2f} / {m('restore_s3', 'cpu'):.2f} / "
         f"{qemu:.2f} in {m('restore_s3', 'wall'):.2f} s; send: {of('send_s3', 'server'):.2f}"
         f" / {m('send_s3', 'cpu'):.2f} in {m('send_s3', 'wall'):.2f} s; local restore: "
         f"QEMU {of('restore_local', 'qemu'):.2f}",
         f"obstore GETs: {srv:.2f} / {cli:.2f} in {get_o:.2f} s: "
         f"{(srv + cli) / get_o:.2f} of {cores} cores busy", "", ""),
        (f"shortest restore {cores} cores allow: (server + client library for the GETs"
         " + QEMU's load) CPU-s / cores",
         f"{bound:.2f} s ({srv:.2f} + {cli:.2f} + {qemu:.2f}) / {cores}",
         f"obstore GETs {get_o:.2f} s", f"{min(1.0, get_o / bound):.2f}x at best", ">= 0.8x"),
    ]


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        if sys.argv[2] == "manifest":
            from fixedram.io.objstore import Store

            print(bytes(Store(sys.argv[3]).get(sys.argv[4])).decode())
            return
        client_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", default="1G", help="guest RAM (default 1G)")
    ap.add_argument("--data-mib", type=int, default=512,
                    help="MiB of random data the guest keeps (default 512)")
    ap.add_argument("--dirty-mib", type=int, default=48,
                    help="MiB the guest rewrites between the saves (default 48, ~5%% of 1G)")
    ap.add_argument("--repeat", type=int, default=1, help="restores of each kind (median)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the server's data, images and staging go (default /var/tmp)")
    add_memory_args(ap, 8.0)
    ap.add_argument("--table", metavar="RESULTS.json", type=Path,
                    help="only print the table of an earlier run's results")
    args = ap.parse_args()
    compile_package()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    parse_mem_size(args.mem)
    with memory_of(args) as memory:
        print(f"# memory: {memory}", file=sys.stderr, flush=True)
        r = bench(args)
    r["memory"] = memory
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ROOT / "bench" / "results" / f"s3-{stamp}"
    dest.parent.mkdir(exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(r, indent=2))
    md = table(r)
    dest.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\nresults: {dest}.json, {dest}.md")


if __name__ == "__main__":
    main()
