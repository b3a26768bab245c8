"""``python -m fedatlas``: the ``fedatlas`` command."""

import sys

from fedatlas.cli import main

sys.exit(main())
