"""``python -m mlxqat COMMAND ...``: the same commands as the ``mlxqat`` script (``python -m mlxqat --help``)."""

import sys

from .cli import main

sys.exit(main())
