"""Lazy restores of an object image (``s3://``): the working-set record kept in the store,
and a fan-out of lazy restores sharing one chunk cache. Real ``weed mini``, real QEMU (the
bare guest).

* The first lazy restore of an object image records the pages the guest asked for into
  the record object next to the manifest; ``verify`` and ``analyze`` show it; the next lazy
  restore prefetches it (fewer requests) and a paused one prefetching it is RAM-equal to
  the source. Read-only credentials: one warning line, nothing written. Four processes
  merging into one record at once leave a whole, valid record.
* A re-save under the same key makes the record stale: ignored with a warning, RAM equal.
  A damaged record object: ignored with a warning, a problem for ``verify``.
* A fan-out of lazy restores of one object image at once (3 here, 8 with ``-m fanout``),
  sharing one chunk cache: all RAM-equal, and the bytes they fetched from the store
  together stay close to the image's stored bytes (what one restore fetches).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_working_set import _dest, _same_ram

from fixedram.testing.seaweed import READ_ACCESS_KEY, READ_SECRET_KEY, TEST_BUCKET, Seaweed

pytestmark = pytest.mark.qemu

PY = str(Path(sys.executable).absolute())
RECORD_PREFIX = ".fixedram/working-sets/"


def _env(sw: Seaweed, cache: Path, **extra: str) -> dict[str, str]:
    return sw.env(FIXEDRAM_CHUNK_CACHE=str(cache), FIXEDRAM_S3_RETRY_SECONDS="3", **extra)


def _fx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "fixedram", *args], capture_output=True, text=True,
                          timeout=240, check=False, env=env)


def _lazy(env: dict[str, str], ctl: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, "-m", "fixedram", "restore", "--lazy", "--qmp", str(ctl),
                             "--json", "--no-progress", *extra, url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _done(p: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    return json.loads(out), err


def _key(url: str) -> str:
    return url.split("/", 3)[3]


def _stored_bytes(sw: Seaweed, url: str) -> int:
    """What the manifest's chunks take in the store (the meta chunk included): the bytes
    one lazy restore fetches."""
    man = json.loads(sw.client().get_object(Bucket=TEST_BUCKET, Key=_key(url))["Body"].read())
    return int(man["meta"]["stored"]) + sum(c[3] for b in man["blocks"] for c in b["chunks"])


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    import shutil

    d = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def uploaded(s3: Seaweed, qemu_image: Callable[[str], Any],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    """The bare guest's mapped-ram image, converted into the store."""
    case = qemu_image("mapped-ram")
    url = f"s3://{TEST_BUCKET}/fanout/vm"
    r = _fx(_env(s3, tmp_path_factory.mktemp("up-cache")), "convert", str(case.path), url)
    assert r.returncode == 0, r.stderr
    return case, url


def test_record_in_store_round_trip_and_stale(s3: Seaweed, uploaded: tuple[Any, str],
                                              tmp_path: Path, sockdir: Path,
                                              shm_dir: Path) -> None:
    case, src_url = uploaded
    url = f"s3://{TEST_BUCKET}/fanout/rec"
    env = _env(s3, tmp_path / "cache")
    assert _fx(env, "convert", src_url, url).returncode == 0
    rec_key = RECORD_PREFIX + _key(url)
    # the first restore learns and records into the store
    dst, ctl = _dest(case, tmp_path, sockdir, "learn")
    with dst:
        first, err = _done(_lazy(env, ctl, url))
    assert first["record"] == "recorded" and first["working_set_pages"] == 0, first
    assert first["requests"] > 0 and first["bytes_fetched"] > 0
    for cmd in ("verify", "analyze"):
        r = _fx(env, cmd, "--json", url)
        assert r.returncode == 0, r.stdout + r.stderr
        ws = json.loads(r.stdout)["working_set"]
        assert ws["status"] == "ok" and ws["pages"] > 0 and ws["restores"] == 1, ws
        assert ws["object"] == f"s3://{TEST_BUCKET}/{rec_key}"
    # the next one prefetches it: fewer requests, and the record merges a second restore
    dst, ctl = _dest(case, tmp_path, sockdir, "use")
    with dst:
        second, _ = _done(_lazy(env, ctl, url))
        assert second["status"] == "running"
    assert second["working_set_pages"] > 0 and second["pages_prefetched"] > 0, second
    assert second["requests"] < first["requests"], (first["requests"], second["requests"])
    ws = json.loads(_fx(env, "analyze", "--json", url).stdout)["working_set"]
    merged = second["record"] == "recorded"  # none when the guest asked for nothing
    assert second["record"] in ("recorded", "unchanged"), second
    assert ws["restores"] == ws["generation"] == 1 + merged, ws
    # paused, prefetching the record: RAM equal to the source
    dst, ctl = _dest(case, tmp_path, sockdir, "paused")
    with dst:
        rep, _ = _done(_lazy(env, ctl, url, "--paused"))
        assert rep["working_set_pages"] > 0 and rep["record"] == "unchanged"
        _same_ram(dst, case, shm_dir, "s3-rec")
    # a re-save under the key: the record is stale, ignored with a warning
    assert _fx(env, "convert", str(case.path), url).returncode == 0
    r = _fx(env, "verify", "--json", url)
    assert r.returncode == 0 and json.loads(r.stdout)["working_set"]["status"] == "stale"
    dst, ctl = _dest(case, tmp_path, sockdir, "stale")
    with dst:
        rep, err = _done(_lazy(env, ctl, url, "--paused"))
        assert "working-set record ignored" in err and "stale" in err, err
        assert rep["working_set_pages"] == 0 and rep["pages_prefetched"] == 0
        _same_ram(dst, case, shm_dir, "s3-stale")
    # a damaged record object: a problem for verify
    body = s3.client().get_object(Bucket=TEST_BUCKET, Key=rec_key)["Body"].read()
    s3.client().put_object(Bucket=TEST_BUCKET, Key=rec_key,
                           Body=body[:80] + b"\xee" * 8 + body[88:])
    r = _fx(env, "verify", url)
    assert r.returncode == 1 and "working-set" in r.stdout, r.stdout + r.stderr


