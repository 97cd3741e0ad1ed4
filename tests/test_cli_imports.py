"""What a command imports: only its own module and what its path needs.

A command's start-up time is mostly imports (the lazy restore's time to running counts it), so
``fixedram COMMAND`` imports ``fixedram.commands.COMMAND`` and nothing of the other commands,
and the save/restore paths leave out what they never use. Each check runs a fresh interpreter
and looks at ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def modules_after(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after running ``code``."""
    probe = code + "\nimport json as _j, sys as _s\nprint(_j.dumps(sorted(_s.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=REPO, timeout=60, check=True)
    return set(json.loads(r.stdout.splitlines()[-1]))


def cli_modules(*args: str) -> set[str]:
    """Modules loaded by ``fixedram ARGS`` (run through click, exit status ignored)."""
    return modules_after(
        "from fixedram.cli import cli\n"
        f"try:\n    cli({list(args)!r}, prog_name='fixedram')\n"
        "except SystemExit:\n    pass")


def test_every_command_module_registers_its_command() -> None:
    from click import Context

    from fixedram.commands import cli, load_commands

    load_commands()
    names = cli.list_commands(Context(cli))
    assert {"analyze", "extract", "save", "restore", "send", "receive", "verify", "convert",
            "demo"} <= set(names)
    for name in names:
        assert cli.get_command(Context(cli), name) is not None, name
    assert cli.get_command(Context(cli), "no-such-command") is None


@pytest.mark.parametrize("command", ["save", "restore", "send", "receive", "verify"])
def test_a_command_imports_only_its_own_module(command: str) -> None:
    mods = cli_modules(command, "--help")
    own = f"fixedram.commands.{command}"
    assert own in mods
    others = {m for m in mods if m.startswith("fixedram.commands.") and m != own}
    # restore reuses save's progress display; nothing else crosses
    assert others <= ({"fixedram.commands.save"} if command == "restore" else set())
    assert "numpy" not in mods or command in ("send", "receive")


def test_lazy_restore_path_leaves_out_what_it_does_not_use() -> None:
    mods = modules_after(
        "import fixedram.cli, fixedram.commands.restore, fixedram.qmp.client, "
        "fixedram.qmp.lazy, fixedram.qmp.progress, fixedram.endpoint.postcopy, fixedram.image\n"
        "fixedram.qmp.progress.ProgressBar('x', disable=True).close()")
    for unused in ("tqdm", "xxhash", "ctypes.util", "fixedram.endpoint.receive",
                   "fixedram.endpoint.multifd", "fixedram.image.writer",
                   "fixedram.image.checksum", "fixedram.testing.vm", "fixedram.image.verify",
                   "xml.etree.ElementTree"):
        assert unused not in mods, unused


def test_native_paths_leave_out_what_they_do_not_use() -> None:
    mods = modules_after("import fixedram.commands.save, fixedram.commands.restore, "
                         "fixedram.qmp.save, fixedram.qmp.restore, fixedram.image")
    for unused in ("tqdm", "xxhash", "fixedram.endpoint.receive", "fixedram.image.writer",
                   "fixedram.testing.vm", "numpy", "xml.etree.ElementTree"):
        assert unused not in mods, unused


