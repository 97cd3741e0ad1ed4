"""An S3 object-store client: ``s3://bucket/key`` locations, whole and ranged GETs, PUTs,
HEAD, listings and deletes, with failures as one-line :class:`~fixedram.errors.StoreError`.

The transport is ``obstore`` (Python bindings of the Rust ``object_store`` crate), chosen
over boto3 by measurement (``bench/s3.py``, ``docs/object-storage.md``): for the same
4 MiB PUTs and GETs it was as fast or faster and spent about a third of boto3's CPU on
PUTs and half on GETs, which matters where uploads are CPU-bound. It also imports in
milliseconds, which a command's start-up feels.

Where a store is and who we are come from the standard places, in this order:

* endpoint: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` (the command line's ``--endpoint``
  sets the latter), else the profile's ``endpoint_url``, else AWS;
* credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``),
  else botocore's resolution (``AWS_PROFILE``, ``~/.aws/credentials`` and ``config``,
  SSO, instance roles) where botocore is installed;
* region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's, else ``us-east-1``.

A PUT's body is not signed (``UNSIGNED-PAYLOAD``): it carries its CRC64-NVME instead,
which the server checks before it stores the object (a mismatch is refused). Signing it
would hash every byte with SHA-256, which took about 1 CPU-second per GiB here against
0.4 for the CRC (``docs/object-storage.md``); ``FIXEDRAM_S3_CHECKSUM=sha256`` signs
bodies instead, for a server that does not know that checksum.

Requests that fail for transport reasons (server unreachable, reset, 5xx) are retried
with backoff for up to :data:`RETRY_SECONDS` (``FIXEDRAM_S3_RETRY_SECONDS`` overrides):
a server that restarts within that time is not noticed beyond the delay.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from fixedram.errors import StoreError

__all__ = ["ObjectURL", "Store", "ObjectInfo", "parse_url", "is_object_url", "RETRY_SECONDS",
           "RESERVED"]

#: How long a request is retried on transport errors before it fails (seconds).
RETRY_SECONDS = 20.0

#: How a PUT's body is checked by the server (``FIXEDRAM_S3_CHECKSUM`` overrides):
#: ``crc64nvme`` (unsigned body, CRC64-NVME header) or ``sha256`` (signed body).
CHECKSUMS = ("crc64nvme", "sha256")

#: The key prefix of fixedram's own objects in a bucket (no image may live under it).
RESERVED = ".fixedram/"

_URL = re.compile(r"s3://([^/]+)(?:/(.*))?\Z", re.S)


@dataclass(frozen=True)
class ObjectURL:
    """``s3://bucket/key``."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_object_url(text: object) -> bool:
    """Whether ``text`` names an object (``s3://…``) rather than a local file."""
    return isinstance(text, str) and text.startswith("s3://")


def parse_url(text: str, *, key: bool = True) -> ObjectURL:
    """``s3://bucket/key`` -> :class:`ObjectURL`; :class:`StoreError` when malformed
    (``key=False``: the key may be empty, as in ``s3://bucket`` or ``s3://bucket/prefix/``).
    An image's key (``key=True``) may not be under :data:`RESERVED`, fixedram's own objects
    (chunks, settings), where gc would not look for it."""
    m = _URL.match(text)
    if not m or (key and not m[2]) or (m[2] or "").startswith("/"):
        raise StoreError(f"bad object location {text!r}: expected s3://BUCKET/KEY")
    if key and m[2].startswith(RESERVED):
        raise StoreError(f"{text}: keys under {RESERVED} are fixedram's own (chunks, "
                         "settings), not for images: choose another key")
    return ObjectURL(m[1], m[2] or "")


@dataclass(frozen=True)
class ObjectInfo:
    """An object as a listing or HEAD shows it."""

    key: str
    size: int
    modified: datetime


def _env(name: str) -> str | None:
    """An environment variable, an empty (or blank) one counting as unset."""
    v = os.environ.get(name, "").strip()
    return v or None


