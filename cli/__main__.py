"""``python -m raymerge.cli``: the same as the ``raymerge`` console script."""

import sys

from raymerge.cli.main import main

sys.exit(main())
