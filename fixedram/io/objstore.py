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

from fixedram.errors import StoreError

__all__ = ["ObjectURL", "Store", "ObjectInfo", "parse_url", "is_object_url", "RETRY_SECONDS",
           "RESERVED"]

#: How long a request is retried on transport errors before it fails (seconds).
RETRY_SECONDS = 20.0

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


def _resolve() -> dict[str, Any]:
    """Endpoint, credentials and region from the environment, else from botocore."""
    env = os.environ
    cfg: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    token = env.get("AWS_SESSION_TOKEN")
    if not (key and secret) or not endpoint or not region:
        try:
            import botocore.session  # profiles, config files, SSO, instance roles
        except ImportError:
            pass
        else:
            sess = botocore.session.get_session()
            if not (key and secret):
                creds = sess.get_credentials()
                if creds is not None:
                    frozen = creds.get_frozen_credentials()
                    key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
            region = region or sess.get_config_variable("region")
            if not endpoint:
                try:
                    endpoint = sess.get_scoped_config().get("endpoint_url")
                except Exception:  # a missing profile is reported by the request itself
                    endpoint = None
    if not (key and secret):
        raise StoreError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "or AWS_PROFILE")
    cfg.update(access_key_id=key, secret_access_key=secret, region=region or "us-east-1")
    if token:
        cfg["token"] = token
    if endpoint:
        cfg["endpoint"] = endpoint
        cfg["virtual_hosted_style_request"] = False
    return cfg


def _retry_seconds() -> float:
    try:
        return float(os.environ.get("FIXEDRAM_S3_RETRY_SECONDS", RETRY_SECONDS))
    except ValueError:
        return RETRY_SECONDS


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
        cfg = _resolve()
        self.endpoint = cfg.get("endpoint", "AWS")
        secs = _retry_seconds()
        try:
            self._store = S3Store(
                bucket, **cfg,
                client_options={"allow_http": True, "connect_timeout": timedelta(seconds=5),
                                "timeout": timedelta(seconds=120)},
                retry_config={"max_retries": 30, "retry_timeout": timedelta(seconds=secs),
                              "backoff": {"init_backoff": timedelta(milliseconds=100),
                                          "max_backoff": timedelta(seconds=2), "base": 2}})
        except Exception as e:
            raise StoreError(f"S3 bucket {bucket}: {_first_line(e)}") from None

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _fail(self, e: BaseException, key: str, doing: str) -> StoreError:
        return StoreError(describe_error(e, self.where(key), doing, self.endpoint))

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str) -> memoryview:
        """The whole object ``key``."""
        try:
            return memoryview(self._ob.get(self._store, key).bytes())
        except Exception as e:
            raise self._fail(e, key, "read") from None

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of object ``key``."""
        try:
            return memoryview(self._ob.get_range(self._store, key, start=start, end=end))
        except Exception as e:
            raise self._fail(e, key, "read") from None

    def head(self, key: str) -> ObjectInfo | None:
        """Size and modification time of ``key``; None when there is no such object."""
        try:
            m = self._ob.head(self._store, key)
        except FileNotFoundError as e:
            if "NoSuchBucket" in str(e):
                raise self._fail(e, key, "read") from None
            return None
        except Exception as e:
            raise self._fail(e, key, "read") from None
        return ObjectInfo(m["path"], m["size"], m["last_modified"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""
        try:
            for batch in self._ob.list(self._store, prefix=prefix or None, chunk_size=1000):
                for m in batch:
                    yield ObjectInfo(m["path"], m["size"], m["last_modified"])
        except Exception as e:
            raise self._fail(e, prefix, "list") from None

    # -- writes -----------------------------------------------------------------------

    def put(self, key: str, data: Any) -> None:
        """Store ``data`` (bytes-like) as ``key`` in one PUT, confirmed by the server."""
        try:
            r = self._ob.put(self._store, key, data)
        except Exception as e:
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
            except Exception as e:
                raise self._fail(e, part[0], "delete") from None


_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def describe_error(e: BaseException, where: str, doing: str, endpoint: str) -> str:
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
                f"{_retry_seconds():.0f} s of retries)")
    if code:
        return f"{where}: cannot {doing}: the server answered {code}"
    return f"{where}: cannot {doing}: {_first_line(e)}"