def _check_endpoint(url: str, source: str) -> str:
    """``url`` if it is a usable S3 endpoint (``http(s)://HOST[:PORT][/PATH]``), else a
    one-line StoreError naming where it came from."""
    bad = StoreError(f"bad S3 endpoint {url!r} (from {source}): expected "
                     "http://HOST[:PORT] or https://HOST[:PORT]")
    try:
        u = urlsplit(url)
        port = u.port  # ValueError when out of range or not a number
    except ValueError:
        raise bad from None
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment \
            or port == 0 or any(c.isspace() for c in url):
        raise bad
    return url


def _resolve() -> dict[str, Any]:
    """Endpoint, credentials and region from the environment, else from botocore. Empty
    variables count as unset; an endpoint that is not an http(s) URL, or credentials
    botocore cannot resolve, are a one-line StoreError."""
    cfg: dict[str, Any] = {}
    endpoint, source = None, ""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        endpoint = _env(var)
        if endpoint:
            source = var
            break
    region = _env("AWS_REGION") or _env("AWS_DEFAULT_REGION")
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    token = _env("AWS_SESSION_TOKEN")
    if bool(key) != bool(secret):
        raise StoreError("partial S3 credentials: AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY must both be set (or neither, for a profile)")
    if not (key and secret) or not endpoint or not region:
        try:
            import botocore.exceptions
            import botocore.session  # profiles, config files, SSO, instance roles
        except ImportError:
            pass
        else:
            try:
                sess = botocore.session.get_session()
                if not (key and secret):
                    creds = sess.get_credentials()
                    if creds is not None:
                        frozen = creds.get_frozen_credentials()
                        key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
                region = region or sess.get_config_variable("region")
            except botocore.exceptions.BotoCoreError as e:
                raise StoreError(f"S3 credentials: {_first_line(e)}") from None
            if not endpoint:
                try:
                    endpoint = sess.get_scoped_config().get("endpoint_url") or None
                    source = "the AWS profile's endpoint_url"
                except Exception:  # a missing profile is reported by the request itself
                    endpoint = None
    if not (key and secret):
        raise StoreError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "or AWS_PROFILE")
    region = region or "us-east-1"
    cfg.update(access_key_id=key, secret_access_key=secret, region=region)
    if token:
        cfg["token"] = token
    if endpoint:
        cfg["endpoint"] = _check_endpoint(endpoint, source)
        cfg["virtual_hosted_style_request"] = False
    else:  # AWS itself, said explicitly: obstore's own reading of the environment would
        # otherwise take an empty AWS_ENDPOINT_URL(_S3) as the endpoint
        cfg["endpoint"] = f"https://s3.{region}.amazonaws.com"
    # obstore's service-specific endpoint setting wins over "endpoint" and is read from
    # AWS_ENDPOINT_URL_S3 by obstore itself: set to the endpoint resolved here
    cfg["aws_endpoint_url_s3"] = cfg["endpoint"]
    return cfg


def _body_checksum() -> dict[str, Any]:
    """obstore settings of how a PUT body is checked (FIXEDRAM_S3_CHECKSUM)."""
    v = (_env("FIXEDRAM_S3_CHECKSUM") or CHECKSUMS[0]).lower()
    if v == "crc64nvme":
        return {"unsigned_payload": True, "checksum_algorithm": "crc64nvme"}
    if v == "sha256":
        return {"unsigned_payload": False}
    raise StoreError(f"FIXEDRAM_S3_CHECKSUM={v!r}: expected one of {', '.join(CHECKSUMS)}")


def _retry_seconds() -> float:
    """FIXEDRAM_S3_RETRY_SECONDS (unset or empty: :data:`RETRY_SECONDS`); StoreError when
    it is not a number of seconds >= 0."""
    v = _env("FIXEDRAM_S3_RETRY_SECONDS")
    if v is None:
        return RETRY_SECONDS
    try:
        secs = float(v)
    except ValueError:
        secs = -1.0
    if not 0 <= secs < 1e9:
        raise StoreError(f"FIXEDRAM_S3_RETRY_SECONDS={v!r}: expected a number of seconds "
                         ">= 0")
    return secs