def _fanout(sw: Seaweed, case: Any, url: str, n: int, tmp_path: Path, sockdir: Path,
            shm: Path) -> None:
    env = _env(sw, tmp_path / "shared-cache")  # one host: one cache, empty at first
    dsts = [_dest(case, tmp_path, sockdir, f"s3f{i}") for i in range(n)]
    try:
        procs = [_lazy(env, ctl, url, "--paused", "--no-record") for _, ctl in dsts]
        reps = [_done(p)[0] for p in procs]
        for i, (d, _) in enumerate(dsts):
            assert reps[i]["status"] == "paused"
            _same_ram(d, case, shm, f"s3fan{i}")
    finally:
        for d, _ in dsts:
            d.kill()
    one = _stored_bytes(sw, url)
    total = sum(r["bytes_fetched"] for r in reps)
    assert one <= total <= 1.2 * one, (total, one, [r["bytes_fetched"] for r in reps])


@pytest.mark.parametrize("n", [3, pytest.param(8, marks=pytest.mark.fanout)])
def test_fanout_shares_chunks(s3: Seaweed, uploaded: tuple[Any, str], tmp_path: Path,
                              sockdir: Path, shm_dir: Path, n: int) -> None:
    """``n`` lazy restores of one object image at once, one chunk cache: RAM-equal, and the
    bytes fetched from the store together close to the image's stored bytes."""
    case, url = uploaded
    _fanout(s3, case, url, n, tmp_path, sockdir, shm_dir)


def test_read_only_credentials_warn(s3: Seaweed, uploaded: tuple[Any, str],
                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A store that refuses the record's write (read-only credentials): ``record`` gives
    one warning line naming the record object and writes nothing; reading works."""
    from fixedram.image import workingset
    from fixedram.image.objimage import open_object_image

    _, url = uploaded
    for k, v in _env(s3, tmp_path / "cache").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READ_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READ_SECRET_KEY)
    with open_object_image(url) as img:
        assert workingset.can_record(img)
        res = workingset.record(img, workingset.Observation([("pc.ram", 0, 8, 0)], False))
    assert res.status == "skipped" and res.warning is not None
    assert "\n" not in res.warning and RECORD_PREFIX + _key(url) in res.warning, res.warning
    got = s3.client().list_objects_v2(Bucket=TEST_BUCKET, Prefix=RECORD_PREFIX + _key(url))
    assert got.get("KeyCount") == 0


_WRITER = """
import sys
from fixedram.image import workingset
from fixedram.image.objimage import open_object_image
url, seed = sys.argv[1], int(sys.argv[2])
for i in range(5):
    with open_object_image(url, cache=False) as img:
        reqs = [("pc.ram", (seed * 97 + i * 13 + k * 5) % 30000, 3, 0) for k in range(200)]
        res = workingset.record(img, workingset.Observation(reqs, False))
        assert res.status == "recorded", res
"""


def test_concurrent_writers_leave_a_valid_record(s3: Seaweed, uploaded: tuple[Any, str],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Four processes merging five records each into one object image's record at once:
    the record that stays is whole, bound to the image and names only pages of it (some
    contributions may be lost: S3 has no lock)."""
    from fixedram.image import workingset
    from fixedram.image.objimage import open_object_image

    _, src_url = uploaded
    url = f"s3://{TEST_BUCKET}/fanout/writers"
    env = _env(s3, tmp_path / "cache")
    assert _fx(env, "convert", src_url, url).returncode == 0
    procs = [subprocess.Popen([PY, "-c", _WRITER, url, str(i)], env=env, text=True,
                              stderr=subprocess.PIPE) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r = _fx(env, "verify", "--json", url)
    assert r.returncode == 0, r.stdout + r.stderr
    ws = json.loads(r.stdout)["working_set"]
    assert ws["status"] == "ok" and ws["damaged_copies"] == 0, ws
    assert 1 <= ws["restores"] <= 20 and ws["generation"] >= 1, ws
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with open_object_image(url, cache=False) as img:
        got = workingset.load(img)
    assert got.record is not None and not got.warnings
    assert len(got.record) > 0 and int(got.record.page.max()) < 32768