def test_package_names_load_on_first_use_and_stay_what_they_were() -> None:
    """``fixedram.endpoint.receive`` is a module and ``receive`` its function: importing the
    module first (as the save path does) must not make the package's ``receive`` the module."""
    r = subprocess.run([sys.executable, "-c", (
        "import sys, fixedram.endpoint as e, fixedram.image as i\n"
        "assert 'fixedram.endpoint.receive' not in sys.modules\n"
        "import fixedram.endpoint.receive, fixedram.endpoint.send, fixedram.image.reader\n"
        "from fixedram.endpoint import receive, send, validate\n"
        "from fixedram.image import open_image, reader\n"
        "assert callable(receive) and receive.__module__ == 'fixedram.endpoint.receive'\n"
        "assert callable(send) and send.__module__ == 'fixedram.endpoint.send'\n"
        "assert e.receive is receive and i.open_image is open_image\n"
        "assert reader.__name__ == 'fixedram.image.reader'\n")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr


def test_runtime_modules_do_not_import_the_test_support() -> None:
    """``fixedram.testing`` (test guests, driving QEMU) is for the tests, the benchmarks and the
    demo: no other module of the package imports it."""
    import ast

    pkg = REPO / "fixedram"
    allowed = {pkg / "demo.py", pkg / "commands" / "demo.py"}
    offenders = []
    for path in sorted(pkg.rglob("*.py")):
        if path in allowed or (pkg / "testing") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n == "fixedram.testing" or n.startswith("fixedram.testing.")]
    assert not offenders, offenders


#: The package's layers, lowest first: a module imports only from its own layer or below.
LAYERS = [
    {"errors", "units", "log", "_lazy", "faults", "resident"},  # resident: no fixedram import
    {"stream", "io", "versions"},  # versions: the QEMU-version rules, over the stream format
    {"image"},
    {"endpoint"},
    {"qmp"},
    {"commands", "demo"},  # demo: the demo command's body
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_layers_import_only_downward() -> None:
    """codec and io -> image -> endpoint -> orchestration (qmp) -> commands -> cli: no module
    imports from a layer above its own, at module level or inside a function
    (``fixedram.testing`` is test support and stands apart)."""
    import ast

    pkg = REPO / "fixedram"
    offenders = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        if path == pkg / "__init__.py" or (pkg / "testing") in path.parents:
            continue
        me = ".".join(rel.parts if rel.name != "__init__" else rel.parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if not n.startswith("fixedram.") or n.startswith("fixedram.testing"):
                    continue
                if _layer(n) > _layer(me):
                    offenders.append(f"{me} imports {n}")
    assert not offenders, offenders


def test_a_command_sent_to_a_server_imports_almost_nothing() -> None:
    """With ``FIXEDRAM_SERVER`` set the entry point sends the command before importing click,
    typing or any command (``fixedram.resident``)."""
    mods = modules_after("import fixedram.cli, fixedram.resident")
    ours = {m for m in mods if m.startswith("fixedram")}
    assert ours == {"fixedram", "fixedram.cli", "fixedram.errors", "fixedram.resident"}, ours
    for heavy in ("click", "typing", "socket", "selectors", "numpy", "asyncio"):
        assert heavy not in mods, heavy


def test_lazy_options_are_one_definition() -> None:
    """``restore --lazy`` and ``send --postcopy`` take the same lazy-restore options, with
    the same help but for the flag that makes the restore lazy."""
    from fixedram.commands import cli, load_commands

    load_commands()
    names = ("push_rate", "prefetch_rate", "no_record", "no_prefetch")

    def opts(command: str, flag: str) -> dict[str, tuple[object, ...]]:
        params = {p.name: p for p in cli.commands[command].params}
        return {n: (tuple(params[n].opts), params[n].type.name, params[n].default,  # type: ignore[attr-defined]
                    (params[n].help or "").replace(flag, "FLAG"))  # type: ignore[attr-defined]
                for n in names}

    assert opts("restore", "--lazy") == opts("send", "--postcopy")


def test_opening_and_checking_an_image_leaves_numpy_out(tmp_path: Path) -> None:
    """The native save and restore and the lazy restore's checks before QEMU sees a byte
    (open, validate, count and walk the bitmaps) read metadata only, without numpy: a
    native restore never loads it. The counts equal numpy's, across the 4 GiB pieces a
    bitmap is read in, and a bit set beyond a block is still refused."""
    from synth_images import write_mapped_image

    pages = {"pc.ram": {0: b"\x01" * 4096, 63: b"\x02" * 4096, 64: b"\x03" * 4096,
                        (1 << 20) - 1: b"\x04" * 4096, (1 << 20) + 5: b"\x05" * 4096},
             "rom": {2: b"\x06" * 4096}}
    img = tmp_path / "meta.img"
    headers = write_mapped_image(img, {"pc.ram": 5 << 30, "rom": 40 * 4096, "empty": 8192},
                                 pages)
    mods = modules_after(
        "import fixedram.cli, fixedram.commands.restore, fixedram.commands.save, "
        "fixedram.qmp.restore, fixedram.qmp.save, fixedram.qmp.lazy, "
        "fixedram.endpoint.postcopy\n"
        "from fixedram.image import open_image\n"
        "from fixedram.endpoint.send import validate\n"
        f"with open_image({str(img)!r}) as img:\n"
        "    validate(img, dest_machine='pc-q35-10.0', dest_blocks=[(n, b.length) for n, b "
        "in img.blocks.items()])\n"
        "    counts = {n: (img.count_present(n), img.last_present(n)) for n in img.blocks}\n"
        "print(counts)")
    assert "numpy" not in mods
    r = subprocess.run([sys.executable, "-c",
                        "from fixedram.image import open_image\n"
                        f"with open_image({str(img)!r}) as img:\n"
                        "    print({n: (img.count_present(n), img.last_present(n)) "
                        "for n in img.blocks})"],
                       capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    assert r.stdout.strip() == str({"pc.ram": (5, (1 << 20) + 5), "rom": (1, 2),
                                    "empty": (0, -1)})
    # bit 41 of the 40-page block: refused by the count, the walk and the check
    fd = os.open(img, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([0x04 | 0x02]), headers["rom"].bitmap_offset + 5)
    finally:
        os.close(fd)
    for call in ("img.count_present('rom')", "img.last_present('rom')", "validate(img)"):
        r = subprocess.run([sys.executable, "-c",
                            "from fixedram.image import open_image\n"
                            "from fixedram.endpoint.send import validate\n"
                            f"with open_image({str(img)!r}) as img:\n    {call}"],
                           capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
        assert "bitmap bit 41 is set beyond the block's 40 pages" in r.stderr, (call, r.stderr)
