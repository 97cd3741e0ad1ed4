"""Named fault points for the fault-injection tests (``tests/test_faults.py``).

With ``FIXEDRAM_FAULT=<point>[:<n>]`` in the environment, the n-th time (default: the
first) a process reaches :func:`point` ``<point>`` it is killed with SIGKILL, no
cleanup, as by a power cut or the OOM killer. With ``FIXEDRAM_FAULT_PID=<pid>`` the
process with that pid (a QEMU) is SIGKILLed instead and this one carries on, so a
peer dies at an exact place of the stream. Without the variable :func:`point` is one
global check. Points: see ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["point"]

_SPEC = os.environ.get("FIXEDRAM_FAULT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_LEFT = int(_NTH) if _NTH else 1


def point(name: str) -> None:
    """A named place in the code where a fault can be injected."""
    global _LEFT
    if not _SPEC or name != _NAME or _LEFT <= 0:
        return
    _LEFT -= 1
    if _LEFT:
        return
    pid = int(os.environ.get("FIXEDRAM_FAULT_PID", "0") or 0)
    os.kill(pid or os.getpid(), signal.SIGKILL)
