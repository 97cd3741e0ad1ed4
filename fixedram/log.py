"""Warnings for the user, through :mod:`logging`.

fixedram logs its warnings on the ``fixedram`` logger at level WARNING. Unless an
application has given that logger a handler of its own by the time of the first warning,
fixedram gives it one that prints each warning as one line, ``fixedram: warning: ...``, on
the current ``sys.stderr`` (and keeps it from also reaching the root logger's handlers):
that is what the command line shows. Modules import this one only when they warn, so
:mod:`logging` stays out of a command's start-up.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOGGER_NAME", "warn"]

LOGGER_NAME = "fixedram"


class _StderrHandler(logging.Handler):
    """Writes each record as one line to ``sys.stderr`` as it is at that moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def warn(message: str, *args: object) -> None:
    """Log ``message % args`` as a warning of fixedram (see the module doc)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fixedram: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.warning(message, *args)
