"""Sub-commands of the ``fixedram`` command line, one module each.

Each module registers its commands on :data:`fixedram.cli.cli` when imported;
:func:`fixedram.cli.main` imports every module of this package.
"""
