"""``python -m fixedram``: the command line."""

from fixedram.cli import main

main()
