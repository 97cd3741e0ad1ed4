"""Migration endpoints: fixedram standing in for a QEMU on the other side of a migration.

:func:`receive` is the destination QEMU saves into (writing a mapped-ram image);
:func:`receive_listening` also takes multifd migrations.
:func:`send` is the source a QEMU restores from (reading an image).

Each name is imported from its module when first used, so that importing one endpoint
(``fixedram.endpoint.postcopy`` for a lazy restore) does not import the others.
"""

from typing import TYPE_CHECKING

from fixedram._lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__ = lazy_exports(__name__, {
    **dict.fromkeys(["Receiver", "ReceiveReport", "ReceiveStats", "receive",
                     "receive_listening"], "receive"),
    **dict.fromkeys(["SendReport", "SendStats", "send", "validate"], "send"),
})
