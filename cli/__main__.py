"""``python -m raymerge.cli``: the same as the ``raymerge`` console script."""

from raymerge.cli.main import console_main

console_main()
