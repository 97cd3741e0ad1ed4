"""Exceptions raised by fixedram.

Every error fixedram raises on purpose derives from :class:`FixedramError`, so a
caller (the command line among them) can catch one class and print one line.

Hierarchy::

    FixedramError
     +-- StreamError          malformed or unsupported migration stream
     |    +-- UnsupportedRecord   a valid record fixedram does not handle
     |    +-- TruncatedStream     the stream ended inside a record
     +-- ImageError           an image file is malformed, incomplete or inconsistent
     +-- StoreError           an object store (S3) refused or could not serve a request
     +-- EndpointError        a migration peer misbehaved or went away
     +-- VMError              QEMU could not be started, reached or driven
     |    +-- QMPCommandError     QEMU answered a QMP command with an error
     +-- MismatchError        image and destination VM do not fit each other
     +-- ExtensionError       an extension in a mapped-ram image's padding (defined with its
          +-- ChecksumError       layout: image/extensions.py, image/checksum.py,
          +-- WorkingSetError     image/workingset.py) is damaged or cannot be written
"""

from __future__ import annotations

__all__ = [
    "FixedramError",
    "StreamError",
    "UnsupportedRecord",
    "TruncatedStream",
    "ImageError",
    "StoreError",
    "EndpointError",
    "VMError",
    "QMPCommandError",
    "MismatchError",
    "printable",
]


class FixedramError(Exception):
    """Root of every error fixedram raises deliberately."""


class StreamError(FixedramError):
    """A migration stream is malformed; ``offset`` is the byte where the problem starts."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.message = message
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at byte {offset})")


class UnsupportedRecord(StreamError):
    """A well-formed record that fixedram does not handle (XBZRLE, compressed pages, ...)."""


class TruncatedStream(StreamError):
    """The input ended in the middle of a record."""


class ImageError(FixedramError):
    """An image file is malformed, incomplete or inconsistent."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.message = message
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at byte {offset})")


class StoreError(FixedramError):
    """An object store (S3) could not be reached, refused the credentials, or has no such
    bucket or object; the message names the location and the reason in one line."""


class EndpointError(FixedramError):
    """A migration peer misbehaved, or the connection to it failed."""


class VMError(FixedramError):
    """QEMU could not be started, reached over QMP, or driven as asked."""


class QMPCommandError(VMError):
    """QEMU is alive and answered a QMP command with an error (its text is the message)."""


class MismatchError(FixedramError):
    """An image and a destination VM disagree (RAM blocks, sizes, machine type)."""


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``...).

    Names in error messages come from untrusted files (RAM block names, machine types):
    escaping keeps every message on one line and terminal escapes out of the terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
