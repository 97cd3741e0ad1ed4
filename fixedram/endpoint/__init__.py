"""Migration endpoints: fixedram standing in for a QEMU on the other side of a migration.

:func:`receive` is the destination QEMU saves into (writing a mapped-ram image);
:func:`receive_listening` also takes multifd migrations.
:func:`send` is the source a QEMU restores from (reading an image).
"""

from fixedram.endpoint.receive import (
    Receiver,
    ReceiveReport,
    ReceiveStats,
    receive,
    receive_listening,
)
from fixedram.endpoint.send import SendReport, SendStats, send, validate

__all__ = [
    "ReceiveReport",
    "ReceiveStats",
    "Receiver",
    "SendReport",
    "SendStats",
    "receive",
    "receive_listening",
    "send",
    "validate",
]
