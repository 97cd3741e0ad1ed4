"""What a source asks of its destination QEMU over QMP before it sends a byte.

``fixedram send --qmp`` (and the multifd sender) check the image against the QEMU that will
load it: its machine type and RAM blocks, and for multifd its settings, version and uuid.
The parsing of QEMU's answers and the checks live in the endpoint layer
(:mod:`fixedram.endpoint.send`, :mod:`fixedram.endpoint.multifd_send`); this module only
asks.
"""

from __future__ import annotations

import os

from fixedram.endpoint.multifd_send import (
    MultifdDestination,
    check_multifd_settings,
    parse_uuid,
)
from fixedram.endpoint.send import dest_ramblocks_from_hmp, machine_from_qom_type
from fixedram.errors import EndpointError
from fixedram.qmp.client import QMP

__all__ = ["query_destination", "query_multifd_dest"]


def query_destination(qmp_socket: str | os.PathLike[str], *,
                      timeout: float = 10.0) -> tuple[str, list[tuple[str, int]]]:
    """Machine type and RAM blocks of the QEMU whose QMP socket is ``qmp_socket``.

    Uses ``qom-get /machine type`` and HMP ``info ramblock``, which QEMU 7.2 and 10 both
    answer (``query-machines`` does not say which machine is running). The socket must
    be free: QEMU serves one client per monitor.
    """
    with QMP.connect(qmp_socket, timeout=timeout, greeting_timeout=timeout) as q:
        machine = q.machine_type()
        text = q.ramblocks_text()
    blocks = dest_ramblocks_from_hmp(text)
    if not blocks:
        raise EndpointError(f"cannot parse 'info ramblock' from {qmp_socket}: {text!r}")
    return machine_from_qom_type(machine), blocks


def query_multifd_dest(qmp_socket: str | os.PathLike[str], channels: int, *,
                       timeout: float = 10.0) -> MultifdDestination:
    """Machine type, RAM blocks, version and uuid of the QEMU behind ``qmp_socket``, after
    checking that it waits for a multifd migration with ``channels`` channels."""
    with QMP.connect(qmp_socket, timeout=timeout, greeting_timeout=timeout) as q:
        check_multifd_settings(q.capabilities(), q.parameters(), channels)
        machine = q.machine_type()
        text = q.ramblocks_text()
        version = q.version
        uuid = parse_uuid(str(q.cmd("query-uuid").get("UUID", "")))
    blocks = dest_ramblocks_from_hmp(text)
    if not blocks:
        raise EndpointError(f"cannot parse 'info ramblock' from {qmp_socket}: {text!r}")
    return MultifdDestination(machine_from_qom_type(machine), blocks, version, uuid)