class Store:
    """One bucket of an S3 store. Methods are safe to call from several threads at once
    (obstore releases the GIL while a request is in flight)."""

    def __init__(self, bucket: str) -> None:
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError:
            raise StoreError("s3:// images need the obstore package: pip install "
                             "'fixedram[s3]'") from None
        self._ob = obstore
        self.bucket = bucket
        cfg = _resolve() | _body_checksum()
        self.endpoint = cfg["endpoint"]
        secs = self.retry_seconds = _retry_seconds()
        try:
            self._store = S3Store(
                bucket, **cfg,
                client_options={"allow_http": True, "connect_timeout": timedelta(seconds=5),
                                "timeout": timedelta(seconds=120)},
                retry_config={"max_retries": 30, "retry_timeout": timedelta(seconds=secs),
                              "backoff": {"init_backoff": timedelta(milliseconds=100),
                                          "max_backoff": timedelta(seconds=2), "base": 2}})
        except BaseException as e:
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise StoreError(f"S3 bucket {bucket}: {_first_line(e)}") from None

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _fail(self, e: BaseException, key: str, doing: str) -> StoreError:
        """The one-line error of a failed request. A Rust panic inside obstore (it
        derives from BaseException, and an input the checks here missed could cause
        one) is a failed request too; KeyboardInterrupt and the like go on as they are."""
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise e
        return StoreError(describe_error(e, self.where(key), doing, self.endpoint,
                                         self.retry_seconds))

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str) -> memoryview:
        """The whole object ``key``."""
        try:
            return memoryview(self._ob.get(self._store, key).bytes())
        except BaseException as e:
            raise self._fail(e, key, "read") from None

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of object ``key``."""
        try:
            return memoryview(self._ob.get_range(self._store, key, start=start, end=end))
        except BaseException as e:
            raise self._fail(e, key, "read") from None

    def head(self, key: str) -> ObjectInfo | None:
        """Size and modification time of ``key``; None when there is no such object."""
        try:
            m = self._ob.head(self._store, key)
        except FileNotFoundError as e:
            if "NoSuchBucket" in str(e):
                raise self._fail(e, key, "read") from None
            return None
        except BaseException as e:
            raise self._fail(e, key, "read") from None
        return ObjectInfo(m["path"], m["size"], m["last_modified"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""
        try:
            for batch in self._ob.list(self._store, prefix=prefix or None, chunk_size=1000):
                for m in batch:
                    yield ObjectInfo(m["path"], m["size"], m["last_modified"])
        except BaseException as e:
            raise self._fail(e, prefix, "list") from None

    # -- writes -----------------------------------------------------------------------

    def put(self, key: str, data: Any) -> None:
        """Store ``data`` (bytes-like) as ``key`` in one PUT, confirmed by the server."""
        try:
            r = self._ob.put(self._store, key, data)
        except BaseException as e:
            raise self._fail(e, key, "write") from None
        if not r.get("e_tag"):
            raise StoreError(f"{self.where(key)}: the server did not confirm the write")

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects (absent ones are not an error)."""
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            part = keys[i : i + 1000]
            try:
                self._ob.delete(self._store, part)
            except FileNotFoundError:
                pass
            except BaseException as e:
                raise self._fail(e, part[0], "delete") from None


_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def describe_error(e: BaseException, where: str, doing: str, endpoint: str,
                   retry_seconds: float = RETRY_SECONDS) -> str:
    """One line saying why a request about ``where`` failed."""
    text = str(e)
    m = _CODE.search(text)
    code = m[1] if m else ""
    if code == "NoSuchBucket":
        return f"{where}: no such bucket"
    if code == "NoSuchKey" or (isinstance(e, FileNotFoundError) and not code):
        return f"{where}: no such object"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                "ExpiredToken") or "Unauthenticated" in type(e).__name__:
        return f"{where}: the S3 credentials were refused ({code or 'unauthenticated'})"
    if code == "AccessDenied":
        return f"{where}: access denied to {doing} (AccessDenied)"
    if isinstance(e, PermissionError) or "403 Forbidden" in text:
        return f"{where}: the S3 credentials were refused or lack access (HTTP 403)"
    if "error sending request" in text or ("connect" in text.lower() and not code):
        return (f"{where}: the S3 server at {endpoint} is unreachable (gave up after "
                f"{retry_seconds:.0f} s of retries)")
    if code:
        return f"{where}: cannot {doing}: the server answered {code}"
    return f"{where}: cannot {doing}: {_first_line(e)}"
