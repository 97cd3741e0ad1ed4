"""Sub-commands of the ``fixedram`` command line, one module each, named after its command.

Module ``fixedram.commands.<name>`` registers command ``<name>`` on :data:`fixedram.cli.cli`
when imported; :func:`fixedram.cli.main` imports only the module of the command it runs, so
a module imports what its command needs inside the command's function.
"""
