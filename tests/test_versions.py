"""The table of QEMU-version and machine-type behaviour."""

from __future__ import annotations

import fixedram.versions as v
from fixedram.versions import TABLE, Rule, machine_version, wants_switchover_ack


def test_every_rule_is_in_the_table_with_its_reason() -> None:
    rules = {name: r for name, r in vars(v).items() if isinstance(r, Rule)}
    assert set(rules.values()) == set(TABLE) and len(TABLE) == len(rules)
    for r in TABLE:
        assert r.reason and r.behaviour and len(r.since) == 2


def test_machine_version() -> None:
    assert machine_version("pc-q35-10.0") == (10, 0)
    assert machine_version("pc-i440fx-7.2") == (7, 2)
    assert machine_version("microvm") is None
    assert machine_version("q35") is None


def test_switchover_ack() -> None:
    assert wants_switchover_ack("pc-q35-8.1") and wants_switchover_ack("pc-q35-10.0")
    assert not wants_switchover_ack("pc-i440fx-8.0") and not wants_switchover_ack("pc-i440fx-7.2")
    assert wants_switchover_ack("microvm")


def test_mapped_ram_versions_as_printed() -> None:
    assert v.MAPPED_RAM.since_text == "9.0" and v.MAPPED_RAM_DIRECT_IO.since_text == "9.1"
