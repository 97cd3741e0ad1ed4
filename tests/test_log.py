"""fixedram's warnings: one line on stderr by default, an application's own handler instead."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixedram.io.files import warn_no_direct_io
from fixedram.log import LOGGER_NAME


@pytest.fixture
def fresh_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(LOGGER_NAME)
    saved = logger.handlers[:], logger.propagate
    logger.handlers.clear()
    logger.propagate = True
    yield logger
    logger.handlers[:], logger.propagate = saved


def test_o_direct_fallback_warning_on_stderr(
    fresh_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    warn_no_direct_io(Path("/mnt/x"))
    warn_no_direct_io(Path("/mnt/y"), "refused an O_DIRECT read")
    warn_no_direct_io(Path("/mnt/z"), fallback="QEMU reads buffered")
    assert capsys.readouterr().err.splitlines() == [
        "fixedram: warning: the filesystem of /mnt/x does not support O_DIRECT; using buffered I/O",
        "fixedram: warning: the filesystem of /mnt/y refused an O_DIRECT read; using buffered I/O",
        "fixedram: warning: the filesystem of /mnt/z does not support O_DIRECT; "
        "QEMU reads buffered",
    ]


def test_an_application_handler_takes_the_warnings(
    fresh_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    fresh_logger.addHandler(Keep())
    warn_no_direct_io(Path("/mnt/x"))
    assert capsys.readouterr().err == ""
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "the filesystem of /mnt/x does not support O_DIRECT; using buffered I/O")
    ]
